//! A checkpoint's manifest checks itself (every one-bit flip is refused, manifests written
//! before the checksum still load), agrees with its folder, and carries the run that wrote it;
//! listing shows the good checkpoints beside a corrupt one; a garbage `latest` is never shown
//! raw.

mod common;

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStoreExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;

use common::{random_full, spec, split};
use gradflow_checkpoint::{
    CheckpointError, CheckpointStore, DensePieceSnapshot, MANIFEST_CHECKSUM_FIELD, ShardSnapshot,
    StoreOptions, checkpoint_dir_name,
};
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig};

const PB: u64 = 256;
const WAIT: Duration = Duration::from_secs(5);

fn shards() -> Vec<ShardSnapshot> {
    let spec = spec();
    split(&spec, &random_full(&spec, 20, 3), 2, PB, 4)
}

async fn checkpoint(store: &CheckpointStore, step: u64, shards: &[ShardSnapshot]) {
    for s in shards {
        store.write_shard(step, s).await.unwrap();
    }
    store.finalize(step, shards.len() as u32, 0, WAIT).await.unwrap();
}

/// One shard of one 4-element tensor: a manifest of about 1.5 KB.
fn tiny() -> ShardSnapshot {
    ShardSnapshot {
        shard: 0,
        num_shards: 1,
        version: 1,
        mode: Mode::Sync,
        spec: ModelSpec {
            dense: vec![DenseSpec {
                name: "w".into(),
                shape: vec![4],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::adagrad(0.1),
            }],
            sparse: vec![],
        },
        partition_bytes: 1024,
        dense: vec![DensePieceSnapshot {
            tensor: "w".into(),
            partition: 0,
            offset: 0,
            values: vec![1.0, 2.0, 3.0, 4.0],
            state: vec![0.5; 4],
            steps: 1,
        }],
        sparse: vec![],
        serving: None,
    }
}

fn manifest_path(dir: &std::path::Path, step: u64) -> std::path::PathBuf {
    dir.join(checkpoint_dir_name(step)).join("manifest.json")
}

#[tokio::test]
async fn every_one_bit_flip_of_a_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    checkpoint(&store, 1, &shards()).await;
    let path = manifest_path(dir.path(), 1);
    let original = std::fs::read(&path).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    assert!(text.trim_end().ends_with('}') && text.contains(MANIFEST_CHECKSUM_FIELD), "{text}");

    // The case from the report: one bit of a learning rate.
    let lr = text.find("\"lr\": 0.01").expect("adam's lr is in the manifest") + "\"lr\": 0.0".len();
    let mut flipped = original.clone();
    flipped[lr] ^= 0x02; // 0.01 -> 0.03
    std::fs::write(&path, &flipped).unwrap();
    let err = store.resolve("1").await.unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

    // Every bit of a small manifest, the checksum field and the last newline included, read
    // from memory.
    let memory = Arc::new(InMemory::new());
    let root = ObjPath::from("root");
    let mem =
        CheckpointStore::from_object_store(memory.clone(), root.clone(), "memory", StoreOptions::default());
    checkpoint(&mem, 1, &[tiny()]).await;
    let at = root.clone().join(checkpoint_dir_name(1)).join("manifest.json");
    let original = memory.get(&at).await.unwrap().bytes().await.unwrap().to_vec();
    let put = |bytes: Vec<u8>| {
        let (memory, at) = (memory.clone(), at.clone());
        async move { memory.put(&at, bytes.into()).await.unwrap() }
    };
    mem.resolve("1").await.expect("the unchanged manifest loads");
    for byte in 0..original.len() {
        for bit in 0..8 {
            let mut bytes = original.clone();
            bytes[byte] ^= 1 << bit;
            put(bytes).await;
            let result = mem.resolve("1").await;
            assert!(
                matches!(result, Err(CheckpointError::Corrupt { .. })),
                "flipping bit {bit} of byte {byte} ({:?}) was not refused: {result:?}",
                original[byte] as char
            );
        }
    }
}

