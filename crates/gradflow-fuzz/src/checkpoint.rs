//! What a shard reads from checkpoint storage: the checkpoint's manifest, a shard's manifest,
//! dense files (safetensors) and sparse table files.
//!
//! Every target goes through the public API (`resolve`, `finalize`, `verify`, `load_shard`,
//! `export`) on an in-memory store that holds a real checkpoint, written once per process by
//! two shards of [`wire::spec`]; the fuzzed bytes replace one of its objects. For a data file
//! the harness fixes the manifest's size and checksum (and, when the fuzzed file still
//! describes itself, the manifest's description of it), so that the parser is reached instead
//! of the checksum check.
//!
//! Whatever loads must be what the placement asks for and must be accepted by the server
//! (`ShardModel::from_snapshot`); whatever is refused must be refused with an error that names
//! the object or checkpoint at fault. An untouched input must load exactly what was written.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gradflow_checkpoint::{
    CheckpointError, CheckpointStore, Crc32c, FORMAT_VERSION, FileContent, MANIFEST_CHECKSUM_FIELD,
    MANIFEST_FORMAT, Manifest, PieceEntry, ShardSnapshot, StoreOptions, checkpoint_dir_name,
};
use gradflow_core::{Mode, ModelSpec, Placement};
use gradflow_proto::codec;
use gradflow_ps::model::{ShardModel, SparseAccum};
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use safetensors::SafeTensors;

use crate::wire::{self, PB, SHARDS};

/// The step of the fixture checkpoint.
const STEP: u64 = 7;
/// When the fixture's manifests say they were written.
const TIME: &str = "2026-01-01T00:00:00Z";
/// The store's URL, as errors name objects.
const URL: &str = "memory://fuzz/root";
/// The placements each fuzzed checkpoint is loaded onto: (shards, partition bytes). The same
/// as the writers', fewer, more and with other piece sizes (resharding paths).
const LOADS: [(u32, u64); 3] = [(1, 1 << 20), (SHARDS, PB), (3, 8)];

/// A real checkpoint in an in-memory store, and what loading it gives.
pub struct Fixture {
    rt: tokio::runtime::Runtime,
    mem: Arc<InMemory>,
    store: CheckpointStore,
    spec: ModelSpec,
    /// The checkpoint as `finalize` wrote it.
    manifest: Manifest,
    /// Every object of the checkpoint: (path under the root, bytes).
    objects: Vec<(String, Bytes)>,
    /// `load_shard` of the untouched checkpoint for each of [`LOADS`]: ((n, pb, shard), result).
    expected: Vec<((u32, u64, u32), ShardSnapshot)>,
    /// Where `export` writes.
    export_path: PathBuf,
}

fn dir() -> String {
    checkpoint_dir_name(STEP)
}

