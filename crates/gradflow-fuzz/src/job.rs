//! The job file: TOML read by the launcher and by every process of a job (gradflow-job).

use gradflow_job::JobConfig;

/// `JobConfig::parse`, the job file's entry point. A job that parses and validates must write
/// back to TOML and read back as the same job: the launcher passes it to every process (in the
/// cluster spec) and to Kubernetes in serialized form.
pub fn job_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(job) = JobConfig::parse(text) else { return };
    let toml = toml::to_string(&job).unwrap_or_else(|e| panic!("a valid job serializes to TOML: {e}"));
    let back =
        JobConfig::parse(&toml).unwrap_or_else(|e| panic!("a valid job reads back from `{toml}`: {e}"));
    assert_eq!(back, job, "TOML round trip of\n{toml}");
    let json = serde_json::to_string(&job).expect("a valid job serializes to JSON");
    let back: JobConfig =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("JSON round trip `{json}`: {e}"));
    assert_eq!(back, job, "JSON round trip");
}

/// A job with every section, beside the examples shipped in `examples/`.
const FULL: &str = r#"
name = "fuzz-full"
servers = 3
workers = 2
mode = "async"
max_staleness = 4
restore = "latest"

[model]
kind = "logistic_regression"
hash_buckets = 1000
optimizer = { kind = "ftrl", lr = 0.1 }

[data]
train = ["a.svm", "b.svm"]
test = "t.svm"
format = "libsvm"
skip_malformed = true
shuffle_buffer = 0

[train]
batch_size = 32
epochs = 3
max_steps = 100
log_every_steps = 10

[server]
heartbeat_timeout = "2s"
partition_bytes = 4096

[transport]
chunk_bytes = 65536
initial_backoff = "10ms"

[checkpoint]
url = "memory://jobs/fuzz"
every_steps = 50
keep = 2

[auth]
enabled = false

[launcher]
max_restarts = 1
grace_period = "5s"
"#;

pub(crate) fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = vec![("job_file", "seed-full.toml".to_string(), FULL.as_bytes().to_vec())];
    for name in ["wide_deep", "breast_cancer", "tch_mlp"] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/").to_string() + name + ".toml";
        if let Ok(text) = std::fs::read(&path) {
            out.push(("job_file", format!("seed-{name}.toml"), text));
        }
    }
    out
}
