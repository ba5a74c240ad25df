//! gradflow's job description: the job file and the environment contract, what every process
//! of a job reads.
//!
//! - [`job`]: the job file ([`JobConfig`]), its defaults and its checks.
//! - [`contract`]: the environment every process of a job is started with, and the events
//!   processes report on standard output. Every launcher backend uses the same contract.
//! - [`error`]: [`JobError`].
//!
//! The launchers (gradflow-launch), the built-in worker (gradflow-trainer), the `gradflow`
//! binary and trainers of your own read a job through this crate. It holds no launcher, no
//! Kubernetes client and no server, so a worker links only what describes its job.
//!
//! ```
//! let job = gradflow_job::JobConfig::parse(
//!     "name = \"demo\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"train.svm\"\nformat = \"libsvm\"\n",
//! )?;
//! assert_eq!((job.servers, job.workers, job.train.batch_size), (1, 1, 256));
//! # Ok::<(), gradflow_job::JobError>(())
//! ```

#![forbid(unsafe_code)]

pub mod contract;
pub mod error;
pub mod job;

pub use contract::{ClusterSpec, Event, Role};
pub use error::JobError;
pub use job::{JobConfig, KubernetesSection, Sharding};
