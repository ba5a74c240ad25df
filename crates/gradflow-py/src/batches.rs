//! `Worker.batches()`: the job's `[data]`, this worker's share of it, as an iterator of
//! batches, with the bookkeeping of the built-in trainer around each batch: the same readers
//! and formats (gradflow-data), the same static sharding and example order, the same
//! standardization, progress events every `log_every_steps`, and at the end of each epoch
//! the scorer (worker 0) evaluates the model while the servers hold the next step, writes the
//! same results line and `eval` event, and tells the servers. A restarted worker skips the
//! batches the job already trained, as the built-in one does.
//!
//! With `data.sharding = "dynamic"` the batches come from the data tasks shard 0 hands out,
//! as in the built-in trainer: a batch whose gradients the servers discarded is handed out
//! again (every example of an epoch is in the model once), a task handed to another worker
//! is dropped, and the worker that completes an epoch scores it.

use std::time::{Duration, Instant};

use gradflow_core::Mode;
use gradflow_data::{Batch, Reader, ShardSpec, Standardizer, metrics};
use gradflow_job::{Event, JobConfig, Sharding};
use gradflow_worker::{DataTask, TaskHandout};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tracing::{info, warn};

use crate::worker::{Outcome, PyWorker};
use crate::{error, runtime};

/// One batch, as numpy arrays (`n` examples, `nnz` sparse entries).
#[pyclass(module = "gradflow._gradflow", frozen, name = "Batch")]
pub struct PyBatch {
    /// float32 `[n]`.
    #[pyo3(get)]
    labels: Py<PyAny>,
    /// float32 `[n, num_dense]`, standardized when the job says so.
    #[pyo3(get)]
    dense: Py<PyAny>,
    /// int64 `[n + 1]`: the entries of example `i` are `offsets[i]..offsets[i + 1]`.
    #[pyo3(get)]
    sparse_offsets: Py<PyAny>,
    /// int64 `[nnz]`: the example of each entry.
    #[pyo3(get)]
    sparse_examples: Py<PyAny>,
    /// int64 `[nnz]`: the field (categorical column) of each entry.
    #[pyo3(get)]
    sparse_fields: Py<PyAny>,
    /// uint64 `[nnz]`: the id of each entry (hashed from column and value, as in
    /// docs/serving.md; `gradflow.bucket(ids, n)` maps them to `n` rows).
    #[pyo3(get)]
    sparse_ids: Py<PyAny>,
    /// float32 `[nnz]`: the value of each entry (1 for a categorical value).
    #[pyo3(get)]
    sparse_values: Py<PyAny>,
    /// The epoch (0-based) the batch belongs to.
    #[pyo3(get)]
    epoch: u64,
    /// The step the batch trains.
    #[pyo3(get)]
    step: u64,
    len: usize,
}

#[pymethods]
impl PyBatch {
    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<gradflow Batch of {} examples, epoch {}, step {}>", self.len, self.epoch, self.step)
    }
}

impl PyBatch {
    fn new(py: Python<'_>, b: &Batch, epoch: u64, step: u64) -> PyResult<PyBatch> {
        let n = b.len();
        let examples: Vec<i64> =
            (0..n).flat_map(|i| std::iter::repeat_n(i as i64, b.sparse_range(i).len())).collect();
        let ints = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
        Ok(PyBatch {
            labels: PyArray1::from_vec(py, b.labels.clone()).into_any().unbind(),
            dense: PyArray1::from_vec(py, b.dense.clone()).reshape([n, b.num_dense])?.into_any().unbind(),
            sparse_offsets: PyArray1::from_vec(py, ints(&b.sparse_offsets)).into_any().unbind(),
            sparse_examples: PyArray1::from_vec(py, examples).into_any().unbind(),
            sparse_fields: PyArray1::from_vec(py, b.sparse_fields.iter().map(|&f| f as i64).collect())
                .into_any()
                .unbind(),
            sparse_ids: PyArray1::from_vec(py, b.sparse_ids.clone()).into_any().unbind(),
            sparse_values: PyArray1::from_vec(py, b.sparse_values.clone()).into_any().unbind(),
            epoch,
            step,
            len: n,
        })
    }
}

