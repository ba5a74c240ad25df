//! Who is training, and when a step is done.
//!
//! The coordinator tracks each worker's liveness (heartbeats), its clock (steps pushed) and,
//! in sync mode, which workers have pushed for the current step. A sync step completes when
//! every live worker has pushed; a worker that stops heartbeating is dropped so that nothing
//! waits forever, and a worker that comes back is counted again once its next push arrives.
//!
//! All state sits behind one mutex that is never held across an `.await` or during optimizer
//! math. Waiters (pulls and pushes for a future step) sleep on a `watch` channel that is bumped
//! on every change.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use gradflow_core::Mode;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::PsError;

#[derive(Debug, Clone)]
struct WorkerSlot {
    /// Last time any request came from this worker (or server start, before the first one).
    last_seen: Instant,
    seen: bool,
    live: bool,
    left: bool,
    /// Not waited for until its next push: idle (dynamic data sharding, no task for it right
    /// now) or back after being dropped.
    paused: bool,
    /// Async: steps pushed so far.
    clock: u64,
}

#[derive(Debug)]
struct State {
    version: u64,
    workers: Vec<WorkerSlot>,
    /// Sync: workers whose push for `version` has been added to the sums.
    arrived: Vec<bool>,
    /// Sync: pushes for `version` being added right now; the step cannot complete meanwhile.
    arriving: usize,
    /// Sync: a completed step's update is being applied.
    applying: bool,
    /// Sync: restored from a checkpoint at this version and no step completed since. Until
    /// one does, only requests for exactly this step are taken: workers that were ahead
    /// rewind to it, so no one waits for a step the others will never push.
    restored_at: Option<u64>,
    /// Sync: a step that does not complete without its worker's push (the scorer holding
    /// the model at an epoch's end; see [`Coordinator::hold`]).
    hold: Option<Hold>,
    /// Sync, early stopping: training ended with the model of this version; no later step
    /// completes (see [`Coordinator::finish`]).
    finished_at: Option<u64>,
}

/// Step `step` waits for `worker`'s push, even when `worker` is dropped or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    worker: u32,
    step: u64,
}

/// Permission to apply a completed sync step: divide the sums by `divisor`, apply, then call
/// [`Coordinator::finish_step`].
#[derive(Debug)]
#[must_use]
pub struct StepTicket {
    pub divisor: u32,
    pub step: u64,
}

