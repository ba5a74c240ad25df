//! `export`: the whole model as one safetensors file, read back with the Rust `safetensors`
//! crate and, when available, with Python's `safetensors.numpy` and `safetensors.torch`.
//!
//! The Python checks need `pip install safetensors numpy` (and torch for the torch check); each
//! is skipped with a notice when its modules are missing. `GRADFLOW_PYTHON` picks the
//! interpreter (default `python3`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Full, random_full, spec, split};
use gradflow_checkpoint::{CheckpointError, CheckpointStore};
use gradflow_core::ModelSpec;
use safetensors::{Dtype, SafeTensors};

async fn export(rows: usize, out: &Path) -> (ModelSpec, Full) {
    let spec = spec();
    let full = random_full(&spec, rows, 21);
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let url = format!("memory://export-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let store = CheckpointStore::open(&url).unwrap();
    for s in split(&spec, &full, 2, 256, 9) {
        store.write_shard(42, &s).await.unwrap();
    }
    store.finalize(42, 2, 0, Duration::from_secs(5)).await.unwrap();
    let m = store.resolve("latest").await.unwrap();
    store.export(&m, out).await.unwrap();
    (spec, full)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn check_with_rust(path: &Path, spec: &ModelSpec, full: &Full) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.metadata().as_ref().unwrap();
    assert_eq!(info["format"], "gradflow-export");
    assert_eq!(info["step"], "42");
    assert_eq!(info["mode"], "sync");
    assert_eq!(serde_json::from_str::<ModelSpec>(&info["spec"]).unwrap(), *spec);
    assert!(info["checkpoint"].ends_with("ckpt-000000000042"), "{}", info["checkpoint"]);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), spec.dense.len() + 2 * spec.sparse.len());
    for d in &spec.dense {
        let t = st.tensor(&d.name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), d.shape.iter().map(|&x| x as usize).collect::<Vec<_>>(), "{}", d.name);
        assert_eq!(f32s(t.data()), full.dense[&d.name].0, "{}", d.name);
    }
    for s in &spec.sparse {
        let rows = &full.sparse[&s.name];
        let ids = st.tensor(&format!("{}.ids", s.name)).unwrap();
        assert_eq!((ids.dtype(), ids.shape()), (Dtype::U64, &[rows.len()][..]));
        let got: Vec<u64> =
            ids.data().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, rows.keys().copied().collect::<Vec<_>>(), "ids of `{}`, sorted", s.name);
        let values = st.tensor(&format!("{}.values", s.name)).unwrap();
        assert_eq!((values.dtype(), values.shape()), (Dtype::F32, &[rows.len(), s.dim as usize][..]));
        let want: Vec<f32> = rows.values().flat_map(|(v, _, _)| v.iter().copied()).collect();
        assert_eq!(f32s(values.data()), want);
    }
}

#[tokio::test]
async fn export_reads_back_with_the_rust_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    for rows in [300, 0] {
        let out = dir.path().join(format!("model-{rows}.safetensors"));
        let (spec, full) = export(rows, &out).await;
        check_with_rust(&out, &spec, &full);
    }
}

#[tokio::test]
async fn export_refuses_a_missing_folder_and_name_clashes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/folder/model.safetensors");
    let store = CheckpointStore::open("memory://export-errors").unwrap();
    let spec = spec();
    let full = random_full(&spec, 3, 22);
    for s in split(&spec, &full, 1, 256, 1) {
        store.write_shard(1, &s).await.unwrap();
    }
    let m = store.finalize(1, 1, 0, Duration::from_secs(5)).await.unwrap();
    let err = store.export(&m, &out).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Export { .. }), "{err}");
    assert!(err.to_string().contains("no/such/folder"), "{err}");

    let mut clash = spec.clone();
    clash.dense[1].name = "emb.ids".into();
    let full = random_full(&clash, 3, 23);
    let store = CheckpointStore::open("memory://export-clash").unwrap();
    for s in split(&clash, &full, 1, 256, 1) {
        store.write_shard(1, &s).await.unwrap();
    }
    let m = store.finalize(1, 1, 0, Duration::from_secs(5)).await.unwrap();
    let err = store.export(&m, &dir.path().join("x.safetensors")).await.unwrap_err();
    assert!(err.to_string().contains("`emb.ids`"), "{err}");
}

