//! The job file: one TOML document that says everything about a training job.
//!
//! Every launcher backend and every process of a job reads the same [`JobConfig`]. Unknown
//! keys are errors that name the key; every field has a documented default except `name`,
//! `data.train`, and the model.
//!
//! The sections the servers read (`[server]`, `[checkpoint]`, `restore`) are gradflow-core's
//! [`ServerSettings`], [`CheckpointConfig`] and [`Restore`], which gradflow-ps builds each
//! shard's settings from: one definition, one set of defaults. The `[kubernetes]` section is
//! kept as written ([`KubernetesSection`]); the Kubernetes backend reads and checks it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gradflow_core::Mode;
use gradflow_core::embedding::EmbeddingSettings;
use gradflow_core::settings::{CheckpointConfig, Metric, Restore, ServerSettings};
use gradflow_data::{CsvSchema, Epochs, Format, LibsvmOptions, ReaderConfig, SynthConfig};
use gradflow_models::ModelConfig;
use gradflow_proto::TransportConfig;
use gradflow_proto::tls::{ClientTls, TlsConfig};
use serde::{Deserialize, Deserializer, Serialize};

use crate::JobError;

/// A training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name: lowercase letters, digits and `-`, at most 40 characters (it names processes,
    /// directories and Kubernetes objects). Required.
    pub name: String,
    /// Parameter-server shards. Default 1.
    #[serde(default = "one")]
    pub servers: u32,
    /// Worker processes. Default 1.
    #[serde(default = "one")]
    pub workers: u32,
    /// `"sync"` (default) or `"async"`.
    #[serde(default)]
    pub mode: Mode,
    /// Async only: how many steps the fastest worker may run ahead of the slowest.
    /// Default: unbounded.
    #[serde(default)]
    pub max_staleness: Option<u64>,
    /// The built-in model to train (`kind = "wide_deep"` or `"logistic_regression"`).
    /// Required unless `worker.command` runs your own trainer, which declares its own model.
    #[serde(default)]
    pub model: Option<ModelConfig>,
    /// Training and test data.
    pub data: DataConfig,
    /// Batch size, epochs, logging cadence.
    #[serde(default)]
    pub train: TrainConfig,
    /// Where results and logs go.
    #[serde(default)]
    pub output: OutputConfig,
    /// Parameter-server settings (`[server]`, see [`ServerSettings`]).
    #[serde(default)]
    pub server: ServerSettings,
    /// Admission and eviction of sparse table rows (`[embedding]`, see
    /// [`EmbeddingSettings`]). Default: every pushed id gets a row, kept for good.
    #[serde(default, skip_serializing_if = "EmbeddingSettings::is_default")]
    pub embedding: EmbeddingSettings,
    /// gRPC transport settings shared by servers and workers.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Who may call the job's servers (`[auth]`). Default: a fresh token per job.
    #[serde(default)]
    pub auth: AuthConfig,
    /// TLS between the job's processes (`[tls]`): `cert`, `key` and `ca` (PEM files,
    /// relative to the job file) required; mutual TLS with `client_ca`, `client_cert` and
    /// `client_key`; `domain` to verify another name than the address's host. See
    /// `gradflow_proto::tls::TlsConfig` and docs/security.md. Default: none, plaintext.
    /// Left out of the serialized job when off, so jobs without TLS serialize as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// What a worker process runs. Default: the built-in trainer (`gradflow worker`).
    #[serde(default)]
    pub worker: WorkerSection,
    /// Local launcher settings.
    #[serde(default)]
    pub launcher: LauncherConfig,
    /// Checkpoints: `url` (default `./checkpoints`, relative to the job file), `every_steps`
    /// (1000), `every` (off), `keep` (3), `on_shutdown` (true), `finalize_timeout` ("300s").
    /// Default: no checkpoints.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    /// Start the servers from a checkpoint: `"latest"`, a step, or the URL or path of a
    /// checkpoint directory (see [`Restore`]). Default: none, a fresh model.
    #[serde(default)]
    pub restore: Option<Restore>,
    /// Settings of the Kubernetes backend (`[kubernetes]`: image, resources, scheduling,
    /// volumes), kept as written; the Kubernetes backend reads and checks them, the local
    /// backend ignores them. Default: none, which runs with the defaults.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
}

fn one() -> u32 {
    1
}

/// The `[auth]` section: the token every call to the job's servers must carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Check a token on every call. Default true; false lets anyone who can reach a server
    /// read and change the model (only for debugging with generic gRPC tools).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Read the token from this file (a mounted Secret, say; relative to the job file).
    /// Default: the launcher's `GRADFLOW_TOKEN` if set, else a fresh random token per job.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { enabled: true, token_file: None }
    }
}

impl AuthConfig {
    /// The token the job's processes get: none when disabled; else from `token_file`, the
    /// environment, or freshly generated.
    pub fn token(&self) -> Result<Option<crate::contract::Token>, JobError> {
        use crate::contract::Token;
        if !self.enabled {
            return Ok(None);
        }
        if let Some(path) = &self.token_file {
            return Token::from_file(path).map(Some).map_err(JobError::Token);
        }
        Ok(Some(Token::from_env()?.unwrap_or_else(Token::generate)))
    }
}

/// The `[worker]` section: what each worker process runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// Your own trainer instead of `gradflow worker`: a program and its arguments, for example
    /// `["target/release/examples/tch_mlp", "--hidden", "32"]`. A program path with a `/` is
    /// relative to the job file; a bare name is looked up on `PATH`. The program gets the same
    /// environment as a built-in worker (see `contract`) and reports on standard output with
    /// `@gradflow` event lines. Default: none.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

