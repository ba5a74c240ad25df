//! Job files whose model is too large to count or to hold, launched for real: the servers
//! refuse the model when the first worker declares it, naming the sizes, before allocating
//! it; the job fails (non-zero exit) instead of a server allocating until it is killed.

mod common;

use std::time::{Duration, Instant};

use common::{launch, write};

fn job(name: &str, model: &str, server: &str) -> String {
    format!(
        r#"
name = "{name}"
servers = 1
workers = 1
mode = "sync"
[launcher]
max_restarts = 0
[server]
{server}
[model]
kind = "wide_deep"
num_fields = 26
num_dense = 13
{model}
[data]
train = "data/train.csv"
test = "data/test.csv"
[data.synth]
train_rows = 2000
test_rows = 200
seed = 5
"#
    )
}

/// Launches the job and returns its stderr, checking that it failed, and quickly.
fn refused(name: &str, model: &str, server: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "job.toml", &job(name, model, server));
    let started = Instant::now();
    let out = launch(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{name}: the job must fail\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(240), "{name}: took {:?}", started.elapsed());
    stderr
}

#[test]
fn a_hidden_layer_of_four_billion_is_refused_at_declare_by_name() {
    let stderr = refused("huge-hidden", "hidden = [4000000000]", "");
    assert!(stderr.contains("`deep_w0` [221, 4000000000] (884000000000 elements)"), "{stderr}");
    assert!(stderr.contains("server.max_memory"), "{stderr}");
}

#[test]
fn an_embedding_dim_of_a_hundred_million_is_refused_at_declare_by_name() {
    let stderr = refused("huge-embedding", "embedding_dim = 100000000", "");
    assert!(stderr.contains("`embedding` (dim 100000000) is 400000000 bytes"), "{stderr}");
}

#[test]
fn server_max_memory_in_the_job_file_bounds_the_model() {
    // The default wide & deep model needs some 200 KB of dense memory on its server.
    let stderr = refused("small-budget", "", "max_memory = 1000");
    assert!(stderr.contains("server.max_memory (1000 bytes)"), "{stderr}");
}
