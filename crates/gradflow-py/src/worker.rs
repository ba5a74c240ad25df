//! `gradflow.Worker`: one worker's connection to every server shard, the Rust worker library
//! behind a Python class (placement, the tensor link, retries, auth and TLS are that
//! library's).
//!
//! Arrays pass without copies where their layout allows: pulls write straight into the
//! caller's float32 arrays (a CPU torch tensor's `.numpy()` shares its memory), pushes read
//! the caller's arrays in place, pulled sparse rows come back as a numpy array that owns the
//! pulled buffer. Network calls release the GIL.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use gradflow_core::{Mode, ModelSpec};
use gradflow_job::{ClusterSpec, JobConfig};
use gradflow_worker::{StepOutcome, Worker, WorkerConfig};
use numpy::{PyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use crate::batches::Batches;
use crate::{error, runtime};

/// What became of a step, as `step()` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The servers had moved on without this worker; the gradients were discarded.
    Stale,
    /// Dynamic sharding: the task was handed to another worker; nothing of the batch counted.
    LeaseLost,
}

/// What the last `step()` reported, for the batch iterator's bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct Stepped {
    pub outcome: Outcome,
    pub loss: Option<f64>,
}

/// A worker of a gradflow job (see the package docs).
#[pyclass(module = "gradflow._gradflow", frozen, name = "Worker")]
pub struct PyWorker {
    inner: Mutex<Option<Worker>>,
    /// The job, when the worker was started by a launcher (`from_env`).
    pub job: Option<JobConfig>,
    pub index: u32,
    pub num_workers: u32,
    stepped: Mutex<Option<Stepped>>,
}

impl PyWorker {
    /// The connected worker, for the batch iterator; fails after `leave()`.
    pub fn lock(&self) -> PyResult<MutexGuard<'_, Option<Worker>>> {
        let guard =
            self.inner.lock().map_err(|_| error::other("a previous call panicked inside the worker"))?;
        if guard.is_none() {
            return Err(error::other("this worker has left the job (leave() was called)"));
        }
        Ok(guard)
    }

    /// Takes what the last `step()` reported (once).
    pub fn take_stepped(&self) -> Option<Stepped> {
        self.stepped.lock().ok().and_then(|mut s| s.take())
    }

    /// Runs `f` on the worker with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Worker) -> Result<T, gradflow_worker::WorkerError> + Send,
    ) -> PyResult<T> {
        self.run(py, |w| f(w).map_err(error::worker))
    }

    /// Runs `f` on the worker with the GIL released; `f` says how its errors are raised.
    pub fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Worker) -> PyResult<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut guard = self.lock()?;
            f(guard.as_mut().expect("lock() checked"))
        })
    }

    /// Sync mode: joins the step the servers are on (a restarted worker, or one back from a
    /// pause or a lost task), as the built-in trainer does.
    pub fn catch_up(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |w| runtime().block_on(gradflow_trainer::catch_up(w)).map_err(error::train))
    }

    fn connect(
        py: Python<'_>,
        config: WorkerConfig,
        job: Option<JobConfig>,
        num_workers: u32,
    ) -> PyResult<Self> {
        let index = config.worker;
        let worker = py.detach(|| runtime().block_on(Worker::connect(config))).map_err(error::worker)?;
        Ok(PyWorker { inner: Mutex::new(Some(worker)), job, index, num_workers, stepped: Mutex::new(None) })
    }
}

/// Ids as the worker library takes them: int64 (reinterpreted bit for bit) or uint64 arrays.
fn ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'_, i64>>() {
        return Ok(a.as_array().iter().map(|&v| v as u64).collect());
    }
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'_, u64>>() {
        return Ok(a.as_array().iter().copied().collect());
    }
    Err(error::value(format!(
        "ids: expected a numpy array of int64 or uint64 (a CPU torch tensor: .numpy()), found {}",
        obj.get_type().name()?
    )))
}

/// A read-only view of a contiguous float32 array.
fn floats<'a>(name: &str, a: &'a PyReadonlyArrayDyn<'_, f32>) -> PyResult<&'a [f32]> {
    a.as_slice().map_err(|_| error::value(format!("{name}: expected a contiguous float32 array")))
}

