//! Built-in CPU models for gradflow, and a single-process reference trainer.
//!
//! A model is pure compute: a worker pulls the [`Params`] a batch needs (the dense tensors and
//! the rows of the sparse ids [`Model::sparse_ids`] names), calls
//! [`Model::forward_backward`], and pushes the [`Grads`] it gets back. Forward and backward are
//! written out by hand on matrix products ([`matmul`]: the `gemm` crate's kernels, or
//! `matrixmultiply`'s) and `rayon`, with scratch buffers reused across batches.
//!
//! - [`model`]: the [`Model`] trait and [`build`] from a serde [`ModelConfig`].
//! - [`logistic`]: [`LogisticRegression`] over sparse (optionally hashed) and dense features.
//! - [`wide_deep`]: [`WideDeep`], a wide linear part plus embeddings and an MLP.
//! - [`matmul`]: the matrix products, through either kernel.
//! - [`params`]: the [`Params`] and [`Grads`] layouts.
//! - [`trainer`]: [`LocalTrainer`], training in one process with the servers' optimizers.
//! - [`serving`]: [`ServingInfo`], what using a trained model on raw rows needs beside its
//!   parameters (columns, scaling, id hashing).
//! - [`error`]: the [`ModelError`] type.

#![warn(missing_docs)]
// `deny`, not `forbid`: the one exception is [`matmul`], whose `gemm` call takes raw pointers.
#![deny(unsafe_code)]

pub mod error;
pub mod logistic;
#[allow(unsafe_code)]
pub mod matmul;
pub mod model;
pub mod params;
pub mod serving;
pub mod trainer;
mod util;
pub mod wide_deep;

pub use error::ModelError;
pub use logistic::{LogisticRegression, LogisticRegressionConfig};
pub use matmul::Kernel;
pub use model::{Model, ModelConfig, build};
pub use params::{Grads, Params, SparseRows};
pub use serving::{InputSchema, Scaling, ServingInfo};
pub use trainer::LocalTrainer;
pub use wide_deep::{WideDeep, WideDeepConfig};
