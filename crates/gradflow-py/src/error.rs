//! The one place where Rust errors become Python exceptions.
//!
//! Everything the servers or the worker library refuse raises `gradflow.GradflowError`,
//! carrying the message (a refused push carries the server's) and, where the refusal came
//! from a server, its gRPC status code name in `.code` (`"INVALID_ARGUMENT"`, ...; `None`
//! otherwise). Wrong arguments from Python raise `ValueError`.

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _gradflow,
    GradflowError,
    PyException,
    "A gradflow operation failed: the servers refused it, could not be reached, or the job's data or configuration is wrong. `.code` names the gRPC status a server answered with, if any."
);

/// A worker-library error as `GradflowError`.
pub fn worker(e: gradflow_worker::WorkerError) -> PyErr {
    let code = e.code().map(|c| format!("{c:?}"));
    raise(e.to_string(), code)
}

/// A training-loop error (data, results file, configuration) as `GradflowError`.
pub fn train(e: gradflow_trainer::TrainError) -> PyErr {
    match e {
        gradflow_trainer::TrainError::Worker(w) => worker(w),
        other => raise(other.to_string(), None),
    }
}

/// Any other error of gradflow as `GradflowError`.
pub fn other(e: impl std::fmt::Display) -> PyErr {
    raise(e.to_string(), None)
}

/// A wrong argument as `ValueError`.
pub fn value(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

fn raise(message: String, code: Option<String>) -> PyErr {
    let code = code.map(|c| screaming(&c));
    Python::attach(|py| {
        let err = GradflowError::new_err(message);
        // Setting an attribute on a fresh exception instance cannot fail.
        let _ = err.value(py).setattr("code", code);
        err
    })
}

/// `InvalidArgument` as `INVALID_ARGUMENT`, the way gRPC writes status codes.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
