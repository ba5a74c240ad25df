//! A checkpoint that cannot complete fails at once: a shard that gives its part up
//! (`abandon`), or that has stopped at another step (`mark_stopped`), ends shard 0's
//! `finalize` without waiting for `finalize_timeout`.

mod common;

use std::time::{Duration, Instant};

use common::{random_full, spec, split};
use gradflow_checkpoint::{CheckpointError, CheckpointStore};

const PB: u64 = 256;
/// Far longer than any test may take: a finalize that waits for it has failed the test.
const LONG: Duration = Duration::from_secs(600);
const QUICK: Duration = Duration::from_secs(10);

fn two_shards() -> Vec<gradflow_checkpoint::ShardSnapshot> {
    let spec = spec();
    let full = random_full(&spec, 50, 3);
    split(&spec, &full, 2, PB, 4)
}

#[tokio::test]
async fn finalize_fails_at_once_when_a_shard_abandons_the_checkpoint() {
    let shards = two_shards();
    let store = CheckpointStore::open("memory://abandon-at-once").unwrap();
    store.write_shard(4, &shards[0]).await.unwrap();
    store.abandon(4, 1, "shard 1 could not write its files: disk full").await.unwrap();
    let started = Instant::now();
    let err = store.finalize(4, 2, 0, LONG).await.unwrap_err();
    assert!(started.elapsed() < QUICK, "finalize waited {:?}", started.elapsed());
    match err {
        CheckpointError::Abandoned { shard, reason, .. } => {
            assert_eq!(shard, 1);
            assert!(reason.contains("disk full"), "{reason}");
        }
        other => panic!("expected Abandoned, got {other}"),
    }
    assert!(store.resolve("4").await.is_err(), "an abandoned checkpoint does not exist");
}

#[tokio::test]
async fn writing_the_shard_again_clears_its_abandon_marker() {
    // A job restored from an older checkpoint reaches the step again and writes it whole.
    let shards = two_shards();
    let store = CheckpointStore::open("memory://abandon-cleared").unwrap();
    store.abandon(4, 1, "superseded").await.unwrap();
    for s in &shards {
        store.write_shard(4, s).await.unwrap();
    }
    let m = store.finalize(4, 2, 0, QUICK).await.unwrap();
    assert_eq!(m.step, 4);
}

#[tokio::test]
async fn finalize_fails_at_once_when_a_shard_stopped_at_another_step() {
    let shards = two_shards();
    let store = CheckpointStore::open("memory://abandon-stopped").unwrap();
    store.write_shard(8, &shards[0]).await.unwrap();
    store.mark_stopped(1, 7).await.unwrap();
    let started = Instant::now();
    let err = store.finalize(8, 2, 0, LONG).await.unwrap_err();
    assert!(started.elapsed() < QUICK, "finalize waited {:?}", started.elapsed());
    assert!(
        matches!(&err, CheckpointError::Abandoned { shard: 1, reason, .. } if reason.contains("stopped at step 7")),
        "{err}"
    );

    // A shard stopped at the very step being finalized is waited for as usual, and a shard
    // started again clears its marker.
    store.mark_stopped(1, 8).await.unwrap();
    store.write_shard(8, &shards[1]).await.unwrap();
    store.finalize(8, 2, 0, QUICK).await.unwrap();
    store.mark_stopped(1, 9).await.unwrap();
    store.clear_stopped(1).await.unwrap();
    store.clear_stopped(1).await.unwrap();
    store.write_shard(10, &shards[0]).await.unwrap();
    store.write_shard(10, &shards[1]).await.unwrap();
    store.finalize(10, 2, 0, QUICK).await.unwrap();
}
