//! Checkpoints end to end on a local folder and on `memory://`: round trips, resharding,
//! pruning, the commit protocol, and every kind of bad input.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::spy::SpyStore;
use common::{assert_same, merge, random_full, spec, split};
use gradflow_checkpoint::{
    CheckpointError, CheckpointStore, ShardSnapshot, StoreOptions, checkpoint_dir_name,
};
use object_store::path::Path as ObjPath;

const PB: u64 = 256; // small pieces: the larger tensors split in several
const WAIT: Duration = Duration::from_secs(5);

async fn write_all(store: &CheckpointStore, step: u64, shards: &[ShardSnapshot]) {
    for s in shards {
        store.write_shard(step, s).await.unwrap();
    }
}

async fn checkpoint(store: &CheckpointStore, step: u64, shards: &[ShardSnapshot], keep: usize) {
    write_all(store, step, shards).await;
    store.finalize(step, shards.len() as u32, keep, WAIT).await.unwrap();
}

async fn round_trip(url: &str) {
    let spec = spec();
    let full = random_full(&spec, 200, 1);
    let shards = split(&spec, &full, 2, PB, 7);
    assert!(shards.iter().all(|s| !s.dense.is_empty() && s.sparse.iter().all(|t| !t.ids.is_empty())));
    let store = CheckpointStore::open(url).unwrap();

    write_all(&store, 10, &shards).await;
    let manifest = store.finalize(10, 2, 0, WAIT).await.unwrap();
    assert_eq!((manifest.step, manifest.num_shards, manifest.consistent), (10, 2, true));
    assert_eq!(manifest.versions(), [7, 7]);
    assert_eq!(manifest.table_rows("emb"), 200);
    assert_eq!(manifest.url(), store.checkpoint_url(10));

    let list = store.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].step, list[0].num_shards, list[0].consistent), (10, 2, true));
    assert_eq!(list[0].total_bytes, manifest.total_bytes);
    assert!(list[0].total_bytes > 4 * 200 * 5);

    // Another handle to the same root sees the same thing, by every name.
    let other = CheckpointStore::open(url).unwrap();
    for which in ["latest".to_string(), "10".into(), checkpoint_dir_name(10), store.checkpoint_url(10)] {
        let m = other.resolve(&which).await.unwrap();
        assert_eq!(m.step, 10, "{which}");
        m.check_spec(&spec).unwrap();
        for s in 0..2 {
            let loaded = other.load_shard(&m, s, 2, PB).await.unwrap();
            assert_eq!(loaded, shards[s as usize], "shard {s} via {which}");
        }
    }
}

#[tokio::test]
async fn round_trip_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(dir.path().join("ckpts").to_str().unwrap()).await;
    assert!(dir.path().join("ckpts/latest").is_file());
    assert!(dir.path().join("ckpts/ckpt-000000000010/manifest.json").is_file());
    assert!(dir.path().join("ckpts/ckpt-000000000010/shard-1/manifest.json").is_file());
    assert!(dir.path().join("ckpts/ckpt-000000000010/shard-0/sparse-0.bin").is_file());
    assert!(dir.path().join("ckpts/ckpt-000000000010/shard-0/dense-0.safetensors").is_file());
}

#[tokio::test]
async fn round_trip_file_url_and_relative_path() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/x/../ckpts", dir.path().display());
    round_trip(&url).await;
    assert!(dir.path().join("ckpts/latest").is_file());
}

