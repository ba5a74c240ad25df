//! Embedding tables at scale through whole jobs: raw 64-bit ids from a large vocabulary stay
//! within `max_rows` with admission, still learn, and a restored job goes on with the rows it
//! had.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use gradflow_checkpoint::{CheckpointStore, ShardSnapshot};

const CAP: usize = 20_000;

fn job_text(ckpt: &Path, extra: &str) -> String {
    let tail = format!(
        "[embedding]\nmax_rows = {CAP}\nadmit_min_count = 2\n[checkpoint]\nurl = \"{}\"\nkeep = 5\n{extra}",
        ckpt.display()
    );
    wide_deep_job("raw-ids", 2, "sync", if extra.contains("max_steps") { "restore = \"latest\"" } else { "" })
        .replace("num_dense = 13\n", "num_dense = 13\nhash_buckets = 0\n")
        .replace("train_rows = 300000", "train_rows = 150000\nvocab_per_field = 1000000")
        .replace("test_rows = 25000", "test_rows = 20000")
        + &tail
}

/// Each shard's part of the latest checkpoint, and its step.
fn shards(url: &Path) -> (u64, Vec<ShardSnapshot>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = CheckpointStore::open(url.to_str().unwrap()).unwrap();
        let m = store.resolve("latest").await.unwrap();
        let mut out = Vec::new();
        for s in 0..m.num_shards {
            out.push(store.load_shard(&m, s, m.num_shards, m.partition_bytes).await.unwrap());
        }
        (m.step, out)
    })
}

#[test]
fn raw_ids_from_a_million_per_field_stay_under_the_cap_learn_and_survive_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let job = write(dir.path(), "raw.toml", &job_text(&ckpt, ""));
    let out = launch(&job);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let auc = results(dir.path(), "raw-ids").last().unwrap()["test_auc"].as_f64().unwrap();
    assert!(auc >= 0.70, "test AUC {auc} under the cap");

    let (step, first) = shards(&ckpt);
    assert_eq!(first.len(), 2);
    for s in &first {
        for t in &s.sparse {
            assert!(
                t.rows() <= CAP,
                "shard {} table {}: {} rows over the cap {CAP}",
                s.shard,
                t.table,
                t.rows()
            );
        }
    }
    // The cap was reached: 26 fields of a million values each offer far more ids than it.
    let emb = |s: &ShardSnapshot| s.sparse.iter().find(|t| t.table == "embedding").unwrap().clone();
    assert!(first.iter().all(|s| emb(s).rows() > CAP / 2), "the embedding table filled up");
    assert!(first.iter().all(|s| !emb(s).sketch.is_empty() && emb(s).clock as u64 == step));

    // Restored, one step on: the rows it had are still there, bar what that step evicted (a
    // step brings about a third of the cap in ids; a table restored empty would hold none of
    // them, since admission needs two pushes), and those the step did not update are as they
    // were.
    let job = write(
        dir.path(),
        "raw-restored.toml",
        &job_text(&ckpt, &format!("[train]\nepochs = 2\nmax_steps = {}\n", step + 1)),
    );
    let out = launch(&job);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (step2, second) = shards(&ckpt);
    assert_eq!(step2, step + 1);
    for (a, b) in first.iter().zip(&second) {
        let (a, b) = (emb(a), emb(b));
        assert!(b.rows() <= CAP);
        assert_eq!(b.clock as u64, step2, "the table's clock went on from the checkpoint's");
        let dim = a.dim as usize;
        let before: HashMap<u64, usize> = a.ids.iter().enumerate().map(|(k, &id)| (id, k)).collect();
        let (mut kept, mut unchanged) = (0, 0);
        for (k, id) in b.ids.iter().enumerate() {
            let Some(&j) = before.get(id) else { continue };
            kept += 1;
            if b.touched[k] < b.clock {
                unchanged += 1;
                assert_eq!((b.steps[k], b.touched[k]), (a.steps[j], a.touched[j]), "row {id}");
                assert_eq!(b.values[k * dim..(k + 1) * dim], a.values[j * dim..(j + 1) * dim], "row {id}");
            }
        }
        assert!(kept * 2 >= a.rows(), "{kept} of {} rows kept after one step", a.rows());
        assert!(unchanged * 4 >= a.rows(), "{unchanged} of {} rows kept as they were", a.rows());
    }

    // `checkpoint inspect` shows the rows of the fullest shard and the table's bytes.
    let out = gradflow().args(["checkpoint", "inspect"]).arg(&ckpt).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("MOST ON A SHARD") && text.contains("BYTES"), "{text}");
    let line = text.lines().find(|l| l.trim_start().starts_with("embedding ")).expect("a line for the table");
    let most: usize = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let fullest = second.iter().map(|s| emb(s).rows()).max().unwrap();
    assert_eq!(most, fullest, "{line}");
}
