//! Shared test helpers: a small model with every kind of optimizer state, random "full"
//! models, and splitting them into real shard snapshots per `Placement` (and back).

#![allow(dead_code)]

pub mod spy;

use std::collections::BTreeMap;

use gradflow_checkpoint::{DensePieceSnapshot, ShardSnapshot, TableSnapshot};
use gradflow_core::{DenseSpec, Initializer, Mode, ModelSpec, OptimizerConfig, Placement, SparseSpec};

/// splitmix64: deterministic test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn dense(name: &str, shape: &[u64], optimizer: OptimizerConfig) -> DenseSpec {
    DenseSpec { name: name.into(), shape: shape.to_vec(), init: Initializer::Zeros, optimizer }
}

fn sparse(name: &str, dim: u32, optimizer: OptimizerConfig) -> SparseSpec {
    SparseSpec { name: name.into(), dim, init: Initializer::Zeros, optimizer }
}

/// A model with Adam (2 slots), plain SGD (0 slots), Adagrad (1), FTRL (2), a scalar, and two
/// tables. With `partition_bytes` 256 the larger tensors split into several pieces.
pub fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![
            dense("deep.w1", &[37, 11], OptimizerConfig::adam(0.01)),
            dense("deep.b1", &[11], OptimizerConfig::sgd(0.1)),
            dense("scale", &[], OptimizerConfig::adagrad(0.05)),
            dense("wide.w", &[300], OptimizerConfig::ftrl(0.05)),
        ],
        sparse: vec![
            sparse("emb", 4, OptimizerConfig::adam(0.01)),
            sparse("wide", 1, OptimizerConfig::adagrad(0.05)),
        ],
    }
}

/// A full dense tensor: values, state per slot, steps.
pub type DenseFull = (Vec<f32>, Vec<Vec<f32>>, u64);
/// A table's rows: id -> (values, state (slot 0, slot 1, ...), steps).
pub type Rows = BTreeMap<u64, (Vec<f32>, Vec<f32>, u32)>;

/// A whole model: full dense tensors (values, state per slot, steps) and every sparse row.
#[derive(Debug, Clone, PartialEq)]
pub struct Full {
    pub dense: BTreeMap<String, DenseFull>,
    pub sparse: BTreeMap<String, Rows>,
}

pub fn random_full(spec: &ModelSpec, rows: usize, seed: u64) -> Full {
    let mut rng = Rng::new(seed);
    let mut dense = BTreeMap::new();
    for d in &spec.dense {
        let n = d.numel() as usize;
        let state = (0..d.optimizer.num_slots()).map(|_| rng.f32s(n)).collect();
        dense.insert(d.name.clone(), (rng.f32s(n), state, 1 + rng.next_u64() % 1000));
    }
    let mut sparse = BTreeMap::new();
    for s in &spec.sparse {
        let dim = s.dim as usize;
        let slots = s.optimizer.num_slots();
        let mut table = BTreeMap::new();
        while table.len() < rows {
            // Mix small ids and ids over 2^63 (which an i64 could not hold).
            let id = if rng.next_u64().is_multiple_of(2) { rng.next_u64() % 10_000 } else { rng.next_u64() };
            table.insert(id, (rng.f32s(dim), rng.f32s(dim * slots), (rng.next_u64() % 500) as u32));
        }
        sparse.insert(s.name.clone(), table);
    }
    Full { dense, sparse }
}