#[tokio::test]
async fn round_trip_memory() {
    round_trip("memory://round-trip/some/prefix").await;
    // A different name is a different store.
    let empty = CheckpointStore::open("memory://round-trip-other/some/prefix").unwrap();
    assert!(empty.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn many_files_and_multipart_uploads() {
    let spec = spec();
    let full = random_full(&spec, 3000, 2);
    let shards = split(&spec, &full, 2, PB, 3);
    let spy = SpyStore::new();
    let options = StoreOptions {
        dense_file_bytes: 1024,
        multipart_threshold: 2048,
        part_bytes: 1000,
        ..StoreOptions::default()
    };
    let store = CheckpointStore::from_object_store(spy.clone(), ObjPath::from("root"), "spy://root", options);
    let m0 = store.write_shard(5, &shards[0]).await.unwrap();
    store.write_shard(5, &shards[1]).await.unwrap();
    let dense_files = m0.files.iter().filter(|f| f.path.contains("dense-")).count();
    assert!(dense_files > 3, "{dense_files} dense files");
    assert!(spy.multipart_uploads.load(Ordering::SeqCst) >= 2, "the sparse tables go multipart");
    let m = store.finalize(5, 2, 0, WAIT).await.unwrap();
    for n in [1, 2, 3] {
        let loaded: Vec<_> =
            futures::future::try_join_all((0..n).map(|s| store.load_shard(&m, s, n, 4 << 20))).await.unwrap();
        assert_same(&merge(&spec, &loaded), &full);
    }
}

#[tokio::test]
async fn resharding_2_to_3_and_to_1() {
    let spec = spec();
    let full = random_full(&spec, 500, 3);
    let store = CheckpointStore::open("memory://reshard").unwrap();
    checkpoint(&store, 100, &split(&spec, &full, 2, PB, 100), 0).await;
    let m = store.resolve("latest").await.unwrap();
    // 3 shards, same and different partition sizes; 1 shard; back to 2 with a new size.
    for (n, pb) in [(3, PB), (3, 100), (1, PB), (1, 1 << 20), (2, 40), (5, 64)] {
        let loaded: Vec<ShardSnapshot> =
            futures::future::try_join_all((0..n).map(|s| store.load_shard(&m, s, n, pb))).await.unwrap();
        for (s, snap) in loaded.iter().enumerate() {
            assert_eq!(
                (snap.shard, snap.num_shards, snap.partition_bytes, snap.version),
                (s as u32, n, pb, 100)
            );
        }
        assert_same(&merge(&spec, &loaded), &full);
        // Exactly what a fresh split under the new placement gives.
        assert_eq!(loaded, split(&spec, &full, n, pb, 100), "{n} shards, partition {pb}");
    }
    // And a checkpoint written from 3 shards loads back onto 2.
    let from3 = split(&spec, &full, 3, 100, 101);
    checkpoint(&store, 101, &from3, 0).await;
    let m = store.resolve("101").await.unwrap();
    let loaded: Vec<_> =
        futures::future::try_join_all((0..2).map(|s| store.load_shard(&m, s, 2, PB))).await.unwrap();
    assert_same(&merge(&spec, &loaded), &full);
}

#[tokio::test]
async fn keep_prunes_old_checkpoints_only_after_a_newer_one_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ck");
    let store = CheckpointStore::open(root.to_str().unwrap()).unwrap();
    let spec = spec();
    let full = random_full(&spec, 20, 4);
    let shards = split(&spec, &full, 2, PB, 1);
    checkpoint(&store, 1, &shards, 2).await;
    // An abandoned, incomplete checkpoint (a writer died): only shard 0 wrote.
    store.write_shard(2, &shards[0]).await.unwrap();
    checkpoint(&store, 3, &shards, 2).await;
    let steps = |l: Vec<gradflow_checkpoint::CheckpointInfo>| l.iter().map(|c| c.step).collect::<Vec<_>>();
    assert_eq!(steps(store.list().await.unwrap()), [1, 3]);
    assert!(root.join(checkpoint_dir_name(2)).exists(), "not older than the oldest kept one yet");
    // One in progress after the newest.
    store.write_shard(9, &shards[1]).await.unwrap();
    checkpoint(&store, 4, &shards, 2).await;
    assert_eq!(steps(store.list().await.unwrap()), [3, 4]);
    assert!(!root.join(checkpoint_dir_name(1)).exists(), "pruned, folder and all");
    assert!(!root.join(checkpoint_dir_name(2)).exists(), "abandoned and older than the oldest kept");
    assert!(root.join(checkpoint_dir_name(9)).exists(), "in progress: never pruned");
    checkpoint(&store, 5, &shards, 1).await;
    assert_eq!(steps(store.list().await.unwrap()), [5]);
    assert_eq!(store.resolve("latest").await.unwrap().step, 5);
    // keep = 0 keeps everything.
    checkpoint(&store, 6, &shards, 0).await;
    assert_eq!(steps(store.list().await.unwrap()), [5, 6]);
}

#[tokio::test]
async fn a_writer_killed_mid_checkpoint_leaves_the_previous_one_and_latest() {
    let store = CheckpointStore::open("memory://killed").unwrap();
    let spec = spec();
    let shards = split(&spec, &random_full(&spec, 30, 5), 2, PB, 1);
    checkpoint(&store, 1, &shards, 1).await;
    // Step 2: both shards wrote their files, nobody finalized (the finalizer died).
    write_all(&store, 2, &shards).await;
    assert_eq!(store.resolve("latest").await.unwrap().step, 1);
    assert_eq!(store.list().await.unwrap().len(), 1);
    let err = store.resolve("2").await.unwrap_err();
    assert!(matches!(err, CheckpointError::MissingManifest { .. }), "{err}");
    assert!(err.to_string().contains("memory://killed/ckpt-000000000002/manifest.json"), "{err}");
    // Step 3: shard 1 died before writing; finalize gives up naming what is missing.
    store.write_shard(3, &shards[0]).await.unwrap();
    let short = Duration::from_millis(300);
    let err = store.finalize(3, 2, 1, short).await.unwrap_err();
    assert!(matches!(&err, CheckpointError::Timeout { missing, .. } if missing == &[1]), "{err}");
    assert!(err.to_string().contains("memory://killed/ckpt-000000000003/shard-1/manifest.json"), "{err}");
    assert_eq!(store.resolve("latest").await.unwrap().step, 1);
    // Finishing step 2 later works, and moves latest.
    store.finalize(2, 2, 1, WAIT).await.unwrap();
    assert_eq!(store.resolve("latest").await.unwrap().step, 2);
    // A complete checkpoint is never overwritten.
    let err = store.write_shard(2, &shards[0]).await.unwrap_err();
    assert!(matches!(err, CheckpointError::AlreadyComplete { .. }), "{err}");
}

#[tokio::test]
async fn finalize_waits_for_a_slow_shard() {
    let store = CheckpointStore::open("memory://slow").unwrap();
    let spec = spec();
    let shards = split(&spec, &random_full(&spec, 10, 6), 2, PB, 1);
    store.write_shard(1, &shards[0]).await.unwrap();
    let late = {
        let (store, shard) = (store.clone(), shards[1].clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            store.write_shard(1, &shard).await.unwrap();
        })
    };
    let m = store.finalize(1, 2, 0, WAIT).await.unwrap();
    late.await.unwrap();
    assert_eq!(m.step, 1);
}