/// The batch handed out last, until the trainer has stepped it.
struct Pending {
    examples: usize,
    epoch: u64,
    step: u64,
    /// The epoch's last batch, on the scorer: score after it.
    ends_epoch: bool,
    /// The batch itself, handed out again when the servers discard it (dynamic sharding).
    batch: Py<PyBatch>,
}

/// Dynamic sharding: the task being trained and what to tell shard 0 next.
#[derive(Default)]
struct Tasks {
    current: Option<(Reader, DataTask)>,
    /// Examples of the current task in the model.
    examples: u64,
    /// The lease of the task finished last, to report with the next request.
    done: u64,
    /// The epoch scored last, to report with the next request.
    scored: Option<u64>,
    paused: bool,
}

/// Losses and examples since the last progress event.
struct Window {
    loss: f64,
    losses: u64,
    batches: u64,
    examples: u64,
    start: Instant,
}

impl Window {
    fn new() -> Window {
        Window { loss: 0.0, losses: 0, batches: 0, examples: 0, start: Instant::now() }
    }
}

/// The iterator `Worker.batches()` returns.
#[pyclass(module = "gradflow._gradflow", unsendable)]
pub struct Batches {
    worker: Py<PyWorker>,
    job: JobConfig,
    index: u32,
    reader: Reader,
    batch: Batch,
    scaler: Option<Standardizer>,
    evaluate: Option<Py<PyAny>>,
    scorer: bool,
    started: bool,
    finished: bool,
    pending: Option<Pending>,
    steps: u64,
    examples: u64,
    window: Window,
    /// Mean training loss of the current epoch (for the results line).
    epoch_loss: (f64, u64),
    /// Set with dynamic sharding.
    tasks: Option<Tasks>,
}

impl Batches {
    pub fn new(worker: Bound<'_, PyWorker>, evaluate: Option<Py<PyAny>>) -> PyResult<Batches> {
        let w = worker.get();
        let job = w.job.clone().ok_or_else(|| {
            error::other("batches() reads the job's [data]: make the worker with Worker.from_env() in a program `gradflow launch` starts")
        })?;
        let shard = ShardSpec::new(w.index as usize, w.num_workers as usize).map_err(error::other)?;
        let reader = Reader::open(&job.train_reader(), shard).map_err(error::other)?;
        let scaler = gradflow_trainer::standardizer(&job).map_err(error::train)?;
        let has_test = job.test_reader().is_some();
        let dynamic = job.data.sharding == Sharding::Dynamic;
        // Statically, worker 0 scores; dynamically, whichever worker completes an epoch.
        if (w.index == 0 || dynamic) && has_test && evaluate.is_none() {
            warn!("the job has test data but batches() was given no evaluate function: nothing is scored");
        }
        Ok(Batches {
            index: w.index,
            batch: Batch::new(reader.num_dense()),
            scorer: (w.index == 0 || dynamic) && has_test && evaluate.is_some(),
            worker: worker.unbind(),
            job,
            reader,
            scaler,
            evaluate,
            started: false,
            finished: false,
            pending: None,
            steps: 0,
            examples: 0,
            window: Window::new(),
            epoch_loss: (0.0, 0),
            tasks: None,
        })
    }

    fn step_now(&self, py: Python<'_>) -> PyResult<u64> {
        let w = self.worker.bind(py).get();
        Ok(w.lock()?.as_ref().expect("lock() checked").current_step())
    }

    /// Runs `f` on the worker with the GIL released.
    fn on_worker<T: Send>(
        &self,
        py: Python<'_>,
        f: impl AsyncFnOnce(&mut gradflow_worker::Worker) -> Result<T, gradflow_worker::WorkerError> + Send,
    ) -> PyResult<T> {
        self.worker.bind(py).get().run(py, |w| runtime().block_on(f(w)).map_err(error::worker))
    }

    fn catch_up(&self, py: Python<'_>) -> PyResult<()> {
        self.worker.bind(py).get().catch_up(py)
    }

