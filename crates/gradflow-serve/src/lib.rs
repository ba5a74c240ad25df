//! Using a trained gradflow model after its job ends.
//!
//! Every checkpoint carries, beside the parameters, the job's serving info
//! ([`gradflow_models::ServingInfo`]: the model config, the input columns, the scaling of
//! dense features and the id hashing). From that alone this crate turns raw rows into
//! predictions, with no parameter server running:
//!
//! - [`model`]: [`LoadedModel`], a checkpoint loaded from any object store and verified, and
//!   its forward pass; unseen ids get what a new row would hold, and nothing is stored.
//! - [`rows`]: [`RowDecoder`], named columns with JSON values into a model input, each error
//!   naming its column.
//! - [`files`]: predicting and scoring whole data files.
//! - [`server`]: [`Server`], the serving core with no transport: the current model, request
//!   batching, following `latest` with a swap that drops no request; [`metrics`] its
//!   Prometheus metrics.
//! - [`http`]: the adapter for the TensorFlow Serving REST shape and `/metrics`; [`grpc`] the
//!   adapter for the `Predictor` service of `proto/gradflow.proto`.
//! - [`error`]: [`ServeError`] and [`InputError`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), gradflow_serve::ServeError> {
//! use gradflow_checkpoint::CheckpointStore;
//! use gradflow_serve::LoadedModel;
//!
//! let store = CheckpointStore::open("s3://bucket/jobs/ctr")?;
//! let model = LoadedModel::load(&store, "latest").await?;
//! let rows: Vec<serde_json::Map<String, serde_json::Value>> = vec![];
//! let mut batch = gradflow_serve::RowDecoder::new(&model.info().input).batch(&rows)?;
//! let mut probs = Vec::new();
//! model.predict(&mut batch, &mut probs)?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod error;
pub mod files;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod rows;
pub mod server;

pub use error::{InputError, ServeError};
pub use files::{Predictions, Scores, predict_file};
pub use model::LoadedModel;
pub use rows::RowDecoder;
pub use server::{ServeConfig, Server};