#[tokio::test]
async fn writing_a_shard_again_before_finalize_replaces_it() {
    let store = CheckpointStore::open("memory://rewrite").unwrap();
    let spec = spec();
    let (a, b) = (random_full(&spec, 40, 16), random_full(&spec, 40, 17));
    let (sa, sb) = (split(&spec, &a, 2, PB, 1), split(&spec, &b, 2, PB, 1));
    write_all(&store, 1, &sa).await;
    write_all(&store, 1, &sb).await;
    let m = store.finalize(1, 2, 0, WAIT).await.unwrap();
    let loaded: Vec<_> =
        futures::future::try_join_all((0..2).map(|s| store.load_shard(&m, s, 2, PB))).await.unwrap();
    assert_eq!(loaded, sb);
}

#[tokio::test]
async fn latest_never_moves_backwards() {
    let store = CheckpointStore::open("memory://backwards").unwrap();
    let spec = spec();
    let shards = split(&spec, &random_full(&spec, 10, 7), 1, PB, 1);
    checkpoint(&store, 5, &shards, 0).await;
    checkpoint(&store, 3, &shards, 0).await;
    assert_eq!(store.resolve("latest").await.unwrap().step, 5);
}

#[tokio::test]
async fn inconsistent_versions_are_recorded() {
    let store = CheckpointStore::open("memory://versions").unwrap();
    let spec = spec();
    let mut shards = split(&spec, &random_full(&spec, 10, 8), 2, PB, 10);
    shards[1].version = 11;
    shards.iter_mut().for_each(|s| s.mode = gradflow_core::Mode::Async);
    checkpoint(&store, 1, &shards, 0).await;
    let m = store.resolve("latest").await.unwrap();
    assert!(!m.consistent);
    assert_eq!(m.mode, gradflow_core::Mode::Async);
    assert_eq!(store.load_shard(&m, 0, 1, PB).await.unwrap().version, 11);
    assert!(!store.list().await.unwrap()[0].consistent);
}