#[pymethods]
impl PyWorker {
    /// Connects to the servers as worker `index`. For trainers started by `gradflow launch`
    /// use `Worker.from_env()` instead, which reads everything from the launcher.
    #[new]
    #[pyo3(signature = (servers, index, *, num_workers = 1, tensor_link = true))]
    fn new(
        py: Python<'_>,
        servers: Vec<String>,
        index: u32,
        num_workers: u32,
        tensor_link: bool,
    ) -> PyResult<Self> {
        if servers.is_empty() {
            return Err(error::value("servers: expected at least one address (host:port)"));
        }
        let mut config = WorkerConfig::new(servers, index);
        config.transport.tensor_link = tensor_link;
        config.validate().map_err(error::other)?;
        PyWorker::connect(py, config, None, num_workers)
    }

    /// Connects as the worker the launcher started: servers, index, transport, heartbeats,
    /// auth and TLS from the environment contract (`GRADFLOW_CLUSTER_SPEC`).
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<Self> {
        let cluster = ClusterSpec::from_env().map_err(|e| {
            error::other(format!(
                "{e}: Worker.from_env() reads the environment `gradflow launch` gives a worker; run this program through a job file's [worker] command, or connect with Worker(servers, index)"
            ))
        })?;
        let job = cluster.job_config;
        let mut config = WorkerConfig::new(cluster.servers, cluster.index);
        config.partition_bytes = job.server.partition_bytes;
        config.transport = job.transport.clone();
        config.heartbeat_interval = (job.server.heartbeat_timeout / 5).max(Duration::from_millis(20));
        config.startup_timeout = job.server.startup_timeout;
        config.tls = job.client_tls();
        PyWorker::connect(py, config, Some(job), cluster.num_workers)
    }

    /// This worker's index.
    #[getter]
    fn index(&self) -> u32 {
        self.index
    }

    /// Workers in the job.
    #[getter]
    fn num_workers(&self) -> u32 {
        self.num_workers
    }

    /// The step this worker is on.
    #[getter]
    fn current_step(&self) -> PyResult<u64> {
        Ok(self.lock()?.as_ref().expect("lock() checked").current_step())
    }

    /// The job file as JSON (None for a worker made with `Worker(servers, index)`).
    #[getter]
    fn job_json(&self) -> Option<String> {
        self.job.as_ref().map(|j| serde_json::to_string(j).expect("a job serializes"))
    }

    /// "sync" or "async" (from the job; None without one).
    #[getter]
    fn mode(&self) -> Option<String> {
        self.job.as_ref().map(|j| j.mode.to_string())
    }

    /// Declares the model (a gradflow ModelSpec as JSON); every worker declares the same.
    /// In a sync job it then joins the step the servers are on (a restarted worker).
    fn declare(&self, py: Python<'_>, spec_json: &str) -> PyResult<()> {
        let spec: ModelSpec =
            serde_json::from_str(spec_json).map_err(|e| error::value(format!("model spec: {e}")))?;
        let sync = self.job.as_ref().is_some_and(|j| j.mode == Mode::Sync);
        self.with(py, |w| runtime().block_on(w.declare(spec)))?;
        if sync {
            self.catch_up(py)?;
        }
        Ok(())
    }

    /// The declared model spec as JSON.
    fn spec_json(&self) -> PyResult<String> {
        let guard = self.lock()?;
        let spec = guard.as_ref().expect("lock() checked").spec().map_err(error::worker)?;
        Ok(serde_json::to_string(spec).expect("a spec serializes"))
    }

