//! Model selection through `gradflow launch`: `[checkpoint] keep_best` keeps the best-scoring
//! checkpoint beside the newest `keep`, and `[train] early_stop_patience` ends the job once
//! the scores stop improving.

mod common;

use common::*;

/// A wide & deep job on little data with a large embedding table and a high learning rate:
/// it fits its training rows by heart within an epoch or two, so its test AUC peaks early and
/// then falls, as the example job's does.
fn overfitting_job(name: &str, extra_train: &str, extra_checkpoint: &str) -> String {
    format!(
        r#"
name = "{name}"
servers = 2
workers = 2
mode = "sync"

[model]
kind = "wide_deep"
num_fields = 26
num_dense = 13
embedding_dim = 16
sparse_optimizer = {{ kind = "adagrad", lr = 0.2 }}
dense_optimizer = {{ kind = "adagrad", lr = 0.05 }}

[data]
train = "data/train.csv"
test = "data/test.csv"

[data.synth]
train_rows = 40000
test_rows = 10000
seed = 11
vocab_per_field = 2000

[train]
batch_size = 256
epochs = 8
{extra_train}

[checkpoint]
url = "ckpt"
every_steps = 10
keep = 1
{extra_checkpoint}
"#
    )
}

fn best_pointer(dir: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("ckpt/best")).expect("a best pointer beside latest");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("best pointer {text:?}: {e}"))
}

/// Steps of the complete checkpoints under `ckpt/` (a folder with a manifest).
fn checkpoints(dir: &std::path::Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir.join("ckpt"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest.json").exists())
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("ckpt-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

fn latest_step(dir: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("ckpt/latest")).unwrap();
    text.trim().strip_prefix("ckpt-").unwrap().parse().unwrap()
}

#[test]
fn keep_best_keeps_the_best_checkpoint_and_early_stopping_ends_the_job_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let name = "select-stop";
    let job = write(
        dir.path(),
        "job.toml",
        &overfitting_job(name, "early_stop_patience = 2", "keep_best = \"test_auc\""),
    );
    let out = launch(&job);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the job fails: {stderr}");
    assert!(processes_of_job(name).is_empty(), "a process of the job outlived it");

    let evals = results(dir.path(), name);
    let aucs: Vec<f64> = evals.iter().map(|e| e["test_auc"].as_f64().unwrap()).collect();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    eprintln!("test AUC by epoch: {aucs:?} at steps {steps:?}");
    let best = (0..aucs.len()).fold(0, |b, i| if aucs[i] > aucs[b] { i } else { b });
    // Early stopping: two evaluations without a better AUC after the best one, then the end,
    // well before the 8 epochs.
    assert_eq!(aucs.len(), best + 3, "patience 2 stops right after the second epoch without improvement");
    assert!(aucs.len() < 8, "early stopping ended the job before its 8 epochs");

    // The best checkpoint: the model the best evaluation scored, with its score.
    let pointer = best_pointer(dir.path());
    assert_eq!(pointer["metric"], "test_auc");
    assert_eq!(pointer["step"].as_u64(), Some(steps[best]), "{pointer}");
    assert_eq!(pointer["score"].as_f64(), Some(aucs[best]), "{pointer}");
    assert_eq!(pointer["epoch"].as_u64(), Some(best as u64 + 1), "{pointer}");
    // keep = 1 would have deleted it long ago: it is kept beside the latest, which is the model
    // training ended with (the last one scored).
    let latest = latest_step(dir.path());
    assert_eq!(latest, *steps.last().unwrap(), "the job's last checkpoint is the model training ended with");
    assert!(steps[best] < latest);
    assert_eq!(checkpoints(dir.path()), vec![steps[best], latest]);

    // `--step best` scores exactly that model.
    let out = gradflow()
        .args(["eval", "--checkpoint"])
        .arg(dir.path().join("ckpt"))
        .args(["--step", "best", "--test"])
        .arg(dir.path().join("data/test.csv"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(line["step"].as_u64(), Some(steps[best]), "{stdout}");
    let auc = line["test_auc"].as_f64().unwrap();
    assert!((auc - aucs[best]).abs() < 1e-6, "eval --step best: AUC {auc}, the job reported {}", aucs[best]);
}

#[test]
fn early_stopping_without_keep_best_goes_by_the_test_auc_and_checkpoints_the_model_it_ended_with() {
    let dir = tempfile::tempdir().unwrap();
    let name = "stop-auc";
    let job = write(dir.path(), "job.toml", &overfitting_job(name, "early_stop_patience = 1", ""));
    let out = launch(&job);
    assert!(out.status.success(), "the job fails: {}", String::from_utf8_lossy(&out.stderr));
    assert!(processes_of_job(name).is_empty(), "a process of the job outlived it");
    let evals = results(dir.path(), name);
    let aucs: Vec<f64> = evals.iter().map(|e| e["test_auc"].as_f64().unwrap()).collect();
    let best = (0..aucs.len()).fold(0, |b, i| if aucs[i] > aucs[b] { i } else { b });
    assert_eq!(aucs.len(), best + 2, "patience 1 by the test AUC: {aucs:?}");
    // No best pointer without keep_best; the last checkpoint (on_shutdown) is of the model
    // training ended with: the last one scored, not a step past it.
    assert!(!dir.path().join("ckpt/best").exists());
    let last = evals.last().unwrap()["step"].as_u64().unwrap();
    assert_eq!(latest_step(dir.path()), last, "{evals:?}");
}

#[test]
fn model_selection_settings_that_cannot_work_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    for (extra_train, extra_checkpoint, says) in [
        ("early_stop_patience = 0", "", "train.early_stop_patience: expected at least 1"),
        ("", "keep_best = \"auc\"", "keep_best"),
    ] {
        let job = write(dir.path(), "bad.toml", &overfitting_job("bad", extra_train, extra_checkpoint));
        let out = launch(&job);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{says}: {stderr}");
    }
    let no_test =
        overfitting_job("bad", "early_stop_patience = 2", "").replace("test = \"data/test.csv\"\n", "");
    let no_test = no_test.replace("test_rows = 10000\n", "");
    let out = launch(&write(dir.path(), "bad.toml", &no_test));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("set data.test"), "{stderr}");
}