/// The first file of shard 0 of kind `kind` ("dense" or "sparse") in a local checkpoint.
fn data_file(ckpt: &Path, kind: &str) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(ckpt.join("shard-0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(kind))
        .collect();
    files.sort();
    files.remove(0)
}

#[tokio::test]
async fn corrupted_truncated_and_missing_files_fail_naming_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let spec = spec();
    let shards = split(&spec, &random_full(&spec, 50, 9), 2, PB, 1);
    checkpoint(&store, 1, &shards, 0).await;
    let ckpt = dir.path().join(checkpoint_dir_name(1));
    let m = store.resolve("latest").await.unwrap();
    assert_eq!(store.verify(&m).await.unwrap(), m.total_bytes);

    // One flipped byte in the middle of a dense file.
    let dense = data_file(&ckpt, "dense");
    let original = std::fs::read(&dense).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&dense, &bad).unwrap();
    let err = store.load_shard(&m, 0, 2, PB).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(dense.to_str().unwrap()) && msg.contains("checksum mismatch"), "{msg}");
    assert_eq!(store.verify(&m).await.unwrap_err().to_string(), msg);
    // Export reads every file: same error.
    let out = dir.path().join("model.safetensors");
    let err = store.export(&m, &out).await.unwrap_err();
    assert!(err.to_string().contains(dense.to_str().unwrap()), "{err}");
    assert!(!out.exists());
    std::fs::write(&dense, &original).unwrap();
    store.load_shard(&m, 0, 2, PB).await.unwrap();

    // A truncated sparse file.
    let sparse = data_file(&ckpt, "sparse");
    let original = std::fs::read(&sparse).unwrap();
    std::fs::write(&sparse, &original[..original.len() - 7]).unwrap();
    let err = store.load_shard(&m, 1, 3, PB).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(sparse.to_str().unwrap()) && msg.contains("truncated"), "{msg}");
    // A missing one.
    std::fs::remove_file(&sparse).unwrap();
    let err = store.load_shard(&m, 0, 1, PB).await.unwrap_err();
    assert!(matches!(err, CheckpointError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains(sparse.to_str().unwrap()), "{err}");

    // A garbled top-level manifest.
    std::fs::write(ckpt.join("manifest.json"), b"{\"format\": \"gradflow-checkpoint\", \"step\":").unwrap();
    let err = store.resolve("1").await.unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(ckpt.join("manifest.json").to_str().unwrap()), "{err}");
    assert!(store.list().await.is_err(), "a corrupt manifest is reported, not skipped");

    // No manifest: not a checkpoint.
    std::fs::remove_file(ckpt.join("manifest.json")).unwrap();
    assert!(store.list().await.unwrap().is_empty());
    let err = store.resolve("1").await.unwrap_err();
    assert!(matches!(err, CheckpointError::MissingManifest { .. }), "{err}");
    // `latest` still names it: resolving it says the manifest is missing.
    let err = store.resolve("latest").await.unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");
    std::fs::remove_file(dir.path().join("latest")).unwrap();
    let err = store.resolve("latest").await.unwrap_err();
    assert!(matches!(err, CheckpointError::NoCheckpoint { .. }), "{err}");
}