/// Where the data is and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training file(s), directories or globs (`data/part-*.csv`), local or URLs (`s3://`,
    /// `gs://`, `az://`, `http(s)://`, `file://`; credentials from `AWS_*`, `GOOGLE_*`, `AZURE_*`
    /// as for checkpoints). Relative paths are relative to the job file.
    #[serde(deserialize_with = "gradflow_data::reader::one_or_many")]
    pub train: Vec<PathBuf>,
    /// Test file(s), scored at the end of every epoch and of the job. Default: none.
    #[serde(default, deserialize_with = "gradflow_data::reader::one_or_many")]
    pub test: Vec<PathBuf>,
    /// `"csv"`, `"libsvm"`, `"parquet"` or `"tfrecord"`. Default: from the first training file's
    /// extension (`.csv`; `.libsvm`, `.svm`, `.libffm`, `.ffm`; `.parquet`; `.tfrecord`; after a
    /// `.gz` or `.zst`), CSV when it names none; the test files' from the first test file's extension, or the
    /// training files' format when it names none (a folder, `a9a.t`).
    #[serde(default)]
    pub format: Format,
    /// CSV, Parquet, TFRecord: the label column (or feature). Default `"label"`.
    #[serde(default = "default_label")]
    pub label: String,
    /// CSV, Parquet, TFRecord: the categorical columns or features (strings or integers; a
    /// Parquet list column or a many-valued feature is a multi-id field); every other column is
    /// a dense feature. Default: none.
    #[serde(default)]
    pub categorical: Vec<String>,
    /// libsvm: features with an index (in the `field:id:value` form, a field) below this are
    /// dense features, and the categorical fields after them are numbered from 0. Default 0.
    #[serde(default)]
    pub dense_indices: usize,
    /// Skip (and count) lines that do not parse instead of failing. Default false.
    #[serde(default)]
    pub skip_malformed: bool,
    /// Examples in the streaming shuffle buffer; 0 reads in file order. Default 10000.
    #[serde(default = "default_shuffle")]
    pub shuffle_buffer: usize,
    /// Standardize dense features with mean and std measured on the first
    /// `standardize_rows` rows of the training data (the same on every worker). Default true.
    #[serde(default = "yes")]
    pub standardize: bool,
    /// Rows used to measure the standardization. Default 10000.
    #[serde(default = "default_standardize_rows")]
    pub standardize_rows: usize,
    /// Generate synthetic click-through data into `train` and `test` (one file each) when the
    /// files do not exist yet. The CSV schema then comes from the generator. Default: off.
    #[serde(default)]
    pub synth: Option<SynthData>,
    /// How the training data is divided among workers. `"static"` (default): worker `i` of
    /// `n` reads the `i`-th byte range of every file, fixed for the job. `"dynamic"`: the
    /// files are cut into tasks of about `task_bytes` that the first server hands out as
    /// workers become free; a dead worker's unfinished task goes to another worker from
    /// where it stopped, and the tasks done are part of every checkpoint. A `worker.command`
    /// of your own gets dynamic sharding only if it takes its data from gradflow (the Python
    /// package's `Worker.batches()`); one that reads its files itself must use static.
    #[serde(default)]
    pub sharding: Sharding,
    /// Dynamic sharding: bytes of training file per task. Default 4 MiB.
    #[serde(default = "default_task_bytes")]
    pub task_bytes: u64,
}

/// How the training data is divided among workers; see [`DataConfig::sharding`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// A fixed byte range of every file per worker.
    #[default]
    Static,
    /// Tasks handed out by the first server.
    Dynamic,
}

/// Synthetic data written by the launcher before the job starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthData {
    /// Training rows. Default 200000.
    #[serde(default = "default_train_rows")]
    pub train_rows: u64,
    /// Test rows. Default 50000.
    #[serde(default = "default_test_rows")]
    pub test_rows: u64,
    /// Seed of the hidden model and the rows. Train and test are one generated dataset, split:
    /// same hidden model, different rows. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Dense columns. Default 13.
    #[serde(default = "default_synth_dense")]
    pub num_dense: usize,
    /// Categorical columns. Default 26.
    #[serde(default = "default_synth_cat")]
    pub num_categorical: usize,
    /// Distinct values per categorical column. Default 10000.
    #[serde(default = "default_vocab")]
    pub vocab_per_field: u32,
}

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Examples per step per worker. Default 256.
    pub batch_size: usize,
    /// Passes over the training data. Default 1.
    pub epochs: u64,
    /// Stop when the job reaches this step (each worker's step count), even mid-epoch.
    /// Default: no limit.
    pub max_steps: Option<u64>,
    /// Seed of the data shuffle. Default 0.
    pub seed: u64,
    /// A progress line every this many steps. Default 50.
    pub log_every_steps: u64,
    /// Stop the job (cleanly: last checkpoint, exit code 0) after this many evaluations in a
    /// row without improvement of the selection score: `[checkpoint] keep_best`, else
    /// `test_auc`. The built-in trainer evaluates at every epoch end. Default: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stop_patience: Option<u64>,
}

