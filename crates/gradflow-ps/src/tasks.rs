//! Dynamic data sharding: the queue of data tasks that shard 0 hands out to workers.
//!
//! The job's training files are cut into pieces (byte ranges). Every epoch hands out each
//! piece once, in an order drawn from the plan's seed and the epoch. A worker holds at most
//! one task (a lease) at a time and reports, with each push, how many of the task's examples
//! are in the model. When a worker is gone (dropped by the coordinator for missing
//! heartbeats), its task is handed to the next worker that asks, which skips the examples
//! already trained: no example of an epoch is lost and none is trained twice. A worker that
//! asks again while holding a task (a restarted process) gets that task back.
//!
//! The next epoch opens as soon as every task of the open ones is handed out, so fast workers
//! do not idle at an epoch's end. When an epoch's last task is done, scoring the model for it
//! is handed out like a task: to one worker, and again to another if that one is gone before
//! it reports the score; the job is finished only when every epoch is scored. The queue's
//! state ([`SavedTasks`]) goes into every checkpoint, so a restored job resumes mid-epoch.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::PsError;

/// One piece of training data: the lines that start in `start..end` of `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub path: String,
    pub start: u64,
    pub end: u64,
}

/// What the workers declare: the pieces, how many epochs, and the seed of the task order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlan {
    pub pieces: Vec<Piece>,
    pub epochs: u64,
    pub seed: u64,
}

impl TaskPlan {
    /// Checks the plan can be handed out: at least one piece and one epoch, ranges in order.
    pub fn validate(&self) -> Result<(), PsError> {
        let bad = |m: String| Err(PsError::InvalidArgument(format!("task plan: {m}")));
        if self.pieces.is_empty() {
            return bad("expected at least one piece, found none".into());
        }
        if self.pieces.len() > u32::MAX as usize {
            return bad(format!("expected at most {} pieces, found {}", u32::MAX, self.pieces.len()));
        }
        if self.epochs == 0 {
            return bad("expected at least one epoch, found 0".into());
        }
        if let Some((i, p)) = self.pieces.iter().enumerate().find(|(_, p)| p.start > p.end) {
            return bad(format!("piece {i} of `{}` starts at {} after its end {}", p.path, p.start, p.end));
        }
        Ok(())
    }

    /// The order in which epoch `epoch` hands out the pieces: a permutation drawn from the
    /// seed and the epoch (Fisher-Yates over SplitMix64).
    pub fn order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.pieces.len() as u32).collect();
        let mut state = self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7461_736b;
        for i in (1..order.len()).rev() {
            let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A task handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub lease: u64,
    pub epoch: u64,
    pub piece_index: u32,
    pub piece: Piece,
    /// Examples of the task already in the model: the worker skips these.
    pub skip_examples: u64,
}

/// The answer to a worker asking for work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handout {
    Task(Task),
    /// Everything open is being trained by someone; ask again shortly.
    Wait,
    /// Every epoch is done.
    Finished,
}

#[derive(Debug, Clone)]
struct Lease {
    id: u64,
    epoch: u64,
    piece: u32,
}

#[derive(Debug, Clone)]
struct Epoch {
    /// Pieces not handed out yet (first the ones taken back from lost workers).
    pending: VecDeque<u32>,
    done: Vec<bool>,
    remaining: usize,
    /// Examples in the model of pieces handed out and not finished.
    progress: HashMap<u32, u64>,
    /// Examples of this epoch in the model, over all pieces.
    examples: u64,
}

/// A completed epoch waiting to be scored.
#[derive(Debug, Clone)]
struct Eval {
    examples: u64,
    worker: Option<u32>,
}

/// The task queue of a job; see the module docs.
#[derive(Debug)]
pub struct TaskQueue {
    plan: TaskPlan,
    /// Completed epochs not scored yet.
    evals: BTreeMap<u64, Eval>,
    open: BTreeMap<u64, Epoch>,
    /// The first epoch not opened yet.
    next_epoch: u64,
    leases: HashMap<u32, Lease>,
    next_lease: u64,
}