impl Fixture {
    fn build() -> Fixture {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let mem = Arc::new(InMemory::new());
        let options = StoreOptions { dense_file_bytes: 64, ..StoreOptions::default() };
        let store = CheckpointStore::from_object_store(mem.clone(), ObjPath::from("root"), URL, options);
        let spec = wire::spec();

        // Two shards with rows in every table and one optimizer step taken everywhere, so that
        // values, state and step counts are all non-trivial.
        let models: Vec<ShardModel> = (0..SHARDS).map(wire::model).collect();
        for m in &models {
            for p in m.pieces() {
                let g: Vec<f32> = (0..p.len()).map(|i| i as f32 - 1.0).collect();
                p.apply(&g);
            }
            let ids = wire::ids_on(m.shard(), 5);
            for t in m.tables() {
                let vals: Vec<f32> = (0..3 * t.dim()).map(|i| i as f32 * 0.5 + 0.25).collect();
                let mut acc = SparseAccum::default();
                acc.add(&ids[..3], &codec::f32s_to_bytes(&vals), t.dim());
                t.apply(&acc, 1.0);
                t.pull(&ids[3..], &mut Vec::new());
            }
        }
        let snaps: Vec<ShardSnapshot> = models.iter().map(|m| m.snapshot(STEP, Mode::Sync)).collect();
        rt.block_on(async {
            for s in &snaps {
                store.write_shard(STEP, s).await.expect("write_shard");
            }
            store.finalize(STEP, SHARDS, 0, Duration::from_secs(5)).await.expect("finalize");
        });

        let dir = dir();
        // Manifests hold the time they were written: pin it, so that every process has the
        // same checkpoint, byte for byte, and the committed seeds are the fixture's own files.
        let manifest =
            rt.block_on(async {
                let get = |p: String| {
                    let mem = mem.clone();
                    async move {
                        mem.get(&ObjPath::from(format!("root/{p}"))).await.unwrap().bytes().await.unwrap()
                    }
                };
                let put = |p: String, v: &serde_json::Value| {
                    let bytes = Bytes::from(if v.get(MANIFEST_CHECKSUM_FIELD).is_some() {
                        sealed(v)
                    } else {
                        serde_json::to_vec_pretty(v).unwrap()
                    });
                    let mem = mem.clone();
                    async move {
                        mem.put(&ObjPath::from(format!("root/{p}")), PutPayload::from(bytes.clone()))
                            .await
                            .unwrap();
                        bytes
                    }
                };
                let mut top: serde_json::Value =
                    serde_json::from_slice(&get(format!("{dir}/manifest.json")).await).unwrap();
                top["time"] = TIME.into();
                for s in 0..SHARDS as usize {
                    let path = format!("{dir}/shard-{s}/manifest.json");
                    let mut m: serde_json::Value = serde_json::from_slice(&get(path.clone()).await).unwrap();
                    m["time"] = TIME.into();
                    let bytes = put(path, &m).await;
                    top["shards"][s]["manifest"]["bytes"] = bytes.len().into();
                    top["shards"][s]["manifest"]["crc32c"] = Crc32c::of(&bytes).to_string().into();
                }
                put(format!("{dir}/manifest.json"), &top).await;
                store.resolve("latest").await.expect("the pinned fixture resolves")
            });
        let mut paths = vec!["latest".to_string(), format!("{dir}/manifest.json")];
        for s in &manifest.shards {
            paths.push(format!("{dir}/{}", s.manifest.path));
            paths.extend(s.files.iter().map(|f| format!("{dir}/{}", f.path)));
        }
        let objects = rt.block_on(async {
            let mut out = Vec::new();
            for p in paths {
                let bytes =
                    mem.get(&ObjPath::from(format!("root/{p}"))).await.expect(&p).bytes().await.unwrap();
                out.push((p, bytes));
            }
            out
        });
        let mut fx = Fixture {
            rt,
            mem,
            store,
            spec,
            manifest,
            objects,
            expected: Vec::new(),
            export_path: crate::scratch_dir().join("export.safetensors"),
        };

        let m = fx.rt.block_on(fx.store.resolve("latest")).expect("the fixture resolves");
        for (n, pb) in LOADS {
            for s in 0..n {
                let snap = fx.rt.block_on(fx.store.load_shard(&m, s, n, pb)).expect("the fixture loads");
                fx.expected.push(((n, pb, s), snap));
            }
        }
        // Loaded onto the writers' placement, it is what they wrote (rows sorted by id).
        for (s, written) in snaps.into_iter().enumerate() {
            let loaded = fx.expected(SHARDS, PB, s as u32);
            assert_eq!(loaded.dense, written.dense);
            for (l, mut w) in loaded.sparse.iter().zip(written.sparse) {
                let dim = w.dim as usize;
                let sdim = dim * w.num_slots as usize;
                let mut order: Vec<usize> = (0..w.ids.len()).collect();
                order.sort_by_key(|&i| w.ids[i]);
                w.ids = order.iter().map(|&i| w.ids[i]).collect();
                w.steps = order.iter().map(|&i| w.steps[i]).collect();
                w.values = order.iter().flat_map(|&i| w.values[i * dim..(i + 1) * dim].to_vec()).collect();
                w.state = order.iter().flat_map(|&i| w.state[i * sdim..(i + 1) * sdim].to_vec()).collect();
                assert_eq!(*l, w);
            }
        }
        fx
    }

    fn expected(&self, n: u32, pb: u64, shard: u32) -> &ShardSnapshot {
        &self.expected.iter().find(|(k, _)| *k == (n, pb, shard)).expect("a load of the fixture").1
    }

    fn object(&self, path: &str) -> &Bytes {
        &self.objects.iter().find(|(p, _)| p == path).expect("an object of the fixture").1
    }

    fn run<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    async fn put(&self, path: &str, data: Bytes) {
        self.mem.put(&ObjPath::from(format!("root/{path}")), PutPayload::from(data)).await.expect("put");
    }