fn python() -> String {
    std::env::var("GRADFLOW_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `script` with the file path as argv[1]; `None` (after a notice) when `modules` can't
/// be imported.
fn run_python(modules: &str, script: &str, path: &Path) -> Option<serde_json::Value> {
    let probe = Command::new(python()).args(["-c", &format!("import {modules}")]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!(
                "NOTICE: skipping the Python check: `{}` cannot import {modules} \
                 (pip install safetensors numpy{})",
                python(),
                if modules.contains("torch") { " torch" } else { "" }
            );
            return None;
        }
    }
    let out = Command::new(python()).args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

const NUMPY_SCRIPT: &str = r#"
import json, sys
from safetensors import safe_open
from safetensors.numpy import load_file
path = sys.argv[1]
tensors = load_file(path)
with safe_open(path, framework="np") as f:
    meta = f.metadata()
print(json.dumps({
    "meta": meta,
    "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.reshape(-1).tolist()}
                for k, v in tensors.items()},
}))
"#;

const TORCH_SCRIPT: &str = r#"
import json, sys, torch
from safetensors.torch import load_file
tensors = load_file(sys.argv[1])
out = {}
for k, v in tensors.items():
    flat = v.reshape(-1)
    values = [int(x) for x in flat.tolist()] if v.dtype == torch.uint64 else flat.tolist()
    out[k] = {"dtype": str(v.dtype), "shape": list(v.shape), "values": values}
print(json.dumps({"torch": torch.__version__, "tensors": out}))
"#;

fn check_python_tensors(
    tensors: &serde_json::Value,
    spec: &ModelSpec,
    full: &Full,
    u64_dtype: &str,
    f32_dtype: &str,
) {
    for d in &spec.dense {
        let t = &tensors[&d.name];
        assert_eq!(t["dtype"], f32_dtype, "{}", d.name);
        assert_eq!(t["shape"], serde_json::json!(d.shape), "{}", d.name);
        let got: Vec<f32> =
            t["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got, full.dense[&d.name].0, "{}", d.name);
    }
    for s in &spec.sparse {
        let rows = &full.sparse[&s.name];
        let ids = &tensors[format!("{}.ids", s.name)];
        assert_eq!(ids["dtype"], u64_dtype);
        let got: Vec<u64> = ids["values"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(got, rows.keys().copied().collect::<Vec<_>>(), "ids of `{}`", s.name);
        let values = &tensors[format!("{}.values", s.name)];
        assert_eq!(values["shape"], serde_json::json!([rows.len(), s.dim]));
        let got: Vec<f32> =
            values["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let want: Vec<f32> = rows.values().flat_map(|(v, _, _)| v.iter().copied()).collect();
        assert_eq!(got, want, "values of `{}`", s.name);
    }
}

#[tokio::test]
async fn export_loads_in_python_safetensors_numpy() {
    let dir = tempfile::tempdir().unwrap();
    for rows in [300, 0] {
        let out = dir.path().join(format!("model-{rows}.safetensors"));
        let (spec, full) = export(rows, &out).await;
        let Some(got) = run_python("safetensors.numpy, numpy", NUMPY_SCRIPT, &out) else { return };
        assert_eq!(got["meta"]["step"], "42");
        assert_eq!(got["meta"]["format"], "gradflow-export");
        check_python_tensors(&got["tensors"], &spec, &full, "uint64", "float32");
    }
}

#[tokio::test]
async fn export_loads_in_python_safetensors_torch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    let (spec, full) = export(300, &out).await;
    let Some(got) = run_python("safetensors.torch, torch", TORCH_SCRIPT, &out) else { return };
    eprintln!("checked with torch {}", got["torch"]);
    check_python_tensors(&got["tensors"], &spec, &full, "torch.uint64", "torch.float32");
}