/// Where a job's outputs go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Directory for results and generated data. Default `runs/<name>` next to the job file.
    pub dir: Option<PathBuf>,
    /// File (in `dir`) that receives one JSON line per evaluation. Default `results.jsonl`.
    pub results: PathBuf,
    /// Log filter for every process (tracing's env-filter syntax). Default `"info"`.
    pub log: String,
    /// Serve Prometheus metrics from every server on a free port. Default true.
    pub metrics: bool,
    /// Local backend: where the servers' `/metrics` endpoints listen (plain HTTP), apart from
    /// their gRPC port: `"host:port"`; port 0 picks a free port per server, any other port
    /// is the first shard's and shard `i` takes `port + i`. For example `"0.0.0.0:0"` lets
    /// a Prometheus on another machine scrape while gRPC stays on loopback. Kubernetes pods
    /// always serve it on port 9090. Default `"127.0.0.1:0"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

/// The local launcher's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LauncherConfig {
    /// Restarts allowed per worker before the job fails. Default 3.
    pub max_restarts: u32,
    /// Time children get to exit after SIGTERM before they are killed (servers write a last
    /// checkpoint in it). Default "60s".
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Start more local processes (servers + workers) than 4 per CPU of this machine. Default
    /// false: such a job is refused (the same as `gradflow launch --allow-oversubscribe`).
    /// Left out of the serialized job when false, so jobs serialize as before.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_oversubscribe: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 256,
            epochs: 1,
            max_steps: None,
            seed: 0,
            log_every_steps: 50,
            early_stop_patience: None,
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: None,
            results: "results.jsonl".into(),
            log: "info".into(),
            metrics: true,
            metrics_listen: None,
        }
    }
}

impl Default for LauncherConfig {
    fn default() -> Self {
        LauncherConfig { max_restarts: 3, grace_period: Duration::from_secs(60), allow_oversubscribe: false }
    }
}

/// The `[kubernetes]` section as written in the job file: a table of settings for the
/// Kubernetes backend (`gradflow_launch::kubernetes::KubernetesConfig` documents, reads and
/// checks them). Kept untyped here so that describing a job needs no Kubernetes types.
/// Only numbers that JSON can carry are accepted (no NaN or infinity), so that the section
/// reaches every process unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct KubernetesSection(serde_json::Map<String, serde_json::Value>);

impl KubernetesSection {
    /// The section's keys and values, as written.
    pub fn as_map(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }

    /// The section as one JSON value, for a typed reader.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::Value::Object(self.0.clone())
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for KubernetesSection {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Self {
        KubernetesSection(map)
    }
}

impl<'de> Deserialize<'de> for KubernetesSection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        // A NaN or infinite number becomes JSON's null, which no setting takes.
        fn null_at(value: &serde_json::Value, at: String) -> Option<String> {
            match value {
                serde_json::Value::Null => Some(at),
                serde_json::Value::Array(items) => {
                    items.iter().enumerate().find_map(|(i, v)| null_at(v, format!("{at}[{i}]")))
                }
                serde_json::Value::Object(map) => {
                    map.iter().find_map(|(k, v)| null_at(v, format!("{at}.{k}")))
                }
                _ => None,
            }
        }
        if let Some(at) = map.iter().find_map(|(k, v)| null_at(v, format!("kubernetes.{k}"))) {
            return Err(serde::de::Error::custom(format!(
                "{at}: expected a string, a finite number, a boolean, a list or a table"
            )));
        }
        Ok(KubernetesSection(map))
    }
}

fn default_label() -> String {
    "label".into()
}
fn default_shuffle() -> usize {
    10_000
}
fn default_task_bytes() -> u64 {
    4 << 20
}
fn yes() -> bool {
    true
}
fn default_standardize_rows() -> usize {
    10_000
}
fn default_train_rows() -> u64 {
    200_000
}
fn default_test_rows() -> u64 {
    50_000
}
fn default_synth_dense() -> usize {
    13
}
fn default_synth_cat() -> usize {
    26
}
fn default_vocab() -> u32 {
    10_000
}

/// A [`JobError::Invalid`] for `key`.
fn invalid(key: &str, message: impl Into<String>) -> JobError {
    JobError::Invalid { key: key.to_string(), message: message.into() }
}

/// Checks `output.log` directive by directive, so that the message names the bad one.
fn check_log_filter(filter: &str) -> Result<(), JobError> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if let Err(e) = directive.parse::<tracing_subscriber::filter::Directive>() {
            return Err(invalid(
                "output.log",
                format!(
                    "`{directive}` is not a log filter directive ({e}); expected a level (\"info\"), a target and a level (\"gradflow_ps=debug\"), or several of them separated by commas"
                ),
            ));
        }
    }
    Ok(())
}

impl JobConfig {
    /// Reads and checks a job file. Relative data and output paths become relative to the
    /// job file's directory.
    pub fn load(path: &Path) -> Result<JobConfig, JobError> {
        let in_file = |error| JobError::File { path: path.to_path_buf(), error: Box::new(error) };
        let text = std::fs::read_to_string(path).map_err(|e| in_file(JobError::Io(e)))?;
        let mut job = JobConfig::parse(&text).map_err(in_file)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        job.resolve_paths(&base);
        job.check_files().map_err(in_file)?;
        Ok(job)
    }

    /// Checks the files the job names that its processes read at start: every `[tls]` file
    /// must exist and hold what its key says (run after [`JobConfig::resolve_paths`], on the
    /// machine that runs the processes). The message names the key and the file.
    pub fn check_files(&self) -> Result<(), JobError> {
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        Ok(())
    }