    /// Puts every object back as the fixture wrote it.
    async fn reset(&self) {
        for (p, b) in &self.objects {
            self.put(p, b.clone()).await;
        }
    }
}

/// The process's fixture (built on first use).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::build)
}

/// Errors a refused checkpoint may get: it is corrupt, inconsistent or incomplete, and the
/// message names the object or checkpoint.
fn assert_refusal(e: &CheckpointError) {
    let ckpt = format!("{URL}/{}", dir());
    match e {
        CheckpointError::Corrupt { object, .. } | CheckpointError::MissingFile { object } => {
            assert!(object.starts_with(&ckpt), "names the object: {e}")
        }
        CheckpointError::Inconsistent { checkpoint, .. } => assert_eq!(*checkpoint, ckpt, "{e}"),
        other => panic!("a bad checkpoint must be Corrupt, Inconsistent or MissingFile, not {other:?}"),
    }
}

/// A loaded shard is exactly what the placement asks for, and the server restores it.
fn check_loaded(m: &Manifest, snap: &ShardSnapshot, shard: u32, n: u32, pb: u64) {
    assert_eq!((snap.shard, snap.num_shards, snap.partition_bytes), (shard, n, pb));
    assert_eq!((&snap.spec, snap.mode), (&m.spec, m.mode));
    assert_eq!(snap.version, m.versions().into_iter().max().unwrap_or(0));
    let placement = Placement::new(&m.spec, n, pb);
    let want: Vec<_> = placement.pieces_on(shard).collect();
    assert_eq!(snap.dense.len(), want.len(), "one snapshot piece per placed piece");
    for (d, p) in snap.dense.iter().zip(want) {
        let spec = &m.spec.dense[p.tensor];
        assert_eq!((d.tensor.as_str(), d.partition, d.offset), (spec.name.as_str(), p.partition, p.offset));
        assert_eq!(d.len(), p.len);
        assert_eq!(d.state.len() as u64, p.len * spec.optimizer.num_slots() as u64);
    }
    assert_eq!(snap.sparse.len(), m.spec.sparse.len(), "every table");
    for (t, spec) in snap.sparse.iter().zip(&m.spec.sparse) {
        assert_eq!(
            (t.table.as_str(), t.dim, t.num_slots as usize),
            (spec.name.as_str(), spec.dim, spec.optimizer.num_slots())
        );
        assert!(t.ids.is_sorted_by(|a, b| a < b), "rows sorted by id, each once");
        assert!(t.ids.iter().all(|&id| Placement::sparse_shard(id, n) == shard), "rows of this shard only");
        let (rows, dim) = (t.ids.len(), t.dim as usize);
        assert_eq!(
            (t.values.len(), t.state.len(), t.steps.len()),
            (rows * dim, rows * dim * t.num_slots as usize, rows)
        );
    }
    ShardModel::from_snapshot(snap.clone(), &Default::default())
        .expect("the server restores whatever load_shard returns");
}

/// Everything a reader does with a resolved (or finalized) manifest; `pristine` when the
/// checkpoint is the fixture's, so loads must give what the fixture loaded.
async fn exercise(fx: &Fixture, m: &Manifest, pristine: bool) {
    let _ = m.check_spec(&fx.spec);
    let _ = (m.info(), m.table_rows("emb"), m.files().count());
    match fx.store.verify(m).await {
        Ok(bytes) => {
            let listed: u128 = m
                .shards
                .iter()
                .map(|s| {
                    u128::from(s.manifest.bytes) + s.files.iter().map(|f| u128::from(f.bytes)).sum::<u128>()
                })
                .sum();
            assert_eq!(u128::from(bytes), listed, "verify reads every listed byte");
        }
        Err(e) => {
            assert!(!pristine, "the fixture verifies: {e}");
            assert_refusal(&e);
        }
    }
    let mut whole = None;
    for (n, pb) in LOADS {
        for s in 0..n {
            match fx.store.load_shard(m, s, n, pb).await {
                Ok(snap) => {
                    check_loaded(m, &snap, s, n, pb);
                    if pristine {
                        assert_eq!(&snap, fx.expected(n, pb, s), "the fixture loads as written");
                    }
                    if n == 1 {
                        whole = Some(snap);
                    }
                }
                Err(e) => {
                    assert!(!pristine, "the fixture loads: {e}");
                    assert_refusal(&e);
                }
            }
        }
    }
    match fx.store.export(m, &fx.export_path).await {
        Ok(()) => {
            let bytes = std::fs::read(&fx.export_path).expect("the export was written");
            let st = SafeTensors::deserialize(&bytes).expect("an export is a safetensors file");
            // The values of the whole model, as one shard loads them.
            if let Some(whole) = whole {
                for (d, spec) in m.spec.dense.iter().enumerate() {
                    let view = st.tensor(&spec.name).expect("every dense tensor is exported");
                    let values: Vec<f32> = whole
                        .dense
                        .iter()
                        .filter(|p| p.tensor == spec.name)
                        .flat_map(|p| p.values.iter().copied())
                        .collect();
                    assert_eq!(view.data(), &codec::f32s_to_bytes(&values)[..], "dense tensor {d} exported");
                }
            }
        }
        Err(CheckpointError::Export { .. }) => {}
        Err(e) => {
            assert!(!pristine, "the fixture exports: {e}");
            assert_refusal(&e);
        }
    }
}