#[tokio::test]
async fn a_manifest_written_before_manifests_had_a_checksum_still_loads_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    checkpoint(&store, 3, &shards()).await;
    let m = store.resolve("3").await.unwrap();
    // What the previous version wrote: the same struct as pretty JSON, nothing after it.
    let old = serde_json::to_vec_pretty(&m).unwrap();
    assert!(!String::from_utf8_lossy(&old).contains(MANIFEST_CHECKSUM_FIELD));
    std::fs::write(manifest_path(dir.path(), 3), &old).unwrap();
    let again = store.resolve("latest").await.unwrap();
    assert_eq!(again.step, 3);
    store.verify(&again).await.unwrap();
    assert_eq!(store.list().await.unwrap().len(), 1);
    // A field a flipped bit renamed is not taken for one this build does not know.
    let renamed = String::from_utf8(old).unwrap().replacen("\"consistent\"", "\"consistenu\"", 1);
    std::fs::write(manifest_path(dir.path(), 3), renamed).unwrap();
    let err = store.resolve("3").await.unwrap_err();
    assert!(err.to_string().contains("consistenu"), "{err}");
}

#[tokio::test]
async fn a_manifest_whose_step_disagrees_with_its_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    checkpoint(&store, 5, &shards()).await;
    // A whole, valid manifest of step 5 in the folder of step 7.
    let folder7 = dir.path().join(checkpoint_dir_name(7));
    std::fs::create_dir_all(&folder7).unwrap();
    std::fs::copy(manifest_path(dir.path(), 5), folder7.join("manifest.json")).unwrap();
    let err = store.resolve("7").await.unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("step 5") && msg.contains("ckpt-000000000007") && msg.contains("step 7"), "{msg}");
    // `latest` still names step 5, which is fine.
    assert_eq!(store.resolve("latest").await.unwrap().step, 5);
}

#[tokio::test]
async fn listing_shows_the_good_checkpoints_and_flags_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let shards = shards();
    for step in [1, 2, 3] {
        checkpoint(&store, step, &shards).await;
    }
    std::fs::write(manifest_path(dir.path(), 2), b"\x00garbage\x1b[2J").unwrap();
    let listing = store.list_all().await.unwrap();
    let steps: Vec<u64> = listing.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, [1, 3]);
    assert_eq!(listing.unreadable.len(), 1);
    let bad = &listing.unreadable[0];
    assert_eq!((bad.step, bad.dir.as_str()), (2, "ckpt-000000000002"));
    assert!(matches!(bad.error, CheckpointError::Corrupt { .. }), "{}", bad.error);
    // `list` keeps refusing to pretend the corrupt one is not there.
    assert!(store.list().await.is_err());
}

#[tokio::test]
async fn garbage_in_latest_is_named_escaped_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    checkpoint(&store, 1, &shards()).await;
    let mut garbage = b"\x1b]0;owned\x07\x1b[2J\xff\xfe".to_vec();
    garbage.extend(std::iter::repeat_n(b'A', 100_000));
    std::fs::write(dir.path().join("latest"), &garbage).unwrap();
    let err = store.resolve("latest").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("not a checkpoint name"), "{msg}");
    assert!(msg.chars().all(|c| !c.is_control()), "control characters in {msg:?}");
    assert!(msg.contains("\\x1b]0;owned\\x07") && msg.contains(&format!("{} bytes", garbage.len())), "{msg}");
    assert!(msg.len() < 600, "{} bytes: {msg}", msg.len());
}

#[tokio::test]
async fn manifests_carry_the_run_id() {
    let options = StoreOptions { run_id: Some("run-42".into()), ..StoreOptions::default() };
    let store = CheckpointStore::open_with("memory://integrity-run-id/root", options).unwrap();
    let shards = shards();
    let written = store.write_shard(9, &shards[0]).await.unwrap();
    assert_eq!(written.run_id.as_deref(), Some("run-42"));
    store.write_shard(9, &shards[1]).await.unwrap();
    let m = store.finalize(9, 2, 0, WAIT).await.unwrap();
    assert_eq!(m.run_id.as_deref(), Some("run-42"));
    let read = store.resolve("latest").await.unwrap();
    assert_eq!(read.run_id.as_deref(), Some("run-42"));
    assert_eq!(store.list().await.unwrap()[0].run_id.as_deref(), Some("run-42"));
    // Without one, the field is left out.
    let plain = CheckpointStore::open("memory://integrity-no-run-id/root").unwrap();
    checkpoint(&plain, 1, &shards).await;
    let text = serde_json::to_string(&plain.resolve("1").await.unwrap()).unwrap();
    assert!(!text.contains("run_id"), "{text}");
}