    /// Parses and checks a job file's text. The error names the key that is wrong.
    pub fn parse(text: &str) -> Result<JobConfig, JobError> {
        let job: JobConfig = toml::from_str(text).map_err(JobError::Toml)?;
        job.validate()?;
        Ok(job)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        // Data may be URLs (`s3://...`), which are not relative to anything.
        self.data.train.iter_mut().filter(|p| !gradflow_data::is_url(p)).for_each(fix);
        self.data.test.iter_mut().filter(|p| !gradflow_data::is_url(p)).for_each(fix);
        if let Some(p) = &mut self.auth.token_file {
            fix(p);
        }
        if let Some(tls) = &mut self.tls {
            tls.resolve_paths(base);
        }
        if let Some(program) = self.worker.command.as_mut().and_then(|c| c.first_mut())
            && program.contains('/')
            && Path::new(program.as_str()).is_relative()
        {
            *program = base.join(&*program).to_string_lossy().into_owned();
        }
        let dir = self.output.dir.get_or_insert_with(|| PathBuf::from("runs").join(&self.name));
        fix(dir);
        if let Some(c) = &mut self.checkpoint {
            if !c.url.contains("://") {
                let mut p = PathBuf::from(&c.url);
                fix(&mut p);
                c.url = p.to_string_lossy().into_owned();
            }
        }
    }