/// The queue's state as it goes into a checkpoint: the plan, and per open epoch what is done
/// and how far the unfinished tasks got. Leases are not saved: after a restore every
/// unfinished task is handed out again from its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedTasks {
    pub plan: TaskPlan,
    pub next_epoch: u64,
    pub epochs: Vec<SavedEpoch>,
    /// `(epoch, examples)` of completed epochs not scored yet.
    #[serde(default)]
    pub unscored: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEpoch {
    pub epoch: u64,
    /// Pieces finished.
    pub done: Vec<u32>,
    /// `(piece, examples in the model)` of unfinished pieces that were started.
    pub progress: Vec<(u32, u64)>,
    /// Examples of the epoch in the model.
    #[serde(default)]
    pub examples: u64,
}

impl TaskQueue {
    /// A fresh queue at the start of epoch 0.
    pub fn new(plan: TaskPlan) -> TaskQueue {
        TaskQueue {
            plan,
            evals: BTreeMap::new(),
            open: BTreeMap::new(),
            next_epoch: 0,
            leases: HashMap::new(),
            next_lease: 1,
        }
    }

    /// The queue a checkpoint saved.
    pub fn restore(saved: SavedTasks) -> Result<TaskQueue, PsError> {
        saved.plan.validate()?;
        let bad = |what: String| PsError::Internal(format!("saved tasks: {what}"));
        if saved.next_epoch > saved.plan.epochs {
            return Err(bad(format!(
                "the next epoch is {} of a plan of {} epochs",
                saved.next_epoch, saved.plan.epochs
            )));
        }
        // A queue opens an epoch when it hands out the epoch's first task, and `next_epoch` is
        // past every epoch it opened: an epoch at or after it cannot have been started, let
        // alone scored.
        let mut listed = std::collections::BTreeSet::new();
        for epoch in saved.epochs.iter().map(|e| e.epoch).chain(saved.unscored.iter().map(|u| u.0)) {
            if epoch >= saved.next_epoch {
                return Err(bad(format!(
                    "epoch {epoch} is open or awaiting scoring, but the next epoch to open is {}",
                    saved.next_epoch
                )));
            }
            if !listed.insert(epoch) {
                return Err(bad(format!("epoch {epoch} is listed twice")));
            }
        }
        let n = saved.plan.pieces.len();
        let mut q = TaskQueue::new(saved.plan);
        q.next_epoch = saved.next_epoch;
        q.evals =
            saved.unscored.into_iter().map(|(e, examples)| (e, Eval { examples, worker: None })).collect();
        for e in saved.epochs {
            let mut done = vec![false; n];
            for &p in &e.done {
                let slot = done.get_mut(p as usize).ok_or_else(|| {
                    PsError::Internal(format!("saved tasks: piece {p} of epoch {} is out of range", e.epoch))
                })?;
                *slot = true;
            }
            let pending: VecDeque<u32> =
                q.plan.order(e.epoch).into_iter().filter(|&p| !done[p as usize]).collect();
            let remaining = pending.len();
            let progress =
                e.progress.into_iter().filter(|(p, _)| !done.get(*p as usize).unwrap_or(&true)).collect();
            q.open.insert(e.epoch, Epoch { pending, done, remaining, progress, examples: e.examples });
        }
        q.open.retain(|_, e| e.remaining > 0);
        Ok(q)
    }

    pub fn plan(&self) -> &TaskPlan {
        &self.plan
    }

    /// The state to checkpoint.
    pub fn save(&self) -> SavedTasks {
        SavedTasks {
            plan: self.plan.clone(),
            next_epoch: self.next_epoch,
            epochs: self
                .open
                .iter()
                .map(|(&epoch, e)| SavedEpoch {
                    epoch,
                    done: (0..e.done.len() as u32).filter(|&p| e.done[p as usize]).collect(),
                    progress: {
                        let mut p: Vec<(u32, u64)> = e.progress.iter().map(|(&k, &v)| (k, v)).collect();
                        p.sort_unstable();
                        p
                    },
                    examples: e.examples,
                })
                .collect(),
            unscored: self.evals.iter().map(|(&e, ev)| (e, ev.examples)).collect(),
        }
    }

