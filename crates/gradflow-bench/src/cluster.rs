//! In-process parameter servers and workers for the exchange scenarios (2-4).
//!
//! The shards run on one tokio runtime of this process ([`Servers`]); each worker runs on its
//! own OS thread with its own multi-threaded runtime ([`on_worker_threads`]), as it would in
//! its own process. Workers reach the servers over loopback TCP (the tensor link and gRPC), so every
//! byte is encoded, sent through the kernel and decoded; what does not cross is a process
//! boundary (the scheduler sees one process, and memory is shared by the allocator).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gradflow_core::Mode;
use gradflow_ps::shard::Shard;
use gradflow_ps::{RunningServer, ServerConfig, ServerSettings};
use gradflow_worker::{Worker, WorkerConfig};

use crate::BenchError;

/// `num_shards` shards serving on loopback, for `num_workers` workers.
pub struct Servers {
    runtime: tokio::runtime::Runtime,
    servers: Vec<RunningServer>,
}

impl Servers {
    /// Starts the shards on free loopback ports, with timeouts long enough that a slow
    /// repetition is never mistaken for a dead worker.
    pub fn start(num_shards: u32, num_workers: u32, mode: Mode) -> Result<Servers, BenchError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("bench-ps")
            .build()
            .map_err(BenchError::io("starting the servers' runtime"))?;
        let any: SocketAddr = "127.0.0.1:0".parse().expect("a valid address");
        let servers = runtime.block_on(async {
            let mut out = Vec::with_capacity(num_shards as usize);
            for shard in 0..num_shards {
                let config = ServerConfig {
                    shard,
                    num_shards,
                    num_workers,
                    mode,
                    settings: ServerSettings {
                        heartbeat_timeout: Duration::from_secs(120),
                        startup_timeout: Duration::from_secs(120),
                        ..ServerSettings::default()
                    },
                    ..ServerConfig::default()
                };
                out.push(gradflow_ps::start(config, any, None).await?);
            }
            Ok::<_, BenchError>(out)
        })?;
        Ok(Servers { runtime, servers })
    }

    /// Addresses in shard order.
    pub fn addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.addr().to_string()).collect()
    }

    /// Shard `i`'s state, to fill a table without going through the network.
    pub fn shard(&self, i: usize) -> &Arc<Shard> {
        self.servers[i].shard()
    }

    /// Stops every shard and waits for them to end.
    pub fn stop(self) -> Result<(), BenchError> {
        let Servers { runtime, servers } = self;
        runtime.block_on(async {
            for s in servers {
                s.shutdown().await?;
            }
            Ok::<_, BenchError>(())
        })?;
        runtime.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    }
}

/// A worker connected to `addrs` with default settings (those `gradflow worker` uses).
pub async fn connect(addrs: &[String], index: u32) -> Result<Worker, BenchError> {
    let mut config = WorkerConfig::new(addrs.iter().cloned(), index);
    config.startup_timeout = Duration::from_secs(30);
    Ok(Worker::connect(config).await?)
}

/// Runs `f(w)` for every worker `w` in `0..n`, each on its own thread and tokio runtime, and
/// returns the results in worker order.
pub fn on_worker_threads<T, F, Fut>(n: u32, f: F) -> Result<Vec<T>, BenchError>
where
    T: Send,
    F: Fn(u32) -> Fut + Sync,
    Fut: Future<Output = Result<T, BenchError>>,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|w| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("bench-worker-{w}"))
                    .spawn_scoped(scope, move || {
                        let runtime = tokio::runtime::Builder::new_multi_thread()
                            .enable_all()
                            .thread_name(format!("bench-worker-{w}"))
                            .build()
                            .map_err(BenchError::io("starting a worker's runtime"))?;
                        let out = runtime.block_on(f(w));
                        runtime.shutdown_timeout(Duration::from_secs(5));
                        out
                    })
                    .map_err(BenchError::io("starting a worker thread"))
            })
            .collect();
        let mut results = Vec::with_capacity(n as usize);
        for h in handles {
            let result = h?.join().map_err(|_| BenchError::Internal("a worker thread panicked".into()))?;
            results.push(result?);
        }
        Ok(results)
    })
}
