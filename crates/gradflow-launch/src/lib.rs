//! gradflow's launcher: one job file in, a running job out.
//!
//! - [`job`]: the job file ([`JobConfig`]), its defaults and its checks.
//! - [`contract`]: the environment every process of a job is started with, and the events
//!   processes report on standard output. Every backend uses the same contract.
//! - [`prepare`]: synthetic data written and data files checked before anything starts.
//! - [`guard`]: one run of a job at a time: the run's leases on its output folder and
//!   checkpoint root, and the check that it does not write over an earlier run's checkpoints.
//! - [`local`]: the default backend: the job's servers and workers as child processes on
//!   this machine.
//! - [`kubernetes`]: the second backend: the same job as pods on a Kubernetes cluster.

pub mod contract;
pub mod error;
pub mod guard;
pub mod job;
pub mod kubernetes;
pub mod local;
pub mod prepare;

pub use contract::{ClusterSpec, Event, Role};
pub use error::LaunchError;
pub use job::{JobConfig, Sharding};