    /// Worker `worker` asks for work, having finished the task of `done_lease` (0: none) and
    /// scored the model for epoch `scored` (if any). `is_live` says whether a worker is
    /// still in the job; the tasks and scorings of those that are not are taken back first.
    /// Returns the handout and, when this worker is to score a completed epoch, that epoch
    /// and how many examples it trained.
    pub fn next(
        &mut self,
        worker: u32,
        done_lease: u64,
        scored: Option<u64>,
        is_live: impl Fn(u32) -> bool,
    ) -> (Handout, Option<(u64, u64)>) {
        if let Some(e) = scored
            && self.evals.get(&e).is_some_and(|ev| ev.worker == Some(worker))
        {
            self.evals.remove(&e);
        }
        let handout = self.next_task(worker, done_lease, &is_live);
        let mine = self.evals.iter().find(|(_, ev)| ev.worker == Some(worker)).map(|(&e, _)| e);
        let free =
            || self.evals.iter().find(|(_, ev)| ev.worker.is_none_or(|w| !is_live(w))).map(|(&e, _)| e);
        let eval = mine.or_else(free).map(|e| {
            let ev = self.evals.get_mut(&e).expect("found");
            ev.worker = Some(worker);
            (e, ev.examples)
        });
        let handout = match handout {
            // Finished only once every epoch is scored.
            Handout::Finished if !self.evals.is_empty() => Handout::Wait,
            h => h,
        };
        (handout, eval)
    }

    fn next_task(&mut self, worker: u32, done_lease: u64, is_live: &impl Fn(u32) -> bool) -> Handout {
        if done_lease != 0 && self.leases.get(&worker).is_some_and(|l| l.id == done_lease) {
            let lease = self.leases.remove(&worker).expect("checked");
            let epoch = self.open.get_mut(&lease.epoch).expect("a leased task's epoch is open");
            epoch.progress.remove(&lease.piece);
            if !std::mem::replace(&mut epoch.done[lease.piece as usize], true) {
                epoch.remaining -= 1;
            }
            if epoch.remaining == 0 {
                let examples = epoch.examples;
                self.open.remove(&lease.epoch);
                self.evals.insert(lease.epoch, Eval { examples, worker: None });
            }
        }
        if let Some(l) = self.leases.get(&worker) {
            return Handout::Task(self.task(l.id, l.epoch, l.piece));
        }
        let lost: Vec<u32> = self.leases.keys().copied().filter(|&w| !is_live(w)).collect();
        for w in lost {
            let l = self.leases.remove(&w).expect("listed");
            self.open.get_mut(&l.epoch).expect("open").pending.push_front(l.piece);
        }
        let found = self.open.iter_mut().find_map(|(&e, ep)| ep.pending.pop_front().map(|p| (e, p)));
        let found = found.or_else(|| {
            if self.next_epoch >= self.plan.epochs {
                return None;
            }
            let e = self.next_epoch;
            self.next_epoch += 1;
            let n = self.plan.pieces.len();
            let mut pending: VecDeque<u32> = self.plan.order(e).into();
            let first = pending.pop_front();
            let epoch =
                Epoch { pending, done: vec![false; n], remaining: n, progress: HashMap::new(), examples: 0 };
            self.open.insert(e, epoch);
            first.map(|p| (e, p))
        });
        match found {
            Some((epoch, piece)) => {
                let id = self.next_lease;
                self.next_lease += 1;
                self.leases.insert(worker, Lease { id, epoch, piece });
                Handout::Task(self.task(id, epoch, piece))
            }
            None if self.open.is_empty() => Handout::Finished,
            None => Handout::Wait,
        }
    }

    fn task(&self, lease: u64, epoch: u64, piece: u32) -> Task {
        let skip_examples = self.open.get(&epoch).and_then(|e| e.progress.get(&piece)).copied().unwrap_or(0);
        Task {
            lease,
            epoch,
            piece_index: piece,
            piece: self.plan.pieces[piece as usize].clone(),
            skip_examples,
        }
    }

