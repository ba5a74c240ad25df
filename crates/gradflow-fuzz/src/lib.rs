//! The bodies of gradflow's fuzz targets, one function per decoder that reads bytes from the
//! network or from storage.
//!
//! Each `fuzz_targets/<name>.rs` only hands libFuzzer's input to the function of the same name
//! here, so that the `replay` tests can replay the committed corpus and the regression inputs on
//! stable Rust, without libFuzzer. Every function asserts properties, not just "no panic": a
//! decoded message re-encodes to itself, a validated push is consistent with the model, a loaded
//! checkpoint is what the placement asks for and what the server accepts, a refused input gets
//! the error variant that names the problem.
//!
//! - [`wire`]: the byte codecs, prost decoding of every message the server accepts (and the
//!   responses a worker reads), push validation, the tensor link's frames, the model spec a
//!   worker declares.
//! - [`checkpoint`]: checkpoint manifests, shard manifests, dense (safetensors) and sparse files,
//!   read through the public API from an in-memory store.
//! - [`job`]: the job file.
//! - [`data`]: CSV and libsvm data files, read whole and sharded across workers.
//! - [`tasks`]: dynamic data sharding's task queue, restored from a checkpoint.
//!
//! See `docs/fuzzing.md` for how to run them.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

pub mod checkpoint;
pub mod data;
pub mod job;
pub mod tasks;
pub mod wire;

#[cfg(test)]
mod replay;

pub use checkpoint::{ckpt_dense_file, ckpt_manifest, ckpt_shard_manifest, ckpt_sparse_file};
pub use data::data_lines;
pub use job::job_file;
pub use tasks::data_tasks;
pub use wire::{codec, link, model_spec, push, requests};

/// Every target: its name (the name of its bin, corpus and regression folders) and its body.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("codec", codec),
    ("push", push),
    ("requests", requests),
    ("link", link),
    ("model_spec", model_spec),
    ("ckpt_manifest", ckpt_manifest),
    ("ckpt_shard_manifest", ckpt_shard_manifest),
    ("ckpt_dense_file", ckpt_dense_file),
    ("ckpt_sparse_file", ckpt_sparse_file),
    ("job_file", job_file),
    ("data_lines", data_lines),
    ("data_tasks", data_tasks),
];

/// Valid inputs for each target, built with gradflow's own encoders: the seed corpus. The
/// committed `corpus/<target>/seed-*` files are these (the `replay` tests rewrite them when
/// `GRADFLOW_FUZZ_WRITE_SEEDS=1`).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    out.extend(wire::seeds());
    out.extend(checkpoint::seeds());
    out.extend(job::seeds());
    out.extend(data::seeds());
    out.extend(tasks::seeds());
    out
}

/// A folder of this process for scratch files (in memory where `/dev/shm` exists).
pub(crate) fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() { shm } else { std::env::temp_dir() };
        let dir = base.join(format!("gradflow-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// Under libFuzzer, makes rayon run parallel loops on the calling thread: the models are tiny,
/// and handing them to pool threads costs more than the work (and makes the process noisy
/// neighbours on a shared machine). Not in tests, where other threads would wait on this one.
pub fn single_threaded() {
    #[cfg(fuzzing)]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = rayon::ThreadPoolBuilder::new().num_threads(1).use_current_thread().build_global();
        });
    }
}

/// Looks up a target by name.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Runs target `name` on each file named in the command line: the `main` of a fuzz bin built
/// without libFuzzer (`cargo run --bin codec -- crash-1234`).
pub fn replay_main(name: &str) {
    let f = target(name).expect("a known target");
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        eprintln!("usage: {name} FILE...  (replays inputs through the `{name}` fuzz target)");
        std::process::exit(2);
    }
    for path in files {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        f(&data);
        println!("{path}: ok");
    }
}
