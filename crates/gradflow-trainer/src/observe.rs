//! What a worker records about its own training besides the results line: TensorBoard
//! scalars in `<output dir>/tensorboard/<run id>/worker-<i>/` and the mean training loss of
//! each epoch, which the results line carries.
//!
//! Scalars (tags): at every progress report `train/loss`, `train/samples_per_sec` and the
//! step time split `step_seconds/{data,pull,compute,push}`; worker 0 also `shard-<s>/model_version`
//! of every shard; at every evaluation `test/auc`, `test/loss`, `test/accuracy` and
//! `train/epoch_loss`. Recording never stops training: a folder that cannot be written is
//! said once in the log and the scalars are dropped.

use std::collections::BTreeMap;

use gradflow_job::JobConfig;
use gradflow_job::contract::ENV_RUN_ID;
use gradflow_tensorboard::EventWriter;
use tracing::warn;

use crate::Scores;

/// Seconds a window of steps spent in each phase of a step.
///
/// The built-in loop reads the next batch while the step waits for the servers, so `data`
/// overlaps `push`: a step's wall time is about `pull + compute + push` (plus `data` for the
/// first batch and wherever reading takes longer than the servers' answer), and the four can
/// add up to more than it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// Reading, parsing and scaling a batch (the next one, read during the step's `push`).
    pub data: f64,
    /// Pulling the parameters the batch needs.
    pub pull: f64,
    /// Forward and backward pass.
    pub compute: f64,
    /// Pushing the gradients and completing the step (reading the next batch meanwhile).
    pub push: f64,
}

impl Phases {
    /// Each phase divided by `steps` (the mean time per step).
    pub fn per_step(&self, steps: u64) -> Phases {
        let n = steps.max(1) as f64;
        Phases { data: self.data / n, pull: self.pull / n, compute: self.compute / n, push: self.push / n }
    }
}

/// One worker's scalars and per-epoch losses.
pub(crate) struct Recorder {
    index: u32,
    events: Option<EventWriter>,
    /// Per epoch (as the trainer numbers them): the sum of batch losses and the batches.
    epoch_loss: BTreeMap<u64, (f64, u64)>,
}

/// The run id the launcher gave (`GRADFLOW_RUN_ID`), else one of this process's own.
pub(crate) fn run_id(job: &JobConfig) -> String {
    std::env::var(ENV_RUN_ID)
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| gradflow_job::contract::new_run_id(&job.name))
}

impl Recorder {
    /// A recorder for worker `index` of `job`, writing its event file under the run's
    /// TensorBoard folder.
    pub(crate) fn open(job: &JobConfig, index: u32) -> Recorder {
        let dir = job.tensorboard_dir(&run_id(job)).join(format!("worker-{index}"));
        let events = match EventWriter::create(&dir) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(worker = index, "no TensorBoard scalars for this worker: {e}");
                None
            }
        };
        Recorder { index, events, epoch_loss: BTreeMap::new() }
    }

    /// Counts one trained batch's loss in `epoch`.
    pub(crate) fn batch(&mut self, epoch: u64, loss: f32) {
        let e = self.epoch_loss.entry(epoch).or_default();
        e.0 += loss as f64;
        e.1 += 1;
    }

    /// The mean loss of this worker's batches in `epoch`, if it trained any.
    pub(crate) fn epoch_loss(&self, epoch: u64) -> Option<f64> {
        self.epoch_loss.get(&epoch).filter(|(_, n)| *n > 0).map(|(sum, n)| sum / *n as f64)
    }

    /// A progress report: the window's mean loss, samples/s and time per step in each phase.
    pub(crate) fn progress(&mut self, step: u64, loss: f64, samples_per_sec: f64, per_step: Phases) {
        self.write(
            step,
            &[
                ("train/loss", loss),
                ("train/samples_per_sec", samples_per_sec),
                ("step_seconds/data", per_step.data),
                ("step_seconds/pull", per_step.pull),
                ("step_seconds/compute", per_step.compute),
                ("step_seconds/push", per_step.push),
            ],
        );
    }

    /// Every shard's model version (its step) at `step`.
    pub(crate) fn shard_versions(&mut self, step: u64, versions: &[u64]) {
        let tags: Vec<String> = (0..versions.len()).map(|s| format!("shard-{s}/model_version")).collect();
        let values: Vec<(&str, f64)> =
            tags.iter().map(String::as_str).zip(versions.iter().map(|&v| v as f64)).collect();
        self.write(step, &values);
    }

    /// An evaluation at `step` after `epoch`, with the epoch's mean training loss if known.
    pub(crate) fn eval(&mut self, step: u64, scores: &Scores, train_loss: Option<f64>) {
        let mut values =
            vec![("test/auc", scores.auc), ("test/loss", scores.loss), ("test/accuracy", scores.accuracy)];
        if let Some(l) = train_loss {
            values.push(("train/epoch_loss", l));
        }
        self.write(step, &values);
    }

    /// Writes and flushes, so that TensorBoard sees the values while the job runs.
    fn write(&mut self, step: u64, values: &[(&str, f64)]) {
        let Some(events) = &mut self.events else { return };
        if let Err(e) = events.scalars(step, values).and_then(|()| events.flush()) {
            warn!(worker = self.index, "no more TensorBoard scalars for this worker: {e}");
            self.events = None;
        }
    }
}