#[tokio::test]
async fn latest_falls_back_to_the_newest_checkpoint_when_the_pointer_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let spec = spec();
    let shards = split(&spec, &random_full(&spec, 5, 10), 1, PB, 1);
    checkpoint(&store, 7, &shards, 0).await;
    checkpoint(&store, 8, &shards, 0).await;
    std::fs::remove_file(dir.path().join("latest")).unwrap();
    assert_eq!(store.resolve("latest").await.unwrap().step, 8);
    std::fs::write(dir.path().join("latest"), "garbage").unwrap();
    let err = store.resolve("latest").await.unwrap_err();
    assert!(err.to_string().contains("latest") && err.to_string().contains("garbage"), "{err}");
}

#[tokio::test]
async fn a_different_spec_is_named() {
    let store = CheckpointStore::open("memory://spec-check").unwrap();
    let spec = spec();
    checkpoint(&store, 1, &split(&spec, &random_full(&spec, 5, 11), 1, PB, 1), 0).await;
    let m = store.resolve("latest").await.unwrap();
    let mut job = spec.clone();
    job.dense[0].shape = vec![37, 12];
    let err = m.check_spec(&job).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::SpecMismatch { .. }), "{msg}");
    assert!(msg.contains("deep.w1") && msg.contains("[37, 11]") && msg.contains("[37, 12]"), "{msg}");
    assert!(msg.contains("memory://spec-check/ckpt-000000000001"), "{msg}");
}

#[tokio::test]
async fn shards_that_disagree_are_refused_at_finalize() {
    let store = CheckpointStore::open("memory://disagree").unwrap();
    let spec = spec();
    let full = random_full(&spec, 5, 12);
    let mut shards = split(&spec, &full, 2, PB, 1);
    let mut other = spec.clone();
    other.sparse[0].optimizer = gradflow_core::OptimizerConfig::adagrad(0.1);
    shards[1].spec = other.clone();
    shards[1].sparse[0].num_slots = 1;
    let rows = shards[1].sparse[0].ids.len();
    shards[1].sparse[0].state = vec![0.0; rows * 4];
    write_all(&store, 1, &shards).await;
    let err = store.finalize(1, 2, 0, WAIT).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Inconsistent { .. }), "{err}");
    assert!(err.to_string().contains("`emb`"), "{err}");
    assert!(store.resolve("1").await.is_err());

    // Pieces that do not cover a tensor (a shard wrote under another placement).
    let store = CheckpointStore::open("memory://disagree-2").unwrap();
    let mut shards = split(&spec, &full, 2, PB, 1);
    shards[1] = split(&spec, &full, 3, PB, 1).remove(1);
    shards[1].num_shards = 2;
    write_all(&store, 1, &shards).await;
    let err = store.finalize(1, 2, 0, WAIT).await.unwrap_err();
    assert!(err.to_string().contains("in no shard") || err.to_string().contains("in two shards"), "{err}");
}