    /// Checks values that parse but make no sense; the message names the key.
    pub fn validate(&self) -> Result<(), JobError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 40
            || !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            || n.starts_with('-')
            || n.ends_with('-')
        {
            return Err(invalid(
                "name",
                format!(
                    "`{n}` is not a valid job name; expected 1-40 lowercase letters, digits or '-', not starting or ending with '-'"
                ),
            ));
        }
        if self.servers == 0 {
            return Err(invalid("servers", "expected at least 1, found 0"));
        }
        if self.workers == 0 {
            return Err(invalid("workers", "expected at least 1, found 0"));
        }
        if self.max_staleness.is_some() && self.mode == Mode::Sync {
            return Err(invalid("max_staleness", "only applies when mode = \"async\""));
        }
        if self.train.batch_size == 0 {
            return Err(invalid("train.batch_size", "expected at least 1, found 0"));
        }
        if self.train.epochs == 0 {
            return Err(invalid("train.epochs", "expected at least 1, found 0"));
        }
        if self.train.max_steps == Some(0) {
            return Err(invalid("train.max_steps", "expected at least 1, found 0"));
        }
        if self.train.log_every_steps == 0 {
            return Err(invalid("train.log_every_steps", "expected at least 1, found 0"));
        }
        if self.data.train.is_empty() {
            return Err(invalid("data.train", "expected at least one file"));
        }
        for (key, paths) in [("data.train", &self.data.train), ("data.test", &self.data.test)] {
            for p in paths {
                gradflow_data::remote::check_url(p).map_err(|e| invalid(key, e.to_string()))?;
            }
        }
        if let Some(s) = &self.data.synth {
            if self.data.train.len() != 1 || self.data.test.len() > 1 {
                return Err(invalid(
                    "data.synth",
                    "expected exactly one data.train file and at most one data.test file to write",
                ));
            }
            if let Some(url) =
                self.data.train.iter().chain(&self.data.test).find(|p| gradflow_data::is_url(p))
            {
                return Err(invalid(
                    "data.synth",
                    format!("synthetic data is written to local files, but `{}` is a URL", url.display()),
                ));
            }
            if self.data_format() != Format::Csv {
                return Err(invalid("data.synth", "synthetic data is CSV; set data.format = \"csv\""));
            }
            if s.train_rows == 0 {
                return Err(invalid("data.synth.train_rows", "expected at least 1, found 0"));
            }
        }
        if self.data.sharding == Sharding::Dynamic && self.data.task_bytes < 1024 {
            return Err(invalid(
                "data.task_bytes",
                format!("expected at least 1024 bytes per task, found {}", self.data.task_bytes),
            ));
        }
        self.server.validate(self.mode, self.workers)?;
        self.embedding.validate()?;
        self.transport.validate().map_err(|e| invalid("transport", e.to_string()))?;
        check_log_filter(&self.output.log)?;
        if let Some(tls) = &self.tls {
            tls.check_keys()?;
        }
        if let Some(listen) = &self.output.metrics_listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "output.metrics_listen",
                    format!(
                        "`{listen}` is not an address; expected \"host:port\" with an IP, e.g. \"0.0.0.0:9100\""
                    ),
                ));
            }
            if !self.output.metrics {
                return Err(invalid(
                    "output.metrics_listen",
                    "set, but output.metrics = false turns the endpoint off",
                ));
            }
        }
        if let Some(checkpoint) = &self.checkpoint {
            checkpoint.validate()?;
        }
        self.check_selection()?;
        if let Some(restore) = &self.restore {
            restore.check(self.checkpoint.as_ref())?;
        }
        if let Some(command) = &self.worker.command
            && command.first().is_none_or(|p| p.trim().is_empty())
        {
            return Err(invalid(
                "worker.command",
                "expected a program and its arguments, found an empty list",
            ));
        }
        match &self.model {
            Some(config) => {
                let model = gradflow_models::build(config).map_err(JobError::Model)?;
                // `[embedding.tables.NAME]` must name a table of the model (a trainer of its
                // own declares its tables to the servers, which check there).
                let tables: Vec<&str> = model.spec().sparse.iter().map(|s| s.name.as_str()).collect();
                self.embedding.policies(&tables)?;
                if self.data_format() == Format::Libsvm && model.num_dense() != self.data.dense_indices {
                    return Err(invalid(
                        "model.num_dense",
                        format!(
                            "libsvm data has data.dense_indices = {} dense features, but the model expects {}",
                            self.data.dense_indices,
                            model.num_dense()
                        ),
                    ));
                }
            }
            None if self.worker.command.is_none() => {
                return Err(invalid(
                    "model",
                    "missing; expected a [model] section (kind = \"wide_deep\" or \"logistic_regression\"), or worker.command naming your own trainer",
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// The test score that selects checkpoints and stops training early:
    /// `[checkpoint] keep_best`, else `test_auc`.
    pub fn selection_metric(&self) -> Metric {
        self.checkpoint.as_ref().and_then(|c| c.keep_best).unwrap_or(Metric::TestAuc)
    }

    /// `[checkpoint] keep_best` and `[train] early_stop_patience`: both go by the scores of the
    /// built-in trainer's evaluations, which a sync job with static sharding makes of a model
    /// held still at every epoch end.
    fn check_selection(&self) -> Result<(), JobError> {
        let keep_best = self.checkpoint.as_ref().and_then(|c| c.keep_best);
        let patience = self.train.early_stop_patience;
        if patience == Some(0) {
            return Err(invalid("train.early_stop_patience", "expected at least 1, found 0"));
        }
        let (key, what) = match (keep_best, patience) {
            (_, Some(_)) => ("train.early_stop_patience", "early stopping"),
            (Some(_), None) => ("checkpoint.keep_best", "keeping the best checkpoint"),
            (None, None) => return Ok(()),
        };
        if self.data.test.is_empty() {
            return Err(invalid(
                key,
                format!(
                    "{what} goes by the test scores of the evaluations at every epoch end, but the job has no test data: set data.test"
                ),
            ));
        }
        if self.worker.command.is_some() {
            return Err(invalid(
                key,
                format!(
                    "{what} goes by the built-in trainer's evaluations; your own worker.command makes none"
                ),
            ));
        }
        if self.mode != Mode::Sync {
            return Err(invalid(
                key,
                format!(
                    "{what} needs mode = \"sync\": only there is the model held still while it is scored, so that the score is the checkpoint's"
                ),
            ));
        }
        if self.data.sharding != Sharding::Static {
            return Err(invalid(
                key,
                format!(
                    "{what} needs data.sharding = \"static\" (the scorer holds the model at epoch ends there)"
                ),
            ));
        }
        Ok(())
    }

    /// The built-in model, for the processes that train or score it; [`JobError::NoModel`]
    /// when the job runs its own trainer.
    pub fn model(&self) -> Result<&ModelConfig, JobError> {
        self.model.as_ref().ok_or(JobError::NoModel)
    }

    /// The synthetic-data generator settings for the training or test file.
    pub fn synth_config(&self, test: bool) -> Option<SynthConfig> {
        let s = self.data.synth.as_ref()?;
        Some(SynthConfig {
            rows: if test { s.test_rows } else { s.train_rows },
            num_dense: s.num_dense,
            num_categorical: s.num_categorical,
            vocab_per_field: s.vocab_per_field,
            seed: s.seed,
            ..SynthConfig::default()
        })
    }

    /// The format the data is read in: `data.format`, or the one the first training file's
    /// extension names.
    pub fn data_format(&self) -> Format {
        self.data.format.resolve(self.data.train.first().map(PathBuf::as_path))
    }

    fn csv_schema(&self) -> CsvSchema {
        match self.synth_config(false) {
            Some(s) => s.schema(),
            None => CsvSchema::new(self.data.label.clone(), self.data.categorical.clone()),
        }
    }

    /// How a worker reads the training data.
    pub fn train_reader(&self) -> ReaderConfig {
        let mut r = ReaderConfig::new(self.data_format(), self.data.train.clone());
        r.csv = self.csv_schema();
        r.libsvm = LibsvmOptions { dense_indices: self.data.dense_indices };
        r.skip_malformed = self.data.skip_malformed;
        r.shuffle_buffer = self.data.shuffle_buffer;
        r.seed = self.train.seed;
        r.epochs = Epochs::Count(self.train.epochs);
        r
    }

    /// How the test data is read (whole, in order), if there is any.
    pub fn test_reader(&self) -> Option<ReaderConfig> {
        if self.data.test.is_empty() {
            return None;
        }
        let format = match self.data.format {
            Format::Auto => {
                self.data.test.first().and_then(|p| Format::of_path(p)).unwrap_or_else(|| self.data_format())
            }
            given => given,
        };
        let mut r = ReaderConfig::new(format, self.data.test.clone());
        r.csv = self.csv_schema();
        r.libsvm = LibsvmOptions { dense_indices: self.data.dense_indices };
        r.skip_malformed = self.data.skip_malformed;
        Some(r)
    }

    /// What the job's clients (workers, `gradflow checkpoint now`, `gradflow eval`) need to
    /// reach its servers over TLS; `None` when the job has no `[tls]` section.
    pub fn client_tls(&self) -> Option<ClientTls> {
        self.tls.as_ref().map(TlsConfig::client)
    }

    /// Where shard `shard`'s `/metrics` endpoint listens under the local launcher (see
    /// `output.metrics_listen`); `None` when metrics are off.
    pub fn metrics_listen(&self, shard: u32) -> Option<String> {
        if !self.output.metrics {
            return None;
        }
        let Some(listen) = &self.output.metrics_listen else { return Some("127.0.0.1:0".into()) };
        match listen.parse::<std::net::SocketAddr>() {
            Ok(mut addr) if addr.port() != 0 => {
                addr.set_port(addr.port().saturating_add(shard.min(u16::MAX as u32) as u16));
                Some(addr.to_string())
            }
            _ => Some(listen.clone()),
        }
    }

    /// The output directory (resolved by `load`, else `runs/<name>`).
    pub fn output_dir(&self) -> PathBuf {
        self.output.dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// Run `run_id`'s TensorBoard folder, `<output dir>/tensorboard/<run id>`: one subfolder
    /// (one TensorBoard run) per process, e.g. `worker-0`.
    pub fn tensorboard_dir(&self, run_id: &str) -> PathBuf {
        self.output_dir().join("tensorboard").join(run_id)
    }

    /// Run `run_id`'s log folder, `<output dir>/logs/<run id>`: the launcher's `launch.log`
    /// and one file per process and attempt (`worker-0-0.log`, as its pod would be named).
    pub fn logs_dir(&self, run_id: &str) -> PathBuf {
        self.output_dir().join("logs").join(run_id)
    }

    /// The local launcher's record of the job's latest run: `<output dir>/state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.output_dir().join("state.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "demo"
[model]
kind = "logistic_regression"
[data]
train = "train.libsvm"
format = "libsvm"
"#;

    #[test]
    fn minimal_job_gets_defaults() {
        let job = JobConfig::parse(MIN).unwrap();
        assert_eq!((job.servers, job.workers, job.mode), (1, 1, Mode::Sync));
        assert_eq!(job.train.batch_size, 256);
        assert_eq!(job.launcher.max_restarts, 3);
        assert_eq!(job.server.heartbeat_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = JobConfig::parse(&format!("{MIN}\n[train]\nbatchsize = 3\n")).unwrap_err().to_string();
        assert!(err.contains("batchsize"), "{err}");
        let err = JobConfig::parse(&MIN.replace("name = \"demo\"", "name = \"demo\"\nworkerz = 2"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("workerz"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (patch, key) in [
            ("name = \"Demo Job\"", "name"),
            ("name = \"demo\"\nworkers = 0", "workers"),
            ("name = \"demo\"\nservers = 0", "servers"),
            ("name = \"demo\"\nmax_staleness = 3", "max_staleness"),
            ("name = \"demo\"\nmode = \"asynch\"", "mode"),
        ] {
            let err = JobConfig::parse(&MIN.replace("name = \"demo\"", patch)).unwrap_err().to_string();
            assert!(err.contains(key), "{patch}: {err}");
        }
        let err = JobConfig::parse(&format!("{MIN}\n[train]\nbatch_size = 0\n")).unwrap_err().to_string();
        assert!(err.contains("train.batch_size"), "{err}");
        let err = JobConfig::parse(&format!("{MIN}\n[server]\nheartbeat_timeout = \"soon\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat_timeout"), "{err}");
    }

    #[test]
    fn model_selection_is_checked_naming_the_key() {
        let with_test = MIN.replace("format = \"libsvm\"", "format = \"libsvm\"\ntest = \"test.libsvm\"");
        let job = JobConfig::parse(&format!(
            "{with_test}\n[train]\nearly_stop_patience = 2\n[checkpoint]\nkeep_best = \"test_loss\"\n"
        ))
        .unwrap();
        assert_eq!(job.train.early_stop_patience, Some(2));
        assert_eq!(job.checkpoint.as_ref().unwrap().keep_best, Some(Metric::TestLoss));
        assert_eq!(job.selection_metric(), Metric::TestLoss);
        // Early stopping alone goes by the test AUC; neither is on by default.
        let job = JobConfig::parse(&format!("{with_test}\n[train]\nearly_stop_patience = 1\n")).unwrap();
        assert_eq!(job.selection_metric(), Metric::TestAuc);
        let job = JobConfig::parse(&with_test).unwrap();
        assert_eq!((job.train.early_stop_patience, job.checkpoint), (None, None));

        for (text, key, says) in [
            (
                format!("{with_test}\n[train]\nearly_stop_patience = 0\n"),
                "train.early_stop_patience",
                "at least 1",
            ),
            (
                format!("{MIN}\n[train]\nearly_stop_patience = 3\n"),
                "train.early_stop_patience",
                "set data.test",
            ),
            (
                format!("{MIN}\n[checkpoint]\nkeep_best = \"test_auc\"\n"),
                "checkpoint.keep_best",
                "set data.test",
            ),
            (
                format!(
                    "{}\n[train]\nearly_stop_patience = 3\n",
                    with_test.replace("name = \"demo\"", "name = \"demo\"\nmode = \"async\"")
                ),
                "train.early_stop_patience",
                "mode = \"sync\"",
            ),
            (
                format!("{with_test}\nsharding = \"dynamic\"\n[checkpoint]\nkeep_best = \"test_accuracy\"\n"),
                "checkpoint.keep_best",
                "data.sharding = \"static\"",
            ),
        ] {
            let err = JobConfig::parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(key) && err.contains(says), "{text}: {err}");
        }
        // An unknown score is named, with the ones there are.
        let err = JobConfig::parse(&format!("{with_test}\n[checkpoint]\nkeep_best = \"auc\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep_best") && err.contains("auc") && err.contains("test_auc"), "{err}");
    }

    #[test]
    fn a_bad_log_filter_is_named() {
        for good in ["info", "warn,gradflow_ps=debug", "gradflow_worker=trace"] {
            JobConfig::parse(&format!("{MIN}\n[output]\nlog = \"{good}\"\n")).unwrap();
        }
        for (bad, directive) in
            [("gradflow_ps=lots", "gradflow_ps=lots"), ("info, h2=verbose", "h2=verbose"), ("a=b=c", "a=b=c")]
        {
            let err =
                JobConfig::parse(&format!("{MIN}\n[output]\nlog = \"{bad}\"\n")).unwrap_err().to_string();
            assert!(err.starts_with("output.log") && err.contains(&format!("`{directive}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn model_errors_are_reported_under_model() {
        let text = MIN
            .replace("kind = \"logistic_regression\"", "kind = \"wide_deep\"\nnum_fields = 0\nnum_dense = 0");
        let err = JobConfig::parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("model:"), "{err}");
    }

    #[test]
    fn embedding_options_that_cannot_apply_are_refused_naming_the_key() {
        let err = JobConfig::parse(&format!("{MIN}\n[embedding.tables.nope]\nmax_rows = 100\n")).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("embedding.tables.nope") && err.contains("its tables are"), "{err}");
        let err = JobConfig::parse(&format!("{MIN}\n[embedding]\nmax_rows = 0\n")).unwrap_err().to_string();
        assert!(err.contains("embedding.max_rows is 0"), "{err}");
        let job =
            JobConfig::parse(&format!("{MIN}\n[embedding]\nmax_rows = 64\nstorage = \"bf16\"\n")).unwrap();
        assert_eq!(job.embedding.max_rows, Some(64));
    }

    #[test]
    fn a_custom_worker_command_replaces_the_model() {
        let no_model = MIN.replace("[model]\nkind = \"logistic_regression\"\n", "");
        let err = JobConfig::parse(&no_model).unwrap_err().to_string();
        assert!(err.starts_with("model: missing") && err.contains("worker.command"), "{err}");

        let custom = format!("{no_model}\n[worker]\ncommand = [\"bin/train\", \"--fast\"]\n");
        let mut job = JobConfig::parse(&custom).unwrap();
        assert!(job.model().is_err());
        job.resolve_paths(Path::new("/jobs"));
        assert_eq!(job.worker.command.unwrap(), ["/jobs/bin/train", "--fast"]);

        // A bare program name is looked up on PATH, not next to the job file.
        let mut job = JobConfig::parse(&custom.replace("bin/train", "python3")).unwrap();
        job.resolve_paths(Path::new("/jobs"));
        assert_eq!(job.worker.command.unwrap()[0], "python3");

        let err = JobConfig::parse(&format!("{no_model}\n[worker]\ncommand = []\n")).unwrap_err().to_string();
        assert!(err.starts_with("worker.command"), "{err}");
    }

    #[test]
    fn the_token_comes_from_the_file_or_is_fresh_or_is_off() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cr3t-t0ken-0123456789\n").unwrap();
        let mut job = JobConfig::parse(&format!("{MIN}\n[auth]\ntoken_file = \"token\"\n")).unwrap();
        job.resolve_paths(dir.path());
        assert_eq!(job.auth.token().unwrap().unwrap().expose(), "s3cr3t-t0ken-0123456789");
        std::fs::write(dir.path().join("token"), "short").unwrap();
        let err = job.auth.token().unwrap_err().to_string();
        assert!(err.contains("token file") && err.contains("16 to 1024"), "{err}");

        let job = JobConfig::parse(&format!("{MIN}\n[auth]\nenabled = false\n")).unwrap();
        assert!(job.auth.token().unwrap().is_none());
        if std::env::var_os(crate::contract::ENV_TOKEN).is_none() {
            let job = JobConfig::parse(MIN).unwrap();
            let (a, b) = (job.auth.token().unwrap().unwrap(), job.auth.token().unwrap().unwrap());
            assert_ne!(a, b, "a fresh token per job");
        }
    }

    const TLS: &str =
        "\n[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nca = \"certs/ca.pem\"\n";

    #[test]
    fn without_tls_the_serialized_job_is_as_before() {
        let job = JobConfig::parse(MIN).unwrap();
        assert_eq!(job.tls, None);
        assert!(job.client_tls().is_none());
        let json = serde_json::to_string(&job).unwrap();
        assert!(!json.contains("tls") && !json.contains("metrics_listen"), "{json}");
    }

    #[test]
    fn tls_keys_are_checked_and_named() {
        let mut job = JobConfig::parse(&format!("{MIN}{TLS}")).unwrap();
        job.resolve_paths(Path::new("/jobs"));
        let tls = job.tls.as_ref().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/jobs/certs/server.pem"));
        assert_eq!(tls.ca, PathBuf::from("/jobs/certs/ca.pem"));
        assert_eq!(job.client_tls().unwrap().ca, PathBuf::from("/jobs/certs/ca.pem"));
        // The TLS settings reach every process with the job.
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(serde_json::from_str::<JobConfig>(&json).unwrap(), job);

        for (extra, key) in [
            ("certificate = \"x.pem\"\n", "certificate"),
            ("client_cert = \"c.pem\"\n", "tls.client_key"),
            ("client_key = \"c.key\"\n", "tls.client_cert"),
            ("client_ca = \"ca.pem\"\n", "tls.client_cert"),
            ("domain = \"not a name\"\n", "tls.domain"),
        ] {
            let err = JobConfig::parse(&format!("{MIN}{TLS}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = JobConfig::parse(&format!("{MIN}\n[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `ca`"), "{err}");
    }

    #[test]
    fn tls_files_are_read_when_the_job_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, format!("{MIN}{TLS}")).unwrap();
        let err = JobConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("tls.cert") && err.contains("certs/server.pem") && err.contains("cannot read"),
            "{err}"
        );

        std::fs::create_dir(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/server.pem"), "not a certificate\n").unwrap();
        let err = JobConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("tls.cert") && err.contains("BEGIN CERTIFICATE"), "{err}");
    }

    #[test]
    fn the_metrics_endpoint_can_listen_elsewhere() {
        let job = JobConfig::parse(MIN).unwrap();
        assert_eq!(job.metrics_listen(1).as_deref(), Some("127.0.0.1:0"));
        let job = JobConfig::parse(&format!("{MIN}\n[output]\nmetrics_listen = \"0.0.0.0:9100\"\n")).unwrap();
        assert_eq!(job.metrics_listen(0).as_deref(), Some("0.0.0.0:9100"));
        assert_eq!(job.metrics_listen(2).as_deref(), Some("0.0.0.0:9102"));
        let job = JobConfig::parse(&format!("{MIN}\n[output]\nmetrics_listen = \"0.0.0.0:0\"\n")).unwrap();
        assert_eq!(job.metrics_listen(3).as_deref(), Some("0.0.0.0:0"));
        assert!(serde_json::to_string(&job).unwrap().contains("\"metrics_listen\":\"0.0.0.0:0\""));
        let err = JobConfig::parse(&format!("{MIN}\n[output]\nmetrics_listen = \"anywhere\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("output.metrics_listen"), "{err}");
        let err =
            JobConfig::parse(&format!("{MIN}\n[output]\nmetrics = false\nmetrics_listen = \"0.0.0.0:0\"\n"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("output.metrics_listen"), "{err}");
        let job = JobConfig::parse(&format!("{MIN}\n[output]\nmetrics = false\n")).unwrap();
        assert_eq!(job.metrics_listen(0), None);
    }

    #[test]
    fn restore_is_read_once_and_written_back_as_it_was() {
        let ck = "\n[checkpoint]\nurl = \"ck\"\n";
        for (text, want) in [
            ("latest", Restore::Latest),
            ("40", Restore::Step(40)),
            ("ckpt-000000000040", Restore::Dir("ckpt-000000000040".into())),
            ("s3://b/run/ckpt-000000000040", Restore::Url("s3://b/run/ckpt-000000000040".into())),
        ] {
            let job = JobConfig::parse(&format!("restore = \"{text}\"{MIN}{ck}")).unwrap();
            assert_eq!(job.restore.as_ref(), Some(&want), "{text}");
            let toml = toml::to_string(&job).unwrap();
            assert!(toml.contains(&format!("restore = \"{text}\"")), "{toml}");
            assert_eq!(JobConfig::parse(&toml).unwrap(), job);
            assert_eq!(
                serde_json::from_str::<JobConfig>(&serde_json::to_string(&job).unwrap()).unwrap(),
                job
            );
        }
        // A URL names its own store; the others are found under checkpoint.url.
        JobConfig::parse(&format!("restore = \"s3://b/run/ckpt-000000000040\"{MIN}")).unwrap();
        let err = JobConfig::parse(&format!("restore = \"latest\"{MIN}")).unwrap_err().to_string();
        assert!(err.contains("restore = \"latest\" needs checkpoint.url"), "{err}");
        for bad in ["\"\"", "\"-40\"", "40"] {
            let err = JobConfig::parse(&format!("restore = {bad}{MIN}{ck}")).unwrap_err().to_string();
            assert!(err.contains("\"latest\", a step number"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_kubernetes_section_is_kept_as_written() {
        let text = format!(
            "{MIN}\n[kubernetes]\nimage = \"x:1\"\ncpu = 1.5\nwhen = 1979-05-27T07:32:00Z\n\
             [kubernetes.worker]\ngpu = 1\ntolerations = [{{ key = \"k\", operator = \"Exists\" }}]\n"
        );
        let job = JobConfig::parse(&text).unwrap();
        let section = job.kubernetes.as_ref().unwrap();
        assert_eq!(section.as_map()["image"], "x:1");
        assert_eq!(section.to_value()["worker"]["tolerations"][0]["operator"], "Exists");
        let toml = toml::to_string(&job).unwrap();
        assert_eq!(JobConfig::parse(&toml).unwrap(), job, "{toml}");
        assert_eq!(serde_json::from_str::<JobConfig>(&serde_json::to_string(&job).unwrap()).unwrap(), job);

        for (value, key) in [("nan", "kubernetes.cpu"), ("[1.0, inf]", "kubernetes.cpu[1]")] {
            let err =
                JobConfig::parse(&format!("{MIN}\n[kubernetes]\ncpu = {value}\n")).unwrap_err().to_string();
            assert!(err.contains(&format!("{key}: expected a string, a finite number")), "{err}");
        }
    }

    #[test]
    fn relative_paths_follow_the_job_file() {
        let mut job = JobConfig::parse(MIN).unwrap();
        job.resolve_paths(Path::new("/jobs"));
        assert_eq!(job.data.train, vec![PathBuf::from("/jobs/train.libsvm")]);
        assert_eq!(job.output_dir(), PathBuf::from("/jobs/runs/demo"));
    }
}
