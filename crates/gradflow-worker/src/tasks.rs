//! Dynamic data sharding from the worker's side: declaring the job's data tasks, asking
//! shard 0 for the next one, and reporting progress with each push.
//!
//! ```no_run
//! # use gradflow_worker::{Worker, TaskHandout, TaskPiece};
//! # async fn run(worker: &mut Worker, pieces: Vec<TaskPiece>) -> Result<(), gradflow_worker::WorkerError> {
//! worker.declare_tasks(&pieces, /* epochs */ 1, /* seed */ 0).await?;
//! let mut done = 0;
//! loop {
//!     match worker.next_task(done, None).await?.handout {
//!         TaskHandout::Task(task) => {
//!             // read task.piece, skipping task.skip_examples examples; for every batch:
//!             //   pull, compute, push, then
//!             //   worker.set_task_progress(task.lease, examples_so_far); worker.step().await?;
//!             done = task.lease;
//!         }
//!         TaskHandout::Wait => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
//!         TaskHandout::Finished => break,
//!     }
//! }
//! # Ok(()) }
//! ```

use gradflow_proto::pb;
use gradflow_proto::pb::next_task_response::State;

use crate::{Worker, WorkerError};

/// A byte range of a training file: the lines that start in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPiece {
    pub path: String,
    pub start: u64,
    pub end: u64,
}

/// A data task this worker is to train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataTask {
    /// Quote it in [`Worker::set_task_progress`] and, when done, in [`Worker::next_task`].
    pub lease: u64,
    pub epoch: u64,
    /// The piece's index in the declared plan (with `epoch`, it names the task's example order).
    pub piece_index: u32,
    pub piece: TaskPiece,
    /// Examples of the task already in the model (trained by a worker that went away): skip
    /// them.
    pub skip_examples: u64,
}

/// The answer to [`Worker::next_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskHandout {
    Task(DataTask),
    /// Every task of the open epochs is being trained by someone: ask again shortly.
    Wait,
    /// Every task of every epoch is done.
    Finished,
}

/// What [`Worker::next_task`] returns: the handout, and the epoch the finished task completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextTask {
    pub handout: TaskHandout,
    /// Set when this worker is to score the model for a completed epoch: the epoch, and the
    /// examples it put in the model. Report it done with the next call's `scored_epoch`; it
    /// goes to another worker if this one is gone first.
    pub completed_epoch: Option<(u64, u64)>,
}

impl Worker {
    /// Declares the job's data tasks on shard 0: every epoch trains each piece once, in an
    /// order drawn from `seed`. The first call creates the queue (or picks up the one restored
    /// from a checkpoint); the same plan again is a no-op; a different one is refused.
    /// Returns whether this call created the queue.
    pub async fn declare_tasks(
        &self,
        pieces: &[TaskPiece],
        epochs: u64,
        seed: u64,
    ) -> Result<bool, WorkerError> {
        let req = pb::DeclareTasksRequest {
            worker: self.index(),
            pieces: pieces
                .iter()
                .map(|p| pb::TaskPiece { path: p.path.clone(), start: p.start, end: p.end })
                .collect(),
            epochs,
            seed,
        };
        let resp = self.call(0, "DeclareTasks", |mut c| {
            let req = req.clone();
            async move { c.declare_tasks(req).await }
        });
        Ok(resp.await?.into_inner().created)
    }

    /// Finishes the task of `done_lease` (0: none), reports the epoch this worker scored
    /// (if any), and asks shard 0 for the next task. Asking again without finishing returns
    /// the task this worker holds.
    pub async fn next_task(
        &self,
        done_lease: u64,
        scored_epoch: Option<u64>,
    ) -> Result<NextTask, WorkerError> {
        let scored_epoch = scored_epoch.map_or(0, |e| e + 1);
        let req = pb::NextTaskRequest { worker: self.index(), done_lease, scored_epoch };
        let r = self.call(0, "NextTask", |mut c| async move { c.next_task(req).await }).await?.into_inner();
        let completed_epoch = r.completed_epoch.checked_sub(1).map(|e| (e, r.completed_epoch_examples));
        let handout = match State::try_from(r.state) {
            Ok(State::Task) => {
                let p = r.piece.ok_or_else(|| WorkerError::Protocol {
                    shard: 0,
                    message: "NextTask: a task without its piece".into(),
                })?;
                TaskHandout::Task(DataTask {
                    lease: r.lease,
                    epoch: r.epoch,
                    piece_index: r.piece_index,
                    piece: TaskPiece { path: p.path, start: p.start, end: p.end },
                    skip_examples: r.skip_examples,
                })
            }
            Ok(State::Wait) => TaskHandout::Wait,
            Ok(State::Finished) => TaskHandout::Finished,
            Err(_) => {
                return Err(WorkerError::Protocol {
                    shard: 0,
                    message: format!("NextTask: unknown state {}", r.state),
                });
            }
        };
        Ok(NextTask { handout, completed_epoch })
    }

    /// Tells every shard this worker is idle (no task free for it): steps stop waiting for
    /// it until its next push. Heartbeats go on, so it stays in the job.
    pub async fn pause(&self) -> Result<(), WorkerError> {
        let me = self.index();
        futures::future::try_join_all((0..self.num_shards()).map(|shard| {
            self.call(shard, "Leave", move |mut c| async move {
                c.leave(pb::LeaveRequest { worker: me, pause: true }).await
            })
        }))
        .await?;
        Ok(())
    }

    /// Says that after this step's batch, `examples` examples of the task `lease` are trained.
    /// The next [`Worker::step`] carries it to shard 0, which records it only if it takes the
    /// push; if the task was handed to another worker meanwhile, that push fails with
    /// FAILED_PRECONDITION and changes nothing on shard 0.
    pub fn set_task_progress(&mut self, lease: u64, examples: u64) {
        self.task_progress = Some(pb::TaskProgress { lease, examples });
    }
}
