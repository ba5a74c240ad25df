//! Synchronous or asynchronous training.

use serde::{Deserialize, Serialize};

/// How the servers combine the pushes of several workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every step waits for the gradients of all live workers, averages them and applies one
    /// update: the same result as one process training on all the workers' batches.
    #[default]
    Sync,
    /// Each push is applied when it arrives; pulls return the latest values. An optional
    /// staleness bound keeps the fastest worker at most that many steps ahead of the slowest.
    Async,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