/// What each of `num_shards` shards would hold of `full` under `Placement::new(spec, num_shards,
/// partition_bytes)`.
pub fn split(
    spec: &ModelSpec,
    full: &Full,
    num_shards: u32,
    partition_bytes: u64,
    version: u64,
) -> Vec<ShardSnapshot> {
    let placement = Placement::new(spec, num_shards, partition_bytes);
    (0..num_shards)
        .map(|shard| {
            let dense = placement
                .pieces_on(shard)
                .map(|p| {
                    let d = &spec.dense[p.tensor];
                    let (values, state, steps) = &full.dense[&d.name];
                    let (a, b) = (p.offset as usize, p.end() as usize);
                    DensePieceSnapshot {
                        tensor: d.name.clone(),
                        partition: p.partition,
                        offset: p.offset,
                        values: values[a..b].to_vec(),
                        state: state.iter().flat_map(|slot| slot[a..b].iter().copied()).collect(),
                        steps: *steps,
                    }
                })
                .collect();
            let sparse = spec
                .sparse
                .iter()
                .map(|s| {
                    let mut t = TableSnapshot {
                        table: s.name.clone(),
                        dim: s.dim,
                        num_slots: s.optimizer.num_slots() as u32,
                        ids: vec![],
                        values: vec![],
                        state: vec![],
                        steps: vec![],
                        touched: vec![],
                        clock: 0,
                        sketch: vec![],
                    };
                    for (&id, (v, st, steps)) in &full.sparse[&s.name] {
                        if Placement::sparse_shard(id, num_shards) == shard {
                            t.ids.push(id);
                            t.values.extend(v);
                            t.state.extend(st);
                            t.steps.push(*steps);
                        }
                    }
                    t
                })
                .collect();
            ShardSnapshot {
                shard,
                num_shards,
                version,
                mode: Mode::Sync,
                spec: spec.clone(),
                partition_bytes,
                dense,
                sparse,
                serving: None,
            }
        })
        .collect()
}

/// The whole model back from shard snapshots; checks each row and element is held once.
pub fn merge(spec: &ModelSpec, shards: &[ShardSnapshot]) -> Full {
    let mut dense = BTreeMap::new();
    for d in &spec.dense {
        let n = d.numel() as usize;
        let slots = d.optimizer.num_slots();
        let mut values = vec![f32::NAN; n];
        let mut state = vec![vec![f32::NAN; n]; slots];
        let mut steps = None;
        let mut covered = 0;
        for p in shards.iter().flat_map(|s| &s.dense).filter(|p| p.tensor == d.name) {
            let (a, len) = (p.offset as usize, p.values.len());
            values[a..a + len].copy_from_slice(&p.values);
            for (s, slot) in state.iter_mut().enumerate() {
                slot[a..a + len].copy_from_slice(&p.state[s * len..(s + 1) * len]);
            }
            assert!(steps.is_none() || steps == Some(p.steps), "pieces of `{}` disagree on steps", d.name);
            steps = Some(p.steps);
            covered += len;
        }
        assert_eq!(covered, n, "tensor `{}` is covered by pieces of {covered} elements", d.name);
        dense.insert(d.name.clone(), (values, state, steps.unwrap()));
    }
    let mut sparse: BTreeMap<String, Rows> = BTreeMap::new();
    for s in &spec.sparse {
        sparse.insert(s.name.clone(), BTreeMap::new());
    }
    for (i, snap) in shards.iter().enumerate() {
        for t in &snap.sparse {
            let (dim, sdim) = (t.dim as usize, (t.dim * t.num_slots) as usize);
            for (r, &id) in t.ids.iter().enumerate() {
                assert_eq!(
                    Placement::sparse_shard(id, snap.num_shards),
                    i as u32,
                    "row {id} on the wrong shard"
                );
                let row = (
                    t.values[r * dim..(r + 1) * dim].to_vec(),
                    t.state[r * sdim..(r + 1) * sdim].to_vec(),
                    t.steps[r],
                );
                assert!(sparse.get_mut(&t.table).unwrap().insert(id, row).is_none(), "row {id} twice");
            }
        }
    }
    Full { dense, sparse }
}

/// Bitwise equality of two full models (NaN-safe, and -0.0 != 0.0).
pub fn assert_same(a: &Full, b: &Full) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(a.dense.keys().collect::<Vec<_>>(), b.dense.keys().collect::<Vec<_>>());
    for (name, (v, st, steps)) in &a.dense {
        let (v2, st2, steps2) = &b.dense[name];
        assert_eq!(bits(v), bits(v2), "values of `{name}`");
        assert_eq!(st.len(), st2.len());
        for (x, y) in st.iter().zip(st2) {
            assert_eq!(bits(x), bits(y), "state of `{name}`");
        }
        assert_eq!(steps, steps2, "steps of `{name}`");
    }
    assert_eq!(a.sparse, b.sparse);
}