#[tokio::test]
async fn bad_snapshots_are_refused_before_anything_is_written() {
    let store = CheckpointStore::open("memory://bad-snapshots").unwrap();
    let spec = spec();
    let good = split(&spec, &random_full(&spec, 5, 13), 1, PB, 1).remove(0);
    let mut s = good.clone();
    s.dense[0].state.pop();
    let err = store.write_shard(1, &s).await.unwrap_err();
    assert!(
        matches!(err, CheckpointError::InvalidSnapshot { .. }) && err.to_string().contains("state"),
        "{err}"
    );
    let mut s = good.clone();
    s.sparse[1].steps.push(1);
    assert!(store.write_shard(1, &s).await.unwrap_err().to_string().contains("`wide`"));
    let mut s = good.clone();
    s.dense[0].tensor = "nope".into();
    assert!(store.write_shard(1, &s).await.unwrap_err().to_string().contains("`nope`"));
    let mut s = good;
    s.shard = 1;
    assert!(store.write_shard(1, &s).await.is_err());
    assert!(store.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_store_that_refuses_writes_is_named() {
    let spy = SpyStore::new();
    let store = CheckpointStore::from_object_store(
        spy.clone(),
        ObjPath::from("jobs/a"),
        "s3://bucket/jobs/a",
        StoreOptions::default(),
    );
    let spec = spec();
    let shards = split(&spec, &random_full(&spec, 5, 14), 1, PB, 1);
    checkpoint(&store, 1, &shards, 0).await;
    spy.refuse_writes.store(true, Ordering::SeqCst);
    let err = store.write_shard(2, &shards[0]).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Write { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("s3://bucket/jobs/a/ckpt-000000000002/shard-0/") && msg.contains("refuses writes"),
        "{msg}"
    );
    // Reading still works and the previous checkpoint is intact.
    assert_eq!(store.resolve("latest").await.unwrap().step, 1);

    // A local root below a regular file cannot be written either.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let store = CheckpointStore::open(dir.path().join("file/ckpts").to_str().unwrap()).unwrap();
    let err = store.write_shard(1, &shards[0]).await.unwrap_err();
    assert!(
        err.to_string().contains(dir.path().join("file/ckpts/ckpt-000000000001").to_str().unwrap()),
        "{err}"
    );
    let _ = Arc::clone(&spy);
}

#[tokio::test]
async fn resolving_a_checkpoint_directory_url_reads_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let a = CheckpointStore::open(dir.path().join("a").to_str().unwrap()).unwrap();
    let spec = spec();
    let full = random_full(&spec, 30, 15);
    checkpoint(&a, 3, &split(&spec, &full, 2, PB, 1), 0).await;
    // A store rooted elsewhere resolves it by path and loads it.
    let b = CheckpointStore::open("memory://elsewhere").unwrap();
    let path = dir.path().join("a").join(checkpoint_dir_name(3));
    let m = b.resolve(path.to_str().unwrap()).await.unwrap();
    let loaded = b.load_shard(&m, 0, 1, PB).await.unwrap();
    assert_same(&merge(&spec, &[loaded]), &full);
    let m = b.resolve(&format!("file://{}/", path.display())).await.unwrap();
    assert_eq!(m.step, 3);
    assert!(matches!(b.resolve(" ").await, Err(CheckpointError::InvalidArgument(_))));
    let err = b.resolve(dir.path().join("a/nothing").to_str().unwrap()).await.unwrap_err();
    assert!(matches!(err, CheckpointError::MissingManifest { .. }), "{err}");
}

#[tokio::test]
async fn listing_a_root_that_does_not_exist_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().join("never/written").to_str().unwrap()).unwrap();
    assert!(store.list().await.unwrap().is_empty());
    let err = store.resolve("latest").await.unwrap_err();
    assert!(matches!(err, CheckpointError::NoCheckpoint { .. }), "{err}");
    assert!(!dir.path().join("never").exists(), "reading creates nothing");
}

#[test]
fn bad_urls_are_named() {
    for url in ["", "ftp://host/x", "http://[bad", "https://example.com/x"] {
        let err = CheckpointStore::open(url).unwrap_err();
        assert!(matches!(err, CheckpointError::InvalidUrl { .. }), "{url}: {err}");
        assert!(err.to_string().contains(url.trim()), "{err}");
    }
    let err = CheckpointStore::open_with(
        "s3://bucket/x",
        StoreOptions { storage_options: vec![("aws_nonsense".into(), "1".into())], ..Default::default() },
    )
    .unwrap_err();
    assert!(err.to_string().contains("aws_nonsense"), "{err}");
}

/// The server spawns these on its runtime: every future must be `Send`.
#[allow(dead_code, unreachable_code, clippy::diverging_sub_expression)]
fn futures_are_send(store: CheckpointStore, snap: ShardSnapshot, m: gradflow_checkpoint::Manifest) {
    fn send<T: Send>(_: T) {}
    send(store.write_shard(1, &snap));
    send(store.finalize(1, 1, 1, WAIT));
    send(store.list());
    send(store.resolve("latest"));
    send(store.load_shard(&m, 0, 1, PB));
    send(store.export(&m, Path::new("x")));
}
