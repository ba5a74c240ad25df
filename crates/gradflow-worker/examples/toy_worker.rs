//! A small trainer built on the worker library: fits `w` to a fixed target by least squares,
//! and touches a few rows of a sparse table each step. The integration tests run it as a real
//! process (to kill it mid-run); it also shows the library's loop in a few lines.
//!
//! Usage: toy_worker SERVERS WORKER STEPS [STEP_DELAY_MS]
//!   SERVERS is a comma-separated list of host:port in shard order.

use std::time::Duration;

use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, SparseSpec};
use gradflow_worker::{Worker, WorkerConfig};

pub fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![DenseSpec {
            name: "w".into(),
            shape: vec![64],
            init: Initializer::Zeros,
            optimizer: OptimizerConfig::sgd(0.2),
        }],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 4,
            init: Initializer::Constant { value: 1.0 },
            optimizer: OptimizerConfig::sgd(0.1),
        }],
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: toy_worker SERVERS WORKER STEPS [STEP_DELAY_MS]".into());
    }
    let servers: Vec<String> = args[1].split(',').map(str::to_string).collect();
    let index: u32 = args[2].parse()?;
    let steps: u64 = args[3].parse()?;
    let delay = Duration::from_millis(args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0));

    let mut config = WorkerConfig::new(servers, index);
    config.heartbeat_interval = Duration::from_millis(100);
    let mut worker = Worker::connect(config).await?;
    worker.declare(spec()).await?;
    let mut dense = vec![Vec::new()];
    let mut rows = Vec::new();
    while worker.current_step() < steps {
        worker.pull_all_dense(&mut dense).await?;
        let grad: Vec<f32> = dense[0].iter().enumerate().map(|(i, w)| w - i as f32 / 64.0).collect();
        let ids = [worker.current_step() % 7, 100 + index as u64];
        worker.pull_sparse("emb", &ids, &mut rows).await?;
        worker.push_dense("w", &grad)?;
        worker.push_sparse("emb", &ids, &rows)?;
        let outcome = worker.step().await?;
        println!("step {} {:?}", worker.current_step(), outcome);
        tokio::time::sleep(delay).await;
    }
    worker.leave().await?;
    println!("done");
    Ok(())
}