    /// Reads the next batch into `self.batch` (scaled); 0 at the end.
    fn read(&mut self) -> PyResult<usize> {
        let n = self.reader.next_batch(&mut self.batch, self.job.train.batch_size).map_err(error::other)?;
        if let (Some(s), true) = (&self.scaler, n > 0) {
            s.apply(&mut self.batch);
        }
        Ok(n)
    }

    /// The first call: a worker that joins at step k (a restart) skips the k batches of its
    /// share the job trained already, and the scorer scores an epoch whose end it missed.
    fn start(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.job.data.sharding == Sharding::Dynamic {
            let pieces = gradflow_trainer::task_pieces(&self.job).map_err(error::train)?;
            let (epochs, seed) = (self.job.train.epochs, self.job.train.seed);
            let created = self.on_worker(py, async |w| w.declare_tasks(&pieces, epochs, seed).await)?;
            info!(worker = self.index, tasks = pieces.len(), created, "data tasks declared");
            self.tasks = Some(Tasks::default());
            return Ok(());
        }
        let first = self.step_now(py)?;
        if first == 0 {
            return Ok(());
        }
        let mut ends = Vec::new();
        for step in 0..first {
            if self.read()? == 0 {
                break;
            }
            if self.reader.end_of_epoch() {
                ends.push((self.reader.epoch(), step));
            }
        }
        info!(worker = self.index, batches = first, "skipped the batches trained before this step");
        if !self.scorer || ends.is_empty() {
            return Ok(());
        }
        let shards = self.on_worker(py, async |w| w.status().await)?;
        let scored_epochs = shards.first().and_then(|s| s.scored_epochs);
        for (epoch, step) in ends {
            let scored = match scored_epochs {
                Some(n) => epoch < n,
                None => step + 1 < first,
            };
            if scored {
                continue;
            }
            if step + 1 == first {
                self.score(py, epoch, step)?;
            } else {
                warn!(
                    worker = self.index,
                    epoch = epoch + 1,
                    "epoch {} ended at step {} but was not scored, and the servers are at step {first}: its score is missing from the results",
                    epoch + 1,
                    step + 1
                );
            }
        }
        Ok(())
    }

    /// Counts the pending batch once its step is done, and reports progress.
    fn finish_pending(&mut self, py: Python<'_>, pending: Pending) -> PyResult<()> {
        let stepped = self.worker.bind(py).get().take_stepped().ok_or_else(|| {
            PyRuntimeError::new_err(
                "the previous batch was not stepped: call step() (worker.step() or ServerModel.step()) once per batch before taking the next one",
            )
        })?;
        if let Some(tasks) = &mut self.tasks {
            match stepped.outcome {
                Outcome::Applied => tasks.examples += pending.examples as u64,
                Outcome::Stale => {
                    // Trained again, so that every example of the epoch is in the model once.
                    self.pending = Some(pending);
                    return Ok(());
                }
                Outcome::LeaseLost => {
                    warn!(
                        worker = self.index,
                        "this worker's task was handed to another worker while it was unreachable; asking for a new one"
                    );
                    tasks.current = None;
                    if self.job.mode == Mode::Sync {
                        self.catch_up(py)?;
                    }
                    return Ok(());
                }
            }
        } else if stepped.outcome != Outcome::Applied {
            warn!(worker = self.index, "this batch's gradients were discarded: the servers had moved on");
        }
        self.steps += 1;
        self.examples += pending.examples as u64;
        let step = self.step_now(py)?;
        let w = &mut self.window;
        w.batches += 1;
        w.examples += pending.examples as u64;
        if let Some(loss) = stepped.loss.filter(|l| l.is_finite()) {
            w.loss += loss;
            w.losses += 1;
            self.epoch_loss.0 += loss;
            self.epoch_loss.1 += 1;
        }
        if self.steps % self.job.train.log_every_steps == 0 {
            let secs = w.start.elapsed().as_secs_f64().max(1e-9);
            let event = Event::Progress {
                worker: self.index,
                step,
                epoch: pending.epoch,
                samples: self.examples,
                loss: if w.losses > 0 { w.loss / w.losses as f64 } else { 0.0 },
                samples_per_sec: w.examples as f64 / secs,
            };
            emit(py, &event);
            self.window = Window::new();
        }
        if pending.ends_epoch {
            self.score(py, pending.epoch, pending.step)?;
        }
        Ok(())
    }