pub struct Coordinator {
    mode: Mode,
    /// Sync: live workers a step may complete without.
    backup_workers: u32,
    max_staleness: Option<u64>,
    heartbeat_timeout: Duration,
    startup_timeout: Duration,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Coordinator {
    pub fn new(
        mode: Mode,
        num_workers: u32,
        max_staleness: Option<u64>,
        heartbeat_timeout: Duration,
        startup_timeout: Duration,
    ) -> Coordinator {
        let now = Instant::now();
        let slot =
            WorkerSlot { last_seen: now, seen: false, live: true, left: false, paused: false, clock: 0 };
        Coordinator {
            mode,
            backup_workers: 0,
            max_staleness,
            heartbeat_timeout,
            startup_timeout,
            state: Mutex::new(State {
                version: 0,
                workers: vec![slot; num_workers as usize],
                arrived: vec![false; num_workers as usize],
                arriving: 0,
                applying: false,
                restored_at: None,
                hold: None,
                finished_at: None,
            }),
            changed: watch::channel(0).0,
        }
    }

    /// Sync: lets a step complete once all live workers but `n` have pushed.
    pub fn with_backup_workers(mut self, n: u32) -> Coordinator {
        self.backup_workers = n;
        self
    }

    /// Starts from a model restored at `version`.
    pub fn restore(&self, version: u64) {
        let mut s = self.state.lock().unwrap();
        s.version = version;
        if self.mode == Mode::Sync {
            s.restored_at = Some(version);
        }
        drop(s);
        self.notify();
    }

    /// Whether no sync step is being applied right now (a snapshot now is one version).
    pub fn between_steps(&self) -> bool {
        !self.state.lock().unwrap().applying
    }

    pub fn num_workers(&self) -> u32 {
        self.state.lock().unwrap().workers.len() as u32
    }

    pub fn version(&self) -> u64 {
        self.state.lock().unwrap().version
    }

    /// Indices of live workers.
    pub fn live_workers(&self) -> Vec<u32> {
        let s = self.state.lock().unwrap();
        (0..s.workers.len() as u32).filter(|&w| is_active(&s.workers[w as usize])).collect()
    }

    /// When a request last came from any worker still in the job; `None` if none is.
    pub fn last_heard(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        s.workers.iter().filter(|w| w.seen && w.live && !w.left).map(|w| w.last_seen).max()
    }

    /// Indices of workers still in the job: heartbeating and not departed, paused or not.
    pub fn alive_workers(&self) -> Vec<u32> {
        let s = self.state.lock().unwrap();
        (0..s.workers.len() as u32)
            .filter(|&w| s.workers[w as usize].live && !s.workers[w as usize].left)
            .collect()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records that `worker` is alive. A dropped or departed worker rejoins: in sync mode it
    /// is waited for again once its next push arrives.
    pub fn touch(&self, worker: u32) -> Result<(), PsError> {
        if worker == gradflow_proto::OBSERVER {
            return Ok(());
        }
        let mut s = self.state.lock().unwrap();
        let version = s.version;
        let num_workers = s.workers.len() as u32;
        let slot =
            s.workers.get_mut(worker as usize).ok_or(PsError::UnknownWorker { worker, num_workers })?;
        slot.last_seen = Instant::now();
        slot.seen = true;
        if !slot.live || slot.left {
            // Not waited for until its next push reaches this shard: each shard sees the
            // worker come back at its own moment, and a shard that counted it from a step the
            // worker then skipped (moving to another shard's later step) would wait forever.
            info!(worker, step = version, "worker rejoined; counted again from its next push");
            slot.live = true;
            slot.left = false;
            slot.paused = true;
            drop(s);
            self.notify();
        }
        Ok(())
    }

    /// A worker finished cleanly, or with `pause` is idle until its next push: it is no
    /// longer waited for.
    pub fn leave(&self, worker: u32, pause: bool) -> Result<Option<StepTicket>, PsError> {
        if worker == gradflow_proto::OBSERVER {
            return Ok(None);
        }
        let mut s = self.state.lock().unwrap();
        let num_workers = s.workers.len() as u32;
        let slot =
            s.workers.get_mut(worker as usize).ok_or(PsError::UnknownWorker { worker, num_workers })?;
        if pause {
            slot.paused = true;
            info!(worker, "worker idle: not waited for until its next push");
        } else {
            slot.left = true;
            info!(worker, "worker left");
            if s.hold.is_some_and(|h| h.worker == worker) {
                s.hold = None;
            }
        }
        let ticket = self.try_complete(&mut s);
        drop(s);
        self.notify();
        Ok(ticket)
    }

    /// Sync: step `step` does not complete without `worker`'s push, even while `worker` is
    /// dropped or back but paused (the scorer keeping the model of an epoch's end while it
    /// scores it, dead or alive, and then adding its batch of the next step as it would have
    /// undisturbed). Ends with that push, when `worker` leaves, or with a newer hold; one
    /// for a step already done is ignored.
    pub fn hold(&self, worker: u32, step: u64) -> Result<(), PsError> {
        let mut s = self.state.lock().unwrap();
        let num_workers = s.workers.len() as u32;
        if worker as usize >= s.workers.len() {
            return Err(PsError::UnknownWorker { worker, num_workers });
        }
        if self.mode == Mode::Sync && step >= s.version {
            info!(worker, step, "step held until this worker has scored the model and pushed");
            s.hold = Some(Hold { worker, step });
        }
        Ok(())
    }

    /// Sync, early stopping: training ends with the model of version `at` (or the version now,
    /// if the model is past it). No later step completes; pulls for later steps and pushes of
    /// `at` or later are refused with [`PsError::Finished`], which ends a worker's training,
    /// and the pushes of step `at` that arrived already are never applied. Wakes every waiter.
    pub fn finish(&self, at: u64) {
        let mut s = self.state.lock().unwrap();
        let at = at.max(s.version);
        if s.finished_at.is_none_or(|f| at < f) {
            info!(step = at, "training ends here (early stopping)");
            s.finished_at = Some(at);
        }
        drop(s);
        self.notify();
    }

    /// The version training ended with, when it ended early (see [`Coordinator::finish`]).
    pub fn finished_at(&self) -> Option<u64> {
        self.state.lock().unwrap().finished_at
    }

    /// Drops workers that have not been heard from in time; may complete the current step.
    pub fn reap(&self) -> Option<StepTicket> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        let mut dropped = false;
        let version = s.version;
        for (w, slot) in s.workers.iter_mut().enumerate() {
            if !slot.live || slot.left {
                continue;
            }
            let limit = if slot.seen { self.heartbeat_timeout } else { self.startup_timeout };
            if now.duration_since(slot.last_seen) > limit {
                slot.live = false;
                dropped = true;
                if slot.seen {
                    warn!(worker = w, step = version, timeout = ?limit, "worker stopped heartbeating; dropped, training goes on without it");
                } else {
                    warn!(worker = w, timeout = ?limit, "worker never connected; dropped, training goes on without it");
                }
            }
        }
        if !dropped {
            return None;
        }
        let ticket = self.try_complete(&mut s);
        drop(s);
        self.notify();
        ticket
    }

    /// Waits until a request of `worker` for `step` may proceed: in sync mode until the model
    /// reaches `step`; in async mode with a staleness bound until the slowest live worker is
    /// close enough. Returns the version then.
    pub async fn wait_for_step(&self, worker: u32, step: u64, timeout: Duration) -> Result<u64, PsError> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let s = self.state.lock().unwrap();
                if let Some(at) = s.finished_at.filter(|at| step > *at) {
                    return Err(PsError::Finished { at, requested: step });
                }
                if let Some(v) = s.restored_at.filter(|v| *v == s.version) {
                    // A worker that pushed for the restored step may wait for the next one;
                    // any other request not for the restored step is from before the restore.
                    let pushed = s.arrived.get(worker as usize).copied().unwrap_or(false);
                    let ahead_ok = step == v + 1 && pushed;
                    if worker != gradflow_proto::OBSERVER && step != v && !ahead_ok {
                        return Err(PsError::Rewind { requested: step, current: v });
                    }
                }
                let ready = match self.mode {
                    Mode::Sync => s.version >= step,
                    Mode::Async => match self.max_staleness {
                        None => true,
                        Some(k) => step <= min_clock(&s, worker).saturating_add(k),
                    },
                };
                if ready {
                    return Ok(s.version);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(PsError::ShuttingDown),
                Err(_) => return Err(PsError::WaitTimeout(timeout)),
            }
        }
    }

    /// Sync: reserves `worker`'s slot in step `step` before its gradients are added.
    pub fn begin_push(&self, worker: u32, step: u64) -> Result<(), PsError> {
        let mut s = self.state.lock().unwrap();
        if let Some(at) = s.finished_at.filter(|at| step >= *at) {
            return Err(PsError::Finished { at, requested: step });
        }
        if step < s.version || (step == s.version && s.applying) {
            return Err(PsError::StaleStep { pushed: step, current: s.version + s.applying as u64 });
        }
        if step > s.version {
            return Err(PsError::Internal(format!(
                "push for step {step} reached the step check while the model is at {}",
                s.version
            )));
        }
        if s.arrived[worker as usize] {
            return Err(PsError::DuplicatePush { worker, step });
        }
        s.arrived[worker as usize] = true;
        s.arriving += 1;
        s.workers[worker as usize].paused = false;
        Ok(())
    }

    /// Sync: `worker`'s gradients are in the sums (or, if `ok` is false, were not added).
    pub fn end_push(&self, worker: u32, ok: bool) -> Option<StepTicket> {
        let mut s = self.state.lock().unwrap();
        s.arriving -= 1;
        if !ok {
            s.arrived[worker as usize] = false;
        }
        let ticket = self.try_complete(&mut s);
        drop(s);
        self.notify();
        ticket
    }

    fn try_complete(&self, s: &mut State) -> Option<StepTicket> {
        if self.mode != Mode::Sync || s.applying || s.arriving > 0 {
            return None;
        }
        if s.finished_at.is_some_and(|at| s.version >= at) {
            return None;
        }
        let arrived = s.arrived.iter().filter(|a| **a).count() as u32;
        if arrived == 0 {
            return None;
        }
        let missing =
            s.workers.iter().enumerate().filter(|(w, slot)| is_active(slot) && !s.arrived[*w]).count() as u32;
        if missing > self.backup_workers {
            return None;
        }
        if s.hold.is_some_and(|h| h.step == s.version && !s.arrived[h.worker as usize]) {
            return None;
        }
        s.applying = true;
        Some(StepTicket { divisor: arrived, step: s.version })
    }

    /// Sync: the step's update has been applied; the model moves to the next version.
    pub fn finish_step(&self, ticket: StepTicket) {
        let mut s = self.state.lock().unwrap();
        debug_assert_eq!(ticket.step, s.version);
        s.version += 1;
        s.applying = false;
        s.restored_at = None;
        if s.hold.is_some_and(|h| h.step < s.version) {
            s.hold = None;
        }
        s.arrived.iter_mut().for_each(|a| *a = false);
        drop(s);
        self.notify();
    }

    /// Async: a push of `worker` for `step` has been applied.
    pub fn applied_async(&self, worker: u32, step: u64) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        let slot = &mut s.workers[worker as usize];
        slot.clock = slot.clock.max(step + 1);
        slot.paused = false;
        let v = s.version;
        drop(s);
        self.notify();
        v
    }

    /// Sync, at shutdown: completes the open step with the pushes that arrived, as if its
    /// other workers had been dropped. Workers stopped mid-push reach some shards and not
    /// others; the shards they reached completed the step, and this shard must reach the same
    /// version for the job's last checkpoint. `None` when no push for the open step arrived.
    pub fn complete_open_step(&self) -> Option<StepTicket> {
        let mut s = self.state.lock().unwrap();
        if self.mode != Mode::Sync || s.applying || s.arriving > 0 || !s.arrived.iter().any(|a| *a) {
            return None;
        }
        // Stopped early: the job's last model is the one training ended with.
        if s.finished_at.is_some_and(|at| s.version >= at) {
            return None;
        }
        s.applying = true;
        let divisor = s.arrived.iter().filter(|a| **a).count() as u32;
        Some(StepTicket { divisor, step: s.version })
    }

    /// Stops every waiter (shutdown).
    pub fn close(&self) {
        self.notify();
    }

    /// Receiver that changes whenever the coordinator's state does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

