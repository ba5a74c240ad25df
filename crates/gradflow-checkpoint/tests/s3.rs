//! Checkpoints on a real S3-protocol server: `s3s-fs` started on loopback by the test,
//! configured the way users configure S3 (the `AWS_*` variables).
//!
//! Skipped, with a notice, when `s3s-fs` is not on `PATH`; install it with
//! `cargo install s3s-fs@0.14.1 --features binary --locked`.
//!
//! This file holds a single test on purpose: it sets process environment variables, which is
//! only sound while no other thread reads them.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_same, merge, random_full, spec, split};
use gradflow_checkpoint::{CheckpointError, CheckpointStore, StoreOptions, checkpoint_dir_name};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

#[test]
fn checkpoints_on_s3() {
    if !on_path("s3s-fs") {
        eprintln!(
            "NOTICE: skipping the S3 test: `s3s-fs` is not on PATH \
             (cargo install s3s-fs@0.14.1 --features binary --locked)"
        );
        return;
    }
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir(data.path().join("bucket")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = Server(
        Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "gradflow-key", "--secret-key", "gradflow-secret"])
            .arg(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: this binary runs this one test, and no other thread exists yet.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "gradflow-key");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "gradflow-secret");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        for stale in ["AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"] {
            std::env::remove_var(stale);
        }
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(run(data.path()));
}

async fn run(data: &std::path::Path) {
    let spec = spec();
    let full = random_full(&spec, 2000, 31);
    // Big enough files, small enough parts: the sparse tables and dense files go multipart
    // (S3 parts are at least 5 MiB, except the last one).
    let options =
        StoreOptions { multipart_threshold: 16 << 10, part_bytes: 5 << 20, ..StoreOptions::default() };
    let store = CheckpointStore::open_with("s3://bucket/jobs/ctr", options.clone()).unwrap();
    assert!(store.list().await.unwrap().is_empty());

    for step in [10, 20, 30] {
        for s in split(&spec, &full, 2, 256, step) {
            store.write_shard(step, &s).await.unwrap();
        }
        store.finalize(step, 2, 2, Duration::from_secs(10)).await.unwrap();
    }
    let steps: Vec<u64> = store.list().await.unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, [20, 30], "keep = 2");
    assert!(!data.join("bucket/jobs/ctr").join(checkpoint_dir_name(10)).join("manifest.json").exists());

    // Resolve and reshard 2 -> 3 and 2 -> 1 from a fresh handle.
    let other = CheckpointStore::open("s3://bucket/jobs/ctr/").unwrap();
    let m = other.resolve("latest").await.unwrap();
    assert_eq!(m.step, 30);
    m.check_spec(&spec).unwrap();
    for n in [3, 1] {
        let mut loaded = Vec::new();
        for s in 0..n {
            loaded.push(other.load_shard(&m, s, n, 1 << 20).await.unwrap());
        }
        assert_same(&merge(&spec, &loaded), &full);
    }
    // By URL, from a store rooted elsewhere.
    let elsewhere = CheckpointStore::open("memory://s3-test").unwrap();
    let by_url = elsewhere.resolve("s3://bucket/jobs/ctr/ckpt-000000000020").await.unwrap();
    assert_eq!(by_url.step, 20);

    // A shard written without finalize does not move latest.
    for s in split(&spec, &full, 2, 256, 40) {
        store.write_shard(40, &s).await.unwrap();
    }
    assert_eq!(store.resolve("latest").await.unwrap().step, 30);

    // A corrupted object (changed behind the store's back) is caught and named.
    let sparse = data.join("bucket/jobs/ctr/ckpt-000000000030/shard-1/sparse-0.bin");
    let mut bytes = std::fs::read(&sparse).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&sparse, &bytes).unwrap();
    let err = other.load_shard(&m, 0, 1, 1 << 20).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("s3://bucket/jobs/ctr/ckpt-000000000030/shard-1/sparse-0.bin"), "{err}");

    // Wrong credentials: a clear error naming the object.
    let bad = CheckpointStore::open_with(
        "s3://bucket/jobs/ctr",
        StoreOptions { storage_options: vec![("aws_secret_access_key".into(), "wrong".into())], ..options },
    )
    .unwrap();
    let err = bad.resolve("latest").await.unwrap_err();
    assert!(matches!(err, CheckpointError::Read { .. }), "{err}");
    assert!(err.to_string().contains("s3://bucket/jobs/ctr/latest"), "{err}");
    let err = bad.write_shard(50, &split(&spec, &full, 1, 256, 1)[0]).await.unwrap_err();
    assert!(err.to_string().contains("s3://bucket/jobs/ctr/ckpt-000000000050"), "{err}");

    // A file of several 5 MiB parts: one 1.5M-element tensor with Adam state (18 MiB).
    let mut big = spec.clone();
    big.dense[0].shape = vec![1500, 1000];
    let full = random_full(&big, 10, 32);
    let store = CheckpointStore::open_with("s3://bucket/jobs/big", options_big()).unwrap();
    let shards = split(&big, &full, 1, 64 << 20, 1);
    let written = store.write_shard(1, &shards[0]).await.unwrap();
    assert!(written.files.iter().any(|f| f.bytes > 3 * (5 << 20)), "{:?}", written.files);
    let m = store.finalize(1, 1, 1, Duration::from_secs(10)).await.unwrap();
    let loaded = store.load_shard(&m, 0, 1, 64 << 20).await.unwrap();
    assert_eq!(loaded, shards[0]);

    // A bucket that does not exist.
    let missing = CheckpointStore::open("s3://no-such-bucket/x").unwrap();
    assert!(missing.list().await.is_err());
}

fn options_big() -> StoreOptions {
    StoreOptions { multipart_threshold: 8 << 20, part_bytes: 5 << 20, ..StoreOptions::default() }
}
