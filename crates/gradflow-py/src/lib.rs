//! The native part of gradflow's Python package (`gradflow._gradflow`); the Python modules in
//! `python/gradflow/` wrap it (`gradflow.Worker`, `gradflow.torch`).
//!
//! - [`worker`]: `Worker`, the worker library's connection to the servers.
//! - [`batches`]: `Worker.batches()`, the job's data and the training loop's bookkeeping.
//! - [`error`]: Rust errors as Python exceptions, in one place.

mod batches;
mod error;
mod worker;

use std::sync::OnceLock;

use numpy::PyReadonlyArrayDyn;
use pyo3::prelude::*;

/// The tokio runtime every worker of the process shares. Its threads also run each worker's
/// heartbeats while Python computes.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gradflow")
            .enable_all()
            .build()
            .expect("cannot start gradflow's runtime threads")
    })
}

/// The initializer (as JSON) whose distribution matches `values`: what the servers draw a
/// tensor from when a framework's initial values cannot travel (see
/// `gradflow_worker::init`).
#[pyfunction]
#[pyo3(signature = (values, seed = 0))]
fn infer_initializer(values: PyReadonlyArrayDyn<'_, f32>, seed: u64) -> PyResult<String> {
    let init = match values.as_slice() {
        Ok(v) => gradflow_worker::init::infer_initializer(v, seed),
        Err(_) => {
            let v: Vec<f32> = values.as_array().iter().copied().collect();
            gradflow_worker::init::infer_initializer(&v, seed)
        }
    };
    Ok(serde_json::to_string(&init).expect("an initializer serializes"))
}

/// Test loss, AUC and accuracy of `probs` against `labels`, as gradflow reports them.
#[pyfunction]
fn scores(
    labels: PyReadonlyArrayDyn<'_, f32>,
    probs: PyReadonlyArrayDyn<'_, f32>,
) -> PyResult<(f64, f64, f64)> {
    let labels: Vec<f32> = labels.as_array().iter().copied().collect();
    let probs: Vec<f32> = probs.as_array().iter().copied().collect();
    if labels.len() != probs.len() || labels.is_empty() {
        return Err(error::value(format!(
            "expected as many probabilities as labels, at least one: {} labels, {} probabilities",
            labels.len(),
            probs.len()
        )));
    }
    use gradflow_data::metrics;
    Ok((
        metrics::log_loss(&labels, &probs),
        metrics::auc(&labels, &probs),
        metrics::accuracy(&labels, &probs),
    ))
}

#[pymodule]
fn _gradflow(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Log lines of the worker library on stderr, filtered by GRADFLOW_LOG as in every
    // gradflow process (default: warnings).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(std::env::var("GRADFLOW_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    m.add_class::<worker::PyWorker>()?;
    m.add_class::<batches::Batches>()?;
    m.add_class::<batches::PyBatch>()?;
    m.add("GradflowError", m.py().get_type::<error::GradflowError>())?;
    m.add_function(wrap_pyfunction!(infer_initializer, m)?)?;
    m.add_function(wrap_pyfunction!(scores, m)?)?;
    Ok(())
}