    /// Scores the model after `epoch` (0-based), whose last batch was step `step`, with the
    /// trainer's `evaluate` function, records the result and tells the servers.
    fn score(&mut self, py: Python<'_>, epoch: u64, step: u64) -> PyResult<()> {
        self.record_score(py, epoch, None)?;
        self.on_worker(py, async |w| w.scored(epoch, step).await)
    }

    /// Evaluates the model after `epoch` and records the result (once per run), with
    /// `trained`, the examples the epoch put in the model, when known.
    fn record_score(&mut self, py: Python<'_>, epoch: u64, trained: Option<u64>) -> PyResult<()> {
        let recorded = gradflow_trainer::recorded_result(&self.job, epoch + 1).map_err(error::train)?;
        if recorded.is_none() {
            let (loss, auc, accuracy, examples) = self.evaluate(py)?;
            let event = Event::Eval {
                worker: self.index,
                epoch: epoch + 1,
                step: self.step_now(py)?,
                test_loss: loss,
                test_auc: auc,
                test_accuracy: accuracy,
                test_examples: examples,
            };
            emit(py, &event);
            let (sum, n) = std::mem::take(&mut self.epoch_loss);
            let train_loss = (n > 0).then(|| sum / n as f64);
            gradflow_trainer::append_result(&self.job, &event, trained, train_loss).map_err(error::train)?;
        }
        Ok(())
    }

    /// Dynamic sharding: the next batch of the current task, asking shard 0 for tasks as
    /// they run out; `None` when every epoch is done.
    fn next_dynamic(&mut self, py: Python<'_>) -> PyResult<Option<(usize, u64)>> {
        let mut idle_wait = Duration::from_millis(10);
        loop {
            let tasks = self.tasks.as_mut().expect("dynamic");
            if let Some((reader, task)) = &mut tasks.current {
                let n =
                    reader.next_batch(&mut self.batch, self.job.train.batch_size).map_err(error::other)?;
                if n > 0 {
                    if let Some(s) = &self.scaler {
                        s.apply(&mut self.batch);
                    }
                    let (lease, epoch, progress) = (task.lease, task.epoch, tasks.examples + n as u64);
                    self.worker
                        .bind(py)
                        .get()
                        .lock()?
                        .as_mut()
                        .expect("lock() checked")
                        .set_task_progress(lease, progress);
                    return Ok(Some((n, epoch)));
                }
                tasks.done = task.lease;
                tasks.current = None;
            }
            let (done, scored) = (std::mem::take(&mut tasks.done), tasks.scored.take());
            let next = self.on_worker(py, async |w| w.next_task(done, scored).await)?;
            if let Some((epoch, examples)) = next.completed_epoch {
                info!(worker = self.index, epoch, examples, "epoch done; scoring the model");
                if self.scorer {
                    self.record_score(py, epoch, Some(examples))?;
                }
                self.tasks.as_mut().expect("dynamic").scored = Some(epoch);
            }
            let tasks = self.tasks.as_mut().expect("dynamic");
            match next.handout {
                TaskHandout::Finished => return Ok(None),
                TaskHandout::Wait => {
                    if !tasks.paused {
                        tasks.paused = true;
                        self.on_worker(py, async |w| w.pause().await)?;
                    }
                    py.detach(|| std::thread::sleep(idle_wait));
                    idle_wait = (idle_wait * 2).min(Duration::from_millis(200));
                }
                TaskHandout::Task(task) => {
                    idle_wait = Duration::from_millis(10);
                    let resumed = std::mem::take(&mut tasks.paused);
                    let mut reader = gradflow_trainer::task_reader(&self.job, &task).map_err(error::train)?;
                    if task.skip_examples > 0 {
                        gradflow_trainer::skip_examples(&mut reader, &mut self.batch, task.skip_examples)
                            .map_err(error::train)?;
                    }
                    tasks.examples = task.skip_examples;
                    tasks.current = Some((reader, task));
                    if resumed && self.job.mode == Mode::Sync {
                        self.catch_up(py)?;
                    }
                }
            }
        }
    }