    /// Pulls the named dense tensors into `out` (writable contiguous float32 arrays, each
    /// exactly the tensor's size), in place. In sync mode this waits for the step's model.
    fn pull_dense(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        mut out: Vec<PyReadwriteArrayDyn<'_, f32>>,
    ) -> PyResult<()> {
        if names.len() != out.len() {
            return Err(error::value(format!("{} names but {} arrays", names.len(), out.len())));
        }
        let mut slices = Vec::with_capacity(out.len());
        for (name, a) in names.iter().zip(out.iter_mut()) {
            slices.push(a.as_slice_mut().map_err(|_| {
                error::value(format!("{name}: expected a writable contiguous float32 array"))
            })?);
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.with(py, |w| runtime().block_on(w.pull_dense(&refs, &mut slices)))
    }

    /// Pulls the rows of `ids` from sparse table `table`: a float32 array of
    /// `len(ids) * dim` values, row after row in the order of `ids`. Rows are created on
    /// first touch.
    fn pull_sparse<'py>(
        &self,
        py: Python<'py>,
        table: &str,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let ids = self::ids(ids)?;
        let mut out = Vec::new();
        self.with(py, |w| runtime().block_on(w.pull_sparse(table, &ids, &mut out)))?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// Pulls the rows of `ids` from several sparse tables at once (one request per shard for
    /// all of them): one float32 array per table, as `pull_sparse` returns it.
    fn pull_sparse_many<'py>(
        &self,
        py: Python<'py>,
        tables: Vec<String>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyArray1<f32>>>> {
        let ids = self::ids(ids)?;
        let requests: Vec<(&str, &[u64])> = tables.iter().map(|t| (t.as_str(), ids.as_slice())).collect();
        let mut out = vec![Vec::new(); tables.len()];
        self.with(py, |w| runtime().block_on(w.pull_sparse_many(&requests, &mut out)))?;
        Ok(out.into_iter().map(|v| PyArray1::from_vec(py, v)).collect())
    }

    /// Stages the gradient of dense tensor `name` (a contiguous float32 array of its size)
    /// for the next `step()`.
    fn push_dense(&self, name: &str, grad: PyReadonlyArrayDyn<'_, f32>) -> PyResult<()> {
        let grad = floats(name, &grad)?;
        let mut guard = self.lock()?;
        guard.as_mut().expect("lock() checked").push_dense(name, grad).map_err(error::worker)
    }

    /// Stages gradient rows of sparse table `table` (`len(ids) * dim` float32 values, row
    /// after row) for the next `step()`. Repeated ids are summed.
    fn push_sparse(
        &self,
        table: &str,
        ids: &Bound<'_, PyAny>,
        grads: PyReadonlyArrayDyn<'_, f32>,
    ) -> PyResult<()> {
        let ids = self::ids(ids)?;
        let grads = floats(table, &grads)?;
        let mut guard = self.lock()?;
        guard.as_mut().expect("lock() checked").push_sparse(table, &ids, grads).map_err(error::worker)
    }

    /// Sends the staged gradients to every shard and completes the step. Returns "applied";
    /// "stale" when the servers had moved on without this worker (its gradients were
    /// discarded; it continues at the servers' step); with dynamic sharding "lease_lost" when
    /// its data task went to another worker while it was unreachable. `loss`, the batch's
    /// training loss, is what progress reports show.
    #[pyo3(signature = (loss = None))]
    fn step(&self, py: Python<'_>, loss: Option<f64>) -> PyResult<&'static str> {
        let outcome = self.with(py, |w| match runtime().block_on(w.step()) {
            Ok(StepOutcome::Applied) => Ok(Outcome::Applied),
            Ok(StepOutcome::Stale { .. }) => Ok(Outcome::Stale),
            Err(e) if e.is_lease_lost() => Ok(Outcome::LeaseLost),
            Err(e) => Err(e),
        })?;
        if let Ok(mut s) = self.stepped.lock() {
            *s = Some(Stepped { outcome, loss });
        }
        Ok(match outcome {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::LeaseLost => "lease_lost",
        })
    }

    /// Every shard's status as JSON objects (`version`: the shard's step, ...).
    fn status(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let shards = self.with(py, |w| runtime().block_on(w.status()))?;
        Ok(shards
            .iter()
            .map(|s| {
                serde_json::json!({
                    "shard": s.shard,
                    "mode": s.mode,
                    "version": s.version,
                    "live_workers": s.live_workers,
                    "sparse_rows": s.sparse_rows,
                    "scored_epochs": s.scored_epochs,
                })
                .to_string()
            })
            .collect())
    }

    /// Leaves the job: the servers stop waiting for this worker. The worker cannot be used
    /// afterwards.
    fn leave(&self, py: Python<'_>) -> PyResult<()> {
        let worker = {
            let mut guard = self.lock()?;
            guard.take().expect("lock() checked")
        };
        py.detach(|| runtime().block_on(worker.leave())).map_err(error::worker)
    }

    /// The job's training data, this worker's share of it, as an iterator of batches (see
    /// `gradflow.Worker.batches`).
    #[pyo3(signature = (evaluate = None))]
    fn batches(slf: Bound<'_, Self>, evaluate: Option<Py<PyAny>>) -> PyResult<Batches> {
        Batches::new(slf, evaluate)
    }
}
