//! Replays every fuzz target's committed corpus (`corpus/<target>/`), its regression inputs
//! (`regressions/<target>/`: inputs that once crashed, kept after the fix) and its seeds, on
//! stable Rust and without libFuzzer, so that CI catches a decoder that regresses.
//!
//! `GRADFLOW_FUZZ_WRITE_SEEDS=1 cargo test -p gradflow-fuzz` rewrites the `corpus/<target>/seed-*`
//! files from gradflow's own encoders.
//!
//! A unit test of the library rather than an integration test: `cargo test` builds a package's
//! bins for its integration tests, and the twelve fuzz bins would be linked for nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use crate::{TARGETS, seeds, target};

/// Held by each test: the checkpoint targets share one in-memory checkpoint per process and put
/// their input into it, so two at once would read each other's objects.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs `f` on every input; panics naming every input that failed.
fn replay(f: fn(&[u8]), inputs: impl IntoIterator<Item = (String, Vec<u8>)>) -> usize {
    let mut failed = Vec::new();
    let mut n = 0;
    for (name, data) in inputs {
        n += 1;
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "failed: {failed:#?}");
    n
}

#[test]
fn corpus_replays() {
    let _serial = serial();
    for (name, f) in TARGETS {
        let inputs = files(&root().join("corpus").join(name))
            .into_iter()
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()));
        let n = replay(*f, inputs);
        assert!(n > 0, "target `{name}` has no corpus under corpus/{name}/");
    }
}

#[test]
fn regressions_replay() {
    let _serial = serial();
    for (name, f) in TARGETS {
        let inputs = files(&root().join("regressions").join(name))
            .into_iter()
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()));
        replay(*f, inputs);
    }
}

#[test]
fn seeds_replay() {
    let _serial = serial();
    for (name, f) in TARGETS {
        let inputs = seeds().into_iter().filter(|(t, _, _)| t == name).map(|(_, n, d)| (n, d));
        let n = replay(*f, inputs);
        assert!(n > 0, "target `{name}` has no seeds");
    }
    // Every folder under corpus/ and regressions/ is a target's.
    for dir in ["corpus", "regressions"] {
        for entry in std::fs::read_dir(root().join(dir)).into_iter().flatten() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(name.starts_with('.') || target(&name).is_some(), "{dir}/{name} is not a target");
        }
    }
}

/// The committed checkpoint seeds are the fixture's own files, so that the fuzzer starts from
/// a checkpoint that loads (and the pristine-input checks run on them).
#[test]
fn checkpoint_seeds_are_current() {
    let _serial = serial();
    if std::env::var_os("GRADFLOW_FUZZ_WRITE_SEEDS").is_some() {
        return;
    }
    for (name, file, data) in seeds().into_iter().filter(|(t, _, _)| t.starts_with("ckpt_")) {
        let path = root().join("corpus").join(name).join(&file);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == data,
            "{} is out of date: rewrite the seeds with GRADFLOW_FUZZ_WRITE_SEEDS=1 cargo test -p gradflow-fuzz",
            path.display()
        );
    }
}

#[test]
fn write_seeds_when_asked() {
    let _serial = serial();
    if std::env::var_os("GRADFLOW_FUZZ_WRITE_SEEDS").is_none() {
        return;
    }
    for (name, file, data) in seeds() {
        let dir = root().join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), data).unwrap();
    }
}