    /// Test loss, AUC, accuracy and examples of the model the servers hold now.
    fn evaluate(&self, py: Python<'_>) -> PyResult<(f64, f64, f64, u64)> {
        let evaluate = self.evaluate.as_ref().expect("only the scorer scores").bind(py);
        let test = self.job.test_reader().expect("only the scorer scores");
        let mut reader =
            Reader::open(&test, ShardSpec::new(0, 1).map_err(error::other)?).map_err(error::other)?;
        let mut batch = Batch::new(reader.num_dense());
        let (mut labels, mut probs) = (Vec::new(), Vec::new());
        let step = self.step_now(py)?;
        loop {
            let n =
                reader.next_batch(&mut batch, self.job.train.batch_size.max(1024)).map_err(error::other)?;
            if n == 0 {
                break;
            }
            if let Some(s) = &self.scaler {
                s.apply(&mut batch);
            }
            let p = evaluate.call1((PyBatch::new(py, &batch, 0, step)?,))?;
            let p: PyReadonlyArray1<'_, f32> = p.extract().map_err(|_| {
                error::value("evaluate(batch) must return the batch's probabilities: a float32 array of one value per example")
            })?;
            let p = p.as_slice().map_err(|_| error::value("evaluate(batch): expected a contiguous array"))?;
            if p.len() != n {
                return Err(error::value(format!(
                    "evaluate(batch) returned {} probabilities for a batch of {n} examples",
                    p.len()
                )));
            }
            labels.extend_from_slice(&batch.labels);
            probs.extend_from_slice(p);
        }
        if labels.is_empty() {
            return Err(error::other("the test data has no examples"));
        }
        Ok((
            metrics::log_loss(&labels, &probs),
            metrics::auc(&labels, &probs),
            metrics::accuracy(&labels, &probs),
            labels.len() as u64,
        ))
    }
}

#[pymethods]
impl Batches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyBatch>>> {
        if self.finished {
            return Ok(None);
        }
        if !self.started {
            self.started = true;
            self.start(py)?;
        }
        if let Some(p) = self.pending.take() {
            self.finish_pending(py, p)?;
            if let Some(again) = &self.pending {
                // Discarded by the servers: the same batch once more.
                return Ok(Some(again.batch.clone_ref(py)));
            }
        }
        let step = self.step_now(py)?;
        let next = if self.job.train.max_steps.is_some_and(|m| step >= m) {
            None
        } else if self.tasks.is_some() {
            self.next_dynamic(py)?
        } else {
            let n = self.read()?;
            (n > 0).then(|| (n, self.reader.epoch()))
        };
        let Some((n, epoch)) = next else {
            self.finished = true;
            emit(py, &Event::Done { worker: self.index, step, samples: self.examples });
            return Ok(None);
        };
        let ends_epoch = self.tasks.is_none() && self.scorer && self.reader.end_of_epoch();
        if ends_epoch {
            self.on_worker(py, async |w| w.hold_for_scoring(epoch, step).await)?;
        }
        let batch = Py::new(py, PyBatch::new(py, &self.batch, epoch, step)?)?;
        self.pending = Some(Pending { examples: n, epoch, step, ends_epoch, batch: batch.clone_ref(py) });
        Ok(Some(batch))
    }

    /// Dense features per example (the data's dense columns).
    #[getter]
    fn num_dense(&self) -> usize {
        self.reader.num_dense()
    }

    /// Examples trained so far.
    #[getter]
    fn examples(&self) -> u64 {
        self.examples
    }
}

/// Prints `event` for the launcher, after whatever Python printed before it.
fn emit(py: Python<'_>, event: &Event) {
    if let Ok(sys) = py.import("sys")
        && let Ok(out) = sys.getattr("stdout")
    {
        let _ = out.call_method0("flush");
    }
    event.emit();
}
