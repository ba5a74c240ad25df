//! A table's admission counts, eviction clocks and rows survive a checkpoint written to a real
//! store, restored onto the same and onto other shard counts.

use std::collections::BTreeMap;
use std::time::Duration;

use gradflow_checkpoint::CheckpointStore;
use gradflow_core::embedding::EmbeddingSettings;
use gradflow_core::{Initializer, ModelSpec, OptimizerConfig, Placement, SparseSpec};
use gradflow_ps::model::{ShardModel, SparseAccum};

fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![],
        sparse: vec![SparseSpec {
            name: "emb".into(),
            dim: 4,
            init: Initializer::Normal { mean: 0.0, std: 0.1, seed: 3 },
            optimizer: OptimizerConfig::adagrad(0.1),
        }],
    }
}

fn settings() -> EmbeddingSettings {
    toml::from_str("admit_min_count = 2\nevict_after_steps = 1000\nmax_rows = 4096\n").unwrap()
}

/// One step on every shard: each pushes the ids of `ids` it holds, gradient 0.5.
fn step(shards: &[ShardModel], ids: &[u64]) {
    let n = shards.len() as u32;
    for (s, m) in shards.iter().enumerate() {
        let mine: Vec<u64> =
            ids.iter().copied().filter(|&id| Placement::sparse_shard(id, n) == s as u32).collect();
        let grads = vec![0.5f32; mine.len() * 4];
        let mut acc = SparseAccum::default();
        acc.add(&mine, bytemuck::cast_slice(&grads), 4);
        m.tables()[0].apply(&acc, 1.0);
    }
}

/// Every row of every shard: id -> (values, updates, clock at its last update).
fn rows(shards: &[ShardModel]) -> BTreeMap<u64, (Vec<f32>, u32, u32)> {
    let mut out = BTreeMap::new();
    for m in shards {
        let snap = m.snapshot(0, gradflow_core::Mode::Sync);
        let t = &snap.sparse[0];
        for (k, &id) in t.ids.iter().enumerate() {
            out.insert(id, (t.values[k * 4..(k + 1) * 4].to_vec(), t.steps[k], t.touched[k]));
        }
    }
    out
}

#[tokio::test]
async fn counts_clocks_and_rows_come_back_on_any_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let shards: Vec<ShardModel> =
        (0..2).map(|s| ShardModel::new(spec(), 2, s, 1 << 20).with_embedding(&settings()).unwrap()).collect();
    // Ids 0..3000 pushed twice (admitted), 5000..5100 once (counted, no row yet); the rows of
    // 0..1000 updated once more, at a later clock.
    step(&shards, &(0..3000).collect::<Vec<_>>());
    step(&shards, &(0..3000).collect::<Vec<_>>());
    step(&shards, &(5000..5100).chain(0..1000).collect::<Vec<_>>());
    let before = rows(&shards);
    assert_eq!(before.len(), 3000);
    assert_eq!((before[&5].1, before[&5].2, before[&2000].1, before[&2000].2), (2, 3, 1, 2));
    for m in &shards {
        store.write_shard(3, &m.snapshot(3, gradflow_core::Mode::Sync)).await.unwrap();
    }
    let manifest = store.finalize(3, 2, 0, Duration::from_secs(30)).await.unwrap();

    for n in [2u32, 1, 3] {
        let mut restored = Vec::new();
        for s in 0..n {
            let snap = store.load_shard(&manifest, s, n, manifest.partition_bytes).await.unwrap();
            assert_eq!(snap.sparse[0].clock, 3, "{n} shards: the clock comes back");
            restored.push(ShardModel::from_snapshot(snap, &settings()).unwrap());
        }
        assert_eq!(rows(&restored), before, "{n} shards: the same rows, values, update counts and clocks");
        // The ids pushed once before the checkpoint need one more push; new ids need two.
        step(&restored, &(5000..5100).chain(9000..9100).collect::<Vec<_>>());
        let after = rows(&restored);
        assert!((5000..5100).all(|id| after.contains_key(&id)), "{n} shards: counts survived");
        assert!((9000..9100).all(|id| !after.contains_key(&id)), "{n} shards: new ids still wait");
    }
}