/// The checkpoint's `manifest.json`, read by `resolve("latest")`.
pub fn ckpt_manifest(data: &[u8]) {
    let fx = fixture();
    let path = format!("{}/manifest.json", dir());
    let pristine = data == &fx.object(&path)[..];
    fx.run(async {
        fx.reset().await;
        fx.put(&path, Bytes::copy_from_slice(data)).await;
        let m = match fx.store.resolve("latest").await {
            Ok(m) => m,
            Err(e) => {
                assert!(!pristine, "the fixture resolves: {e}");
                return assert_refusal(&e);
            }
        };
        assert_eq!((m.format.as_str(), m.format_version), (MANIFEST_FORMAT, FORMAT_VERSION));
        assert_eq!(m.shards.len(), m.num_shards as usize);
        assert!(m.shards.iter().enumerate().all(|(i, s)| s.shard as usize == i));
        exercise(fx, &m, pristine).await;
    });
}

/// Shard 1's `manifest.json`, read by `finalize` (which checks that the shards agree and cover
/// every dense tensor exactly once before it writes the checkpoint's manifest).
pub fn ckpt_shard_manifest(data: &[u8]) {
    let fx = fixture();
    let path = format!("{}/shard-1/manifest.json", dir());
    let pristine = data == &fx.object(&path)[..];
    fx.run(async {
        fx.reset().await;
        fx.put(&path, Bytes::copy_from_slice(data)).await;
        let m = match fx.store.finalize(STEP, SHARDS, 0, Duration::ZERO).await {
            Ok(m) => m,
            Err(e) => {
                assert!(!pristine, "the fixture finalizes: {e}");
                return assert_refusal(&e);
            }
        };
        // What finalize promises: every element of every dense tensor in exactly one piece.
        for d in &m.spec.dense {
            let mut ranges: Vec<(u64, u64)> = m
                .files()
                .filter_map(|f| match &f.content {
                    FileContent::Dense { pieces } => Some(pieces),
                    FileContent::Sparse { .. } => None,
                })
                .flatten()
                .filter(|p| p.tensor == d.name)
                .map(|p| (p.offset, p.len))
                .collect();
            ranges.sort();
            let mut next = 0u64;
            for (offset, len) in ranges {
                assert_eq!(offset, next, "`{}` covered once, in order", d.name);
                next = offset.checked_add(len).expect("no piece ends past u64::MAX");
            }
            assert_eq!(
                Some(next),
                d.shape.iter().try_fold(1u64, |a, &b| a.checked_mul(b)),
                "`{}` covered",
                d.name
            );
        }
        let resolved = fx.store.resolve("latest").await.expect("a finalized checkpoint resolves");
        assert_eq!(resolved.shards, m.shards);
        exercise(fx, &m, pristine).await;
    });
}

/// Replaces the checkpoint file `path` (under the checkpoint directory) of shard 0 with
/// `data`, with the manifest's size and checksum fixed and `describe` applied to its entry.
async fn replace_file(fx: &Fixture, path: &str, data: &[u8], describe: impl FnOnce(&mut FileContent)) {
    let mut m = fx.manifest.clone();
    let entry = m.shards[0].files.iter_mut().find(|f| f.path == path).expect("a file of shard 0");
    entry.bytes = data.len() as u64;
    entry.crc32c = Crc32c::of(data);
    describe(&mut entry.content);
    fx.reset().await;
    fx.put(&format!("{}/{path}", dir()), Bytes::copy_from_slice(data)).await;
    let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
    fx.put(&format!("{}/manifest.json", dir()), Bytes::from(json)).await;
}

