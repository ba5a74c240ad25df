//! Whole jobs through `gradflow launch`: the accuracy users care about.

mod common;

use common::*;

fn auc_of(dir: &std::path::Path, job: &str) -> f64 {
    let r = results(dir, job);
    r.last().unwrap()["test_auc"].as_f64().unwrap()
}

#[test]
fn sync_and_async_with_two_workers_reach_the_auc_of_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut aucs = Vec::new();
    let bf16 = "[transport]\ncompression = \"bf16\"\n";
    for (name, workers, mode, extra) in [
        ("one", 1, "sync", ""),
        ("two-sync", 2, "sync", ""),
        ("two-async", 2, "async", ""),
        ("two-sync-bf16", 2, "sync", bf16),
    ] {
        let job = write(dir.path(), &format!("{name}.toml"), &wide_deep_job(name, workers, mode, extra));
        let out = launch(&job);
        assert!(out.status.success(), "{name} failed: {}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("test AUC"), "{name}: the launcher prints the test AUC:\n{stderr}");
        aucs.push(auc_of(dir.path(), name));
    }
    let (one, sync, asynch, bf16) = (aucs[0], aucs[1], aucs[2], aucs[3]);
    eprintln!("test AUC: 1 worker {one:.4}, 2 sync {sync:.4}, 2 async {asynch:.4}, 2 sync bf16 {bf16:.4}");
    // The synthetic data's oracle AUC is about 0.80; logistic regression gets about 0.72.
    assert!(one > 0.70, "one worker learns: AUC {one}");
    assert!((sync - one).abs() < 0.005, "sync 2 workers AUC {sync} vs 1 worker {one}");
    assert!((asynch - one).abs() < 0.01, "async 2 workers AUC {asynch} vs 1 worker {one}");
    // Gradients and values in bfloat16 on the wire (`[transport] compression`).
    assert!((bf16 - sync).abs() < 0.005, "sync 2 workers, bf16 on the wire: AUC {bf16} vs f32 {sync}");
}

#[test]
fn breast_cancer_example_reaches_95_percent_test_accuracy() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/breast_cancer.toml");
    let dir = tempfile::tempdir().unwrap();
    // Same job, output redirected into the temporary directory.
    let text = std::fs::read_to_string(&example).unwrap();
    let data = example.parent().unwrap().join("data");
    let text = text
        .replace("data/breast_cancer_", &format!("{}/breast_cancer_", data.display()))
        .replace("dir = \"../runs/breast-cancer\"", "dir = \"runs/breast-cancer\"");
    let job = write(dir.path(), "bc.toml", &text);
    let out = launch(&job);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = results(dir.path(), "breast-cancer").pop().unwrap();
    let acc = last["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "test accuracy {acc}");
    assert_eq!(last["test_examples"].as_u64(), Some(114));
}