fn is_active(slot: &WorkerSlot) -> bool {
    slot.live && !slot.left && !slot.paused
}

/// Async: the smallest clock among active workers other than `me` (a worker never waits for
/// itself); `u64::MAX` when there are none.
fn min_clock(s: &State, me: u32) -> u64 {
    s.workers
        .iter()
        .enumerate()
        .filter(|(w, slot)| *w as u32 != me && is_active(slot))
        .map(|(_, slot)| slot.clock)
        .min()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(n: u32) -> Coordinator {
        Coordinator::new(Mode::Sync, n, None, Duration::from_millis(50), Duration::from_millis(50))
    }

    #[test]
    fn step_completes_when_all_have_pushed() {
        let c = sync(2);
        c.begin_push(0, 0).unwrap();
        assert!(c.end_push(0, true).is_none());
        assert!(matches!(c.begin_push(0, 0), Err(PsError::DuplicatePush { .. })));
        c.begin_push(1, 0).unwrap();
        let t = c.end_push(1, true).expect("step complete");
        assert_eq!(t.divisor, 2);
        c.finish_step(t);
        assert_eq!(c.version(), 1);
        assert!(matches!(c.begin_push(0, 0), Err(PsError::StaleStep { pushed: 0, current: 1 })));
    }

    #[test]
    fn a_finished_job_completes_no_later_step_and_refuses_what_would_train_one() {
        let c = sync(2);
        c.touch(0).unwrap();
        c.touch(1).unwrap();
        c.hold(0, 1).unwrap();
        for w in 0..2 {
            c.begin_push(w, 0).unwrap();
            if let Some(t) = c.end_push(w, true) {
                c.finish_step(t);
            }
        }
        // Worker 1 pushes step 1 while worker 0 scores the model of step 1, then stops the job.
        c.begin_push(1, 1).unwrap();
        assert!(c.end_push(1, true).is_none());
        c.finish(1);
        assert_eq!(c.finished_at(), Some(1));
        assert!(c.leave(0, false).unwrap().is_none(), "the scorer leaving must not complete step 1");
        assert!(c.complete_open_step().is_none(), "nor must the shutdown");
        assert_eq!(c.version(), 1);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(c.wait_for_step(1, 1, Duration::from_secs(1))).unwrap(), 1);
        assert!(matches!(
            rt.block_on(c.wait_for_step(1, 2, Duration::from_secs(1))),
            Err(PsError::Finished { at: 1, requested: 2 })
        ));
        assert!(matches!(c.begin_push(1, 1), Err(PsError::Finished { at: 1, .. })));
    }

    #[test]
    fn a_held_step_waits_for_its_workers_push_even_once_it_is_dropped() {
        let c = sync(2);
        c.touch(0).unwrap();
        c.touch(1).unwrap();
        // Worker 0 holds step 1 before pushing step 0, then both push step 0.
        c.hold(0, 1).unwrap();
        for w in 0..2 {
            c.begin_push(w, 0).unwrap();
            if let Some(t) = c.end_push(w, true) {
                c.finish_step(t);
            }
        }
        assert_eq!(c.version(), 1);
        // Worker 0 dies while scoring: dropped, yet step 1 does not complete without it.
        c.begin_push(1, 1).unwrap();
        assert!(c.end_push(1, true).is_none());
        std::thread::sleep(Duration::from_millis(80));
        c.touch(1).unwrap();
        assert!(c.reap().is_none(), "the held step must not complete when its worker is dropped");
        assert_eq!(c.live_workers(), vec![1]);
        // Back (paused until its next push), it pushes: the step completes with both batches.
        c.touch(0).unwrap();
        assert!(c.reap().is_none());
        c.begin_push(0, 1).unwrap();
        let t = c.end_push(0, true).expect("the holder's push completes the held step");
        assert_eq!((t.step, t.divisor), (1, 2));
        c.finish_step(t);
        assert_eq!(c.version(), 2);
    }

    #[test]
    fn a_hold_ends_when_its_worker_leaves_and_async_never_holds() {
        let c = sync(2);
        c.hold(0, 0).unwrap();
        c.begin_push(1, 0).unwrap();
        assert!(c.end_push(1, true).is_none());
        let t = c.leave(0, false).unwrap().expect("the holder left: the step completes without it");
        assert_eq!(t.divisor, 1);
        let a = Coordinator::new(Mode::Async, 1, None, Duration::from_millis(50), Duration::from_millis(50));
        a.hold(0, 0).unwrap();
        assert!(matches!(a.hold(5, 0), Err(PsError::UnknownWorker { .. })));
    }

    #[test]
    fn failed_add_does_not_count() {
        let c = sync(1);
        c.begin_push(0, 0).unwrap();
        assert!(c.end_push(0, false).is_none());
        c.begin_push(0, 0).unwrap();
        assert!(c.end_push(0, true).is_some());
    }

    #[test]
    fn dead_worker_is_dropped_and_step_completes() {
        let c = sync(2);
        c.touch(0).unwrap();
        c.touch(1).unwrap();
        c.begin_push(0, 0).unwrap();
        assert!(c.end_push(0, true).is_none());
        std::thread::sleep(Duration::from_millis(80));
        c.touch(0).unwrap();
        let t = c.reap().expect("worker 1 dropped, step completes");
        assert_eq!(t.divisor, 1);
        c.finish_step(t);
        assert_eq!(c.live_workers(), vec![0]);
        // worker 1 comes back during step 1: not waited for until it pushes
        c.touch(1).unwrap();
        c.begin_push(0, 1).unwrap();
        let t = c.end_push(0, true).expect("step 1 does not wait for the rejoiner");
        c.finish_step(t);
        c.begin_push(1, 2).unwrap();
        assert!(c.end_push(1, true).is_none(), "step 2 waits for worker 0");
        c.begin_push(0, 2).unwrap();
        let t = c.end_push(0, true).expect("both pushed step 2");
        assert_eq!(t.divisor, 2, "the rejoiner counts again once it pushed");
    }

    #[test]
    fn left_worker_is_not_waited_for() {
        let c = sync(2);
        c.begin_push(0, 0).unwrap();
        assert!(c.end_push(0, true).is_none());
        let t = c.leave(1, false).unwrap().expect("leave completes the step");
        assert_eq!(t.divisor, 1);
    }

    #[test]
    fn a_paused_worker_is_waited_for_again_after_its_next_push_not_its_heartbeat() {
        let c = sync(2);
        c.begin_push(0, 0).unwrap();
        assert!(c.end_push(0, true).is_none());
        let t = c.leave(1, true).unwrap().expect("pausing completes the step");
        assert_eq!(t.divisor, 1);
        c.finish_step(t);
        c.touch(1).unwrap(); // a heartbeat
        c.begin_push(0, 1).unwrap();
        let t = c.end_push(0, true).expect("a heartbeat does not end the pause");
        c.finish_step(t);
        c.begin_push(1, 2).unwrap();
        assert!(c.end_push(1, true).is_none(), "worker 0 is still waited for");
        c.begin_push(0, 2).unwrap();
        let t = c.end_push(0, true).expect("both pushed");
        assert_eq!(t.divisor, 2);
        c.finish_step(t);
        c.begin_push(0, 3).unwrap();
        assert!(c.end_push(0, true).is_none(), "the resumed worker 1 is waited for again");
    }

    #[test]
    fn with_a_backup_worker_a_step_completes_without_the_slowest() {
        let c = sync(3).with_backup_workers(1);
        c.begin_push(2, 0).unwrap();
        assert!(c.end_push(2, true).is_none(), "one of three is not enough");
        c.begin_push(0, 0).unwrap();
        let t = c.end_push(0, true).expect("two of three complete the step");
        assert_eq!(t.divisor, 2, "the average is over the pushes taken");
        c.finish_step(t);
        assert!(matches!(c.begin_push(1, 0), Err(PsError::StaleStep { pushed: 0, current: 1 })));
    }

    #[tokio::test]
    async fn staleness_bound_holds_back_the_fast_worker() {
        let c = Coordinator::new(Mode::Async, 2, Some(1), Duration::from_secs(5), Duration::from_secs(5));
        assert!(c.wait_for_step(0, 1, Duration::from_millis(10)).await.is_ok());
        let err = c.wait_for_step(0, 2, Duration::from_millis(30)).await.unwrap_err();
        assert!(matches!(err, PsError::WaitTimeout(_)));
        c.applied_async(1, 0);
        assert!(c.wait_for_step(0, 2, Duration::from_millis(10)).await.is_ok());
    }

    #[tokio::test]
    async fn sync_wait_is_released_by_the_step() {
        let c = std::sync::Arc::new(sync(1));
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.wait_for_step(0, 1, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.begin_push(0, 0).unwrap();
        let t = c.end_push(0, true).unwrap();
        c.finish_step(t);
        assert_eq!(waiter.await.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn after_a_restore_requests_from_before_it_are_rewound() {
        let c = sync(2);
        c.restore(20);
        let t = Duration::from_millis(20);
        for step in [3, 21, 25] {
            let err = c.wait_for_step(0, step, t).await.unwrap_err();
            assert!(matches!(err, PsError::Rewind { requested, current: 20 } if requested == step), "{err}");
        }
        assert_eq!(c.wait_for_step(0, 20, t).await.unwrap(), 20);
        c.begin_push(0, 20).unwrap();
        assert!(c.end_push(0, true).is_none());
        // Having pushed the restored step, worker 0 may wait for the next one.
        assert!(matches!(c.wait_for_step(0, 21, t).await, Err(PsError::WaitTimeout(_))));
        c.begin_push(1, 20).unwrap();
        c.finish_step(c.end_push(1, true).unwrap());
        // After the first step the usual rules hold again.
        assert!(matches!(c.wait_for_step(1, 22, t).await, Err(PsError::WaitTimeout(_))));
    }
}