/// The path of shard 0's first file of a kind.
fn first_file(fx: &Fixture, dense: bool) -> String {
    let f = fx.manifest.shards[0]
        .files
        .iter()
        .find(|f| matches!(f.content, FileContent::Dense { .. }) == dense)
        .expect("shard 0 has dense and sparse files");
    f.path.clone()
}

/// Shard 0's first dense file, a safetensors file. When its `gradflow` metadata still lists
/// pieces, the manifest lists the same ones (as the writer would have).
pub fn ckpt_dense_file(data: &[u8]) {
    let fx = fixture();
    let path = first_file(fx, true);
    let pristine = data == &fx.object(&format!("{}/{path}", dir()))[..];
    let pieces = SafeTensors::read_metadata(data).ok().and_then(|(_, meta)| {
        let json = meta.metadata().as_ref()?.get("gradflow")?;
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        serde_json::from_value::<Vec<PieceEntry>>(v.get("pieces")?.clone()).ok()
    });
    fx.run(async {
        replace_file(fx, &path, data, |c| {
            if let (FileContent::Dense { pieces: listed }, Some(p)) = (c, pieces) {
                *listed = p;
            }
        })
        .await;
        let m = fx.store.resolve("latest").await.expect("the harness writes a valid manifest");
        exercise(fx, &m, pristine).await;
    });
}

/// Shard 0's first sparse table file. When its header still parses as JSON, the manifest
/// describes the table the same way (as the writer would have).
pub fn ckpt_sparse_file(data: &[u8]) {
    let fx = fixture();
    let path = first_file(fx, false);
    let pristine = data == &fx.object(&format!("{}/{path}", dir()))[..];
    let header = (|| {
        let len = u32::from_le_bytes(data.get(12..16)?.try_into().ok()?) as usize;
        let json = data.get(16..16usize.checked_add(len)?)?;
        serde_json::from_slice::<serde_json::Value>(json).ok()
    })();
    fx.run(async {
        replace_file(fx, &path, data, |c| {
            if let (FileContent::Sparse { table, dim, num_slots, rows }, Some(h)) = (c, header) {
                let num = |k: &str| h.get(k).and_then(serde_json::Value::as_u64);
                if let Some(t) = h.get("table").and_then(serde_json::Value::as_str) {
                    *table = t.to_string();
                }
                *dim = num("dim").and_then(|v| u32::try_from(v).ok()).unwrap_or(*dim);
                *num_slots = num("num_slots").and_then(|v| u32::try_from(v).ok()).unwrap_or(*num_slots);
                *rows = num("rows").unwrap_or(*rows);
            }
        })
        .await;
        let m = fx.store.resolve("latest").await.expect("the harness writes a valid manifest");
        exercise(fx, &m, pristine).await;
    });
}

pub(crate) fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let fx = fixture();
    let d = dir();
    vec![
        ("ckpt_manifest", "seed-manifest.json".into(), fx.object(&format!("{d}/manifest.json")).to_vec()),
        (
            "ckpt_shard_manifest",
            "seed-shard-1-manifest.json".into(),
            fx.object(&format!("{d}/shard-1/manifest.json")).to_vec(),
        ),
        (
            "ckpt_dense_file",
            "seed-dense.safetensors".into(),
            fx.object(&format!("{d}/{}", first_file(fx, true))).to_vec(),
        ),
        (
            "ckpt_sparse_file",
            "seed-sparse.bin".into(),
            fx.object(&format!("{d}/{}", first_file(fx, false))).to_vec(),
        ),
    ]
}

/// A checkpoint manifest's bytes as gradflow writes them: pretty JSON closed by its
/// checksum field, the CRC-32C of every byte before that field's `,`.
fn sealed(v: &serde_json::Value) -> Vec<u8> {
    let mut v = v.clone();
    v.as_object_mut().expect("a manifest is an object").remove(MANIFEST_CHECKSUM_FIELD);
    let mut json = serde_json::to_vec_pretty(&v).unwrap();
    json.truncate(json.len() - 2);
    let crc = Crc32c::of(&json);
    json.extend_from_slice(format!(",\n  \"{MANIFEST_CHECKSUM_FIELD}\": \"{crc}\"\n}}\n").as_bytes());
    json
}