    /// Checks that `worker` still holds `lease` (a push quoting a task that was handed to
    /// someone else must not be taken).
    pub fn check(&self, worker: u32, lease: u64) -> Result<(), PsError> {
        match self.leases.get(&worker) {
            Some(l) if l.id == lease => Ok(()),
            _ => Err(PsError::LeaseLost { worker, lease }),
        }
    }

    /// Records that `examples` of `worker`'s task `lease` are in the model.
    pub fn progress(&mut self, worker: u32, lease: u64, examples: u64) -> Result<(), PsError> {
        self.check(worker, lease)?;
        let l = &self.leases[&worker];
        let epoch = self.open.get_mut(&l.epoch).expect("a leased task's epoch is open");
        let p = epoch.progress.entry(l.piece).or_insert(0);
        epoch.examples += examples.saturating_sub(*p);
        *p = (*p).max(examples);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(pieces: usize, epochs: u64) -> TaskPlan {
        TaskPlan {
            pieces: (0..pieces as u64)
                .map(|i| Piece { path: "train.csv".into(), start: i * 10, end: i * 10 + 10 })
                .collect(),
            epochs,
            seed: 7,
        }
    }

    fn take(q: &mut TaskQueue, worker: u32, done: u64) -> Task {
        match q.next(worker, done, None, |_| true).0 {
            Handout::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    #[test]
    fn orders_are_permutations_that_differ_by_epoch() {
        let p = plan(50, 2);
        let (a, b) = (p.order(0), p.order(1));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        assert_ne!(a, b);
        assert_eq!(a, p.order(0));
    }

    #[test]
    fn every_piece_is_handed_out_once_per_epoch() {
        let mut q = TaskQueue::new(plan(5, 2));
        let mut seen = vec![Vec::new(); 2];
        let mut leases = [0u64; 2];
        let mut scored = [None; 2];
        let mut completed = Vec::new();
        loop {
            let mut progressed = false;
            for w in 0..2u32 {
                let (h, c) = q.next(w, leases[w as usize], scored[w as usize].take(), |_| true);
                completed.extend(c);
                scored[w as usize] = c.map(|(e, _)| e);
                match h {
                    Handout::Task(t) => {
                        seen[t.epoch as usize].push(t.piece_index);
                        leases[w as usize] = t.lease;
                        progressed = true;
                    }
                    Handout::Wait => leases[w as usize] = 0,
                    Handout::Finished => leases[w as usize] = 0,
                }
            }
            if !progressed && scored == [None, None] && q.next(0, 0, None, |_| true).0 == Handout::Finished {
                break;
            }
        }
        for s in &mut seen {
            s.sort_unstable();
            assert_eq!(*s, vec![0, 1, 2, 3, 4]);
        }
        assert_eq!(completed, vec![(0, 0), (1, 0)]);
    }

    #[test]
    fn a_lost_workers_task_goes_to_the_next_worker_with_its_progress() {
        let mut q = TaskQueue::new(plan(1, 1));
        let t = take(&mut q, 0, 0);
        q.progress(0, t.lease, 300).unwrap();
        q.progress(0, t.lease, 200).unwrap(); // never backwards
        assert_eq!(q.next(1, 0, None, |_| true).0, Handout::Wait, "worker 0 is alive and has it");
        let t1 = take_with(&mut q, 1, |w| w != 0);
        assert_eq!((t1.piece_index, t1.skip_examples), (t.piece_index, 300));
        assert!(matches!(q.progress(0, t.lease, 400), Err(PsError::LeaseLost { worker: 0, .. })));
        q.progress(1, t1.lease, 500).unwrap();
        let (h, eval) = q.next(1, t1.lease, None, |_| true);
        assert_eq!((h, eval), (Handout::Wait, Some((0, 500))), "each example counted once; score it");
        // Worker 1 dies before reporting the score: worker 0 is asked to score instead.
        let (h, eval) = q.next(0, 0, None, |w| w != 1);
        assert_eq!((h, eval), (Handout::Wait, Some((0, 500))));
        assert_eq!(q.next(0, 0, Some(0), |_| true), (Handout::Finished, None));
    }

    fn take_with(q: &mut TaskQueue, worker: u32, live: impl Fn(u32) -> bool) -> Task {
        match q.next(worker, 0, None, live).0 {
            Handout::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    #[test]
    fn a_restarted_worker_gets_its_own_task_back() {
        let mut q = TaskQueue::new(plan(3, 1));
        let t = take(&mut q, 0, 0);
        q.progress(0, t.lease, 17).unwrap();
        let again = take(&mut q, 0, 0);
        assert_eq!((again.lease, again.piece_index, again.skip_examples), (t.lease, t.piece_index, 17));
    }

    #[test]
    fn a_stale_done_lease_finishes_nothing() {
        let mut q = TaskQueue::new(plan(2, 1));
        let t = take(&mut q, 0, 0);
        let again = take(&mut q, 0, t.lease + 100);
        assert_eq!(again.lease, t.lease);
    }

    #[test]
    fn the_next_epoch_opens_when_the_current_one_is_all_handed_out() {
        let mut q = TaskQueue::new(plan(1, 2));
        let a = take(&mut q, 0, 0);
        let b = take(&mut q, 1, 0);
        assert_eq!((a.epoch, b.epoch), (0, 1));
        assert_eq!(q.next(2, 0, None, |_| true).0, Handout::Wait);
    }

    #[test]
    fn save_and_restore_resume_mid_epoch() {
        let mut q = TaskQueue::new(plan(4, 2));
        let a = take(&mut q, 0, 0);
        let b = take(&mut q, 1, 0);
        q.progress(1, b.lease, 5).unwrap();
        let _ = take(&mut q, 0, a.lease); // a done
        let saved = q.save();
        let json = serde_json::to_string(&saved).unwrap();
        let mut r = TaskQueue::restore(serde_json::from_str(&json).unwrap()).unwrap();
        let mut got = Vec::new();
        let mut lease = 0;
        loop {
            match r.next(0, lease, None, |_| true).0 {
                Handout::Task(t) if t.epoch == 0 => {
                    got.push((t.piece_index, t.skip_examples));
                    lease = t.lease;
                }
                _ => break,
            }
        }
        got.sort_unstable();
        let mut want: Vec<(u32, u64)> = (0..4)
            .filter(|&p| p != a.piece_index)
            .map(|p| (p, if p == b.piece_index { 5 } else { 0 }))
            .collect();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    // Found by the `data_tasks` fuzz target: a state listing an epoch at or after
    // `next_epoch` restored, and the queue then opened that epoch again and handed out pieces
    // done before the checkpoint.
    #[test]
    fn states_no_queue_can_save_are_refused() {
        let state = |next_epoch, epochs: Vec<u64>, unscored: Vec<u64>| SavedTasks {
            plan: plan(2, 2),
            next_epoch,
            epochs: epochs
                .into_iter()
                .map(|epoch| SavedEpoch { epoch, done: vec![0], progress: vec![], examples: 1 })
                .collect(),
            unscored: unscored.into_iter().map(|e| (e, 1)).collect(),
        };
        let refused = |s: SavedTasks| TaskQueue::restore(s).err().expect("refused").to_string();
        assert!(refused(state(0, vec![0], vec![])).contains("epoch 0 is open"));
        assert!(refused(state(1, vec![], vec![1])).contains("the next epoch to open is 1"));
        assert!(refused(state(2, vec![1], vec![1])).contains("epoch 1 is listed twice"));
        assert!(refused(state(3, vec![], vec![])).contains("plan of 2 epochs"));
        let ok = TaskQueue::restore(state(2, vec![1], vec![0])).unwrap();
        assert_eq!(ok.save(), state(2, vec![1], vec![0]));
    }

    #[test]
    fn bad_plans_are_refused() {
        assert!(plan(0, 1).validate().is_err());
        assert!(plan(1, 0).validate().is_err());
        let mut p = plan(1, 1);
        p.pieces[0].start = 11;
        assert!(p.validate().unwrap_err().to_string().contains("starts at 11"));
    }
}
