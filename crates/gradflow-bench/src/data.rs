//! (9) The data readers: how fast each format gradflow reads turns files into training
//! batches, on one thread, next to pyarrow reading the same Parquet file and next to what a
//! worker spends per example on training.
//!
//! The same synthetic click-through rows (`gradflow data synth`: a label, 13 dense and 26
//! categorical columns) are written as CSV, CSV compressed with gzip and with zstd, libsvm in
//! its field-aware form (`label field:id:value`, the dense features as the first 13 fields),
//! Parquet (`gradflow data convert`: zstd pages, categorical columns as strings) and TFRecord
//! of `tf.Example`. Each file is read whole by a one-worker [`Reader`] into batches of
//! `batch_size` (parsing, hashing of categorical values, the batch layout: what a worker's
//! training loop waits for), after one warm-up pass; the figure is rows per second of wall
//! time (median) and rows per second of this process's CPU time (all its threads, from
//! `/proc/self/stat`, so the Parquet and remote readers' background threads count).
//!
//! The same files are then read from a real S3-protocol server, `s3s-fs` started on
//! loopback on a folder holding them (when `s3s-fs` is on `PATH`; the CPU figure is this
//! process's only). And `python3` with pyarrow, when it has it, reads the Parquet file into
//! Arrow record batches of `batch_size` rows on one thread (`ParquetFile.iter_batches`,
//! decoding only: no hashing, no batch layout) and into one table on all threads
//! (`read_table`).

use std::io::{BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gradflow_data::tfrecord::{BytesList, Feature, Features, FloatList, Kind, TfExample, write_record};
use gradflow_data::{
    Batch, Format, LibsvmOptions, Reader, ReaderConfig, ShardSpec, Stores, SynthConfig, write_synth,
};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::stats::{Timing, sig4};
use crate::{BenchError, DataBenchConfig, Log};

/// Credentials the benchmark's `s3s-fs` is started with (it serves a temporary folder on
/// loopback only).
const S3_KEY: &str = "gradflow-bench-key";
const S3_SECRET: &str = "gradflow-bench-secret";
const S3_BUCKET: &str = "bench";

/// What this scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// Rows in every file.
    pub rows: u64,
    pub batch_size: usize,
    /// One row per file and place it was read from.
    pub readers: Vec<ReaderRow>,
    /// pyarrow on the same Parquet file, when `python3` has it.
    pub pyarrow: Option<PyarrowRow>,
    /// Why a part was not measured (no `s3s-fs`, no pyarrow).
    pub skipped: Vec<String>,
}

/// One reader on one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReaderRow {
    /// `csv`, `csv.gz`, `csv.zst`, `libsvm`, `parquet`, `tfrecord`.
    pub format: String,
    /// `local` or `s3` (s3s-fs on loopback).
    pub source: String,
    pub file_bytes: u64,
    /// Rows per second of wall time (median).
    pub rows_per_sec: f64,
    /// Rows per second of this process's CPU time, summed over the repetitions; `None` where
    /// `/proc/self/stat` cannot be read.
    pub rows_per_cpu_sec: Option<f64>,
    pub timing: Timing,
}

/// pyarrow reading the benchmark's Parquet file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PyarrowRow {
    pub version: String,
    /// `iter_batches(batch_size)` on one thread: rows per second of wall time (median of the
    /// repetitions after a warm-up).
    pub batches_rows_per_sec: f64,
    /// The same, rows per second of CPU time.
    pub batches_rows_per_cpu_sec: f64,
    /// `read_table` on all threads: rows per second of wall time.
    pub table_rows_per_sec: f64,
    /// gradflow's local Parquet reader / pyarrow's `iter_batches`, wall time.
    pub gradflow_vs_batches: f64,
    /// The same per CPU second (per core): the fairer ratio on a busy machine.
    pub gradflow_vs_batches_cpu: Option<f64>,
}

/// Writes the files, reads each `config.reps` times locally and from `s3s-fs`, then runs pyarrow.
pub fn run(config: &DataBenchConfig, log: Log<'_>) -> Result<DataReport, BenchError> {
    let dir = tempfile::tempdir().map_err(BenchError::io("creating a temporary folder"))?;
    let files = write_files(config, dir.path())?;
    log(&format!("data: wrote {} rows in {} formats", config.rows, files.len()));

    let mut readers = Vec::new();
    for file in &files {
        let reader =
            ReaderConfig { libsvm: file.libsvm, ..ReaderConfig::new(file.format, vec![file.path.clone()]) };
        let row = measure(config, &reader, file, "local")?;
        log(&format!("data: {} local {:.0} rows/s", row.format, row.rows_per_sec));
        readers.push(row);
    }

    let mut skipped = Vec::new();
    if config.s3 {
        match S3Server::start(dir.path())? {
            None => {
                skipped.push("s3: `s3s-fs` is not on PATH (cargo install s3s-fs --features binary)".into())
            }
            Some(server) => {
                for file in &files {
                    let url = format!(
                        "s3://{S3_BUCKET}/{}",
                        file.path.file_name().unwrap_or_default().to_string_lossy()
                    );
                    let mut reader = ReaderConfig {
                        libsvm: file.libsvm,
                        ..ReaderConfig::new(file.format, vec![PathBuf::from(url)])
                    };
                    reader.storage_options = server.options();
                    let row = measure(config, &reader, file, "s3")?;
                    log(&format!("data: {} s3 {:.0} rows/s", row.format, row.rows_per_sec));
                    readers.push(row);
                }
            }
        }
    }

    let pyarrow = if config.python.is_empty() {
        None
    } else {
        let parquet = files.iter().find(|f| f.format == Format::Parquet).map(|f| f.path.as_path());
        let ours = readers.iter().find(|r| r.format == "parquet" && r.source == "local");
        match (parquet, ours) {
            (Some(path), Some(ours)) => match pyarrow(config, path, ours)? {
                Ok(row) => {
                    log(&format!("data: pyarrow iter_batches {:.0} rows/s", row.batches_rows_per_sec));
                    Some(row)
                }
                Err(why) => {
                    skipped.push(format!("pyarrow: {why}"));
                    None
                }
            },
            _ => None,
        }
    };
    Ok(DataReport { rows: config.rows, batch_size: config.batch_size, readers, pyarrow, skipped })
}

/// One written file.
struct DataFile {
    /// `csv`, `csv.gz`, ...
    name: &'static str,
    path: PathBuf,
    format: Format,
    libsvm: LibsvmOptions,
}

fn write_files(config: &DataBenchConfig, dir: &Path) -> Result<Vec<DataFile>, BenchError> {
    let synth = SynthConfig { rows: config.rows, seed: 9, ..SynthConfig::default() };
    let csv = dir.join("rows.csv");
    write_synth(&synth, &csv)?;
    let schema = synth.schema();
    let text = std::fs::read(&csv).map_err(BenchError::io(format!("reading {}", csv.display())))?;

    let gz = dir.join("rows.csv.gz");
    let mut enc = flate2::write::GzEncoder::new(create(&gz)?, flate2::Compression::default());
    enc.write_all(&text)
        .and_then(|_| enc.finish()?.flush())
        .map_err(BenchError::io(format!("writing {}", gz.display())))?;
    let zst = dir.join("rows.csv.zst");
    let bytes = zstd::encode_all(text.as_slice(), 3).map_err(BenchError::io("compressing with zstd"))?;
    std::fs::write(&zst, bytes).map_err(BenchError::io(format!("writing {}", zst.display())))?;

    let parquet = dir.join("rows.parquet");
    gradflow_data::convert::csv_to_parquet(
        &csv,
        &schema,
        &parquet,
        config.row_group_rows,
        &Stores::default(),
    )?;

    let (libsvm, tfrecord) = (dir.join("rows.libffm"), dir.join("rows.tfrecord"));
    write_libffm_and_tfrecord(&text, synth.num_dense, &libsvm, &tfrecord)?;

    let plain = LibsvmOptions::default();
    Ok(vec![
        DataFile { name: "csv", path: csv, format: Format::Csv, libsvm: plain },
        DataFile { name: "csv.gz", path: gz, format: Format::Csv, libsvm: plain },
        DataFile { name: "csv.zst", path: zst, format: Format::Csv, libsvm: plain },
        DataFile {
            name: "libsvm",
            path: libsvm,
            format: Format::Libsvm,
            libsvm: LibsvmOptions { dense_indices: synth.num_dense, ..plain },
        },
        DataFile { name: "parquet", path: parquet, format: Format::Parquet, libsvm: plain },
        DataFile { name: "tfrecord", path: tfrecord, format: Format::Tfrecord, libsvm: plain },
    ])
}

fn create(path: &Path) -> Result<BufWriter<std::fs::File>, BenchError> {
    Ok(BufWriter::new(
        std::fs::File::create(path).map_err(BenchError::io(format!("creating {}", path.display())))?,
    ))
}

/// The CSV rows (header first: label, dense, categorical) as libffm lines and as TFRecord
/// `tf.Example`s with the CSV's column names (dense as floats, categorical as bytes).
fn write_libffm_and_tfrecord(
    text: &[u8],
    num_dense: usize,
    libffm: &Path,
    tfrecord: &Path,
) -> Result<(), BenchError> {
    let text = std::str::from_utf8(text)
        .map_err(|e| BenchError::Internal(format!("synthetic CSV is not UTF-8: {e}")))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let (mut ffm, mut tfr) = (create(libffm)?, create(tfrecord)?);
    let mut line = String::new();
    for row in lines {
        let values: Vec<&str> = row.split(',').collect();
        line.clear();
        line.push_str(values[0]);
        let mut features = std::collections::HashMap::new();
        for (i, (name, value)) in header.iter().zip(&values).enumerate() {
            let kind = if i == 0 || i <= num_dense {
                let v: f32 =
                    value.parse().map_err(|_| BenchError::Internal(format!("not a number: {value}")))?;
                if i > 0 {
                    line.push_str(&format!(" {}:0:{value}", i - 1));
                }
                Kind::FloatList(FloatList { value: vec![v] })
            } else {
                line.push_str(&format!(" {}:{value}:1", i - 1));
                Kind::BytesList(BytesList { value: vec![value.as_bytes().to_vec()] })
            };
            features.insert(name.to_string(), Feature { kind: Some(kind) });
        }
        line.push('\n');
        let example = TfExample { features: Some(Features { feature: features }) };
        ffm.write_all(line.as_bytes())
            .and_then(|_| write_record(&mut tfr, &example.encode_to_vec()))
            .map_err(BenchError::io("writing the libsvm and TFRecord files"))?;
    }
    ffm.flush().and_then(|_| tfr.flush()).map_err(BenchError::io("writing the libsvm and TFRecord files"))
}

/// Reads `config` whole once (warm-up) and `reps` times, timed.
fn measure(
    config: &DataBenchConfig,
    reader: &ReaderConfig,
    file: &DataFile,
    source: &str,
) -> Result<ReaderRow, BenchError> {
    let mut reader = reader.clone();
    reader.csv = SynthConfig::default().schema();
    let read_all = || -> Result<u64, BenchError> {
        let mut r = Reader::open(&reader, ShardSpec::new(0, 1)?)?;
        let mut batch = Batch::new(r.num_dense());
        let mut rows = 0u64;
        loop {
            let n = r.next_batch(&mut batch, config.batch_size)?;
            if n == 0 {
                break;
            }
            rows += n as u64;
        }
        Ok(rows)
    };
    let rows = read_all()?;
    if rows != config.rows {
        return Err(BenchError::Internal(format!(
            "data: the {} reader gave {rows} rows from {}, expected {}",
            file.name,
            file.path.display(),
            config.rows
        )));
    }
    let cpu_before = process_cpu_seconds();
    let mut secs = Vec::with_capacity(config.reps);
    for _ in 0..config.reps {
        let t = Instant::now();
        read_all()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let cpu = cpu_before.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    let timing = Timing::of(&secs);
    let file_bytes = std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
    Ok(ReaderRow {
        format: file.name.to_string(),
        source: source.to_string(),
        file_bytes,
        rows_per_sec: sig4(timing.rate(rows as f64)),
        rows_per_cpu_sec: cpu.filter(|&c| c > 0.0).map(|c| sig4(rows as f64 * config.reps as f64 / c)),
        timing,
    })
}

/// This process's user + system CPU time, all threads, from `/proc/self/stat` (clock ticks of
/// 1/100 s, the unit Linux reports there).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the whole line; `rest` starts at field 3.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// The script pyarrow runs: one JSON line with its version and timings.
const PYARROW_SCRIPT: &str = r#"
import json, sys, time
import pyarrow, pyarrow.parquet as pq
path, batch, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def batches():
    n = 0
    for b in pq.ParquetFile(path).iter_batches(batch_size=batch, use_threads=False):
        n += b.num_rows
    return n
def table():
    return pq.read_table(path, use_threads=True).num_rows
rows = batches(); table()
walls, cpu0 = [], time.process_time()
for _ in range(reps):
    t = time.perf_counter(); batches(); walls.append(time.perf_counter() - t)
cpu = time.process_time() - cpu0
tables = []
for _ in range(reps):
    t = time.perf_counter(); table(); tables.append(time.perf_counter() - t)
walls.sort(); tables.sort()
print(json.dumps({"version": pyarrow.__version__, "rows": rows, "batches_s": walls[len(walls) // 2],
                  "batches_cpu_s": cpu / reps, "table_s": tables[len(tables) // 2]}))
"#;

/// pyarrow on `path`; the inner `Err` says why it could not run (no python, no pyarrow).
fn pyarrow(
    config: &DataBenchConfig,
    path: &Path,
    ours: &ReaderRow,
) -> Result<Result<PyarrowRow, String>, BenchError> {
    let out = match Command::new(&config.python)
        .args(["-c", PYARROW_SCRIPT])
        .arg(path)
        .args([config.batch_size.to_string(), config.reps.to_string()])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => return Ok(Err(format!("could not run `{}`: {e}", config.python))),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("").trim().to_string();
        return Ok(Err(format!("`{}` failed ({last}); `pip install pyarrow` to compare", config.python)));
    }
    #[derive(Deserialize)]
    struct Out {
        version: String,
        rows: u64,
        batches_s: f64,
        batches_cpu_s: f64,
        table_s: f64,
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let o: Out = serde_json::from_str(stdout.trim())
        .map_err(|e| BenchError::Internal(format!("pyarrow's script printed {stdout:?}: {e}")))?;
    if o.rows != config.rows {
        return Err(BenchError::Internal(format!("pyarrow read {} rows, expected {}", o.rows, config.rows)));
    }
    let rows = o.rows as f64;
    let batches = rows / o.batches_s.max(1e-12);
    let batches_cpu = rows / o.batches_cpu_s.max(1e-12);
    Ok(Ok(PyarrowRow {
        version: o.version,
        batches_rows_per_sec: sig4(batches),
        batches_rows_per_cpu_sec: sig4(batches_cpu),
        table_rows_per_sec: sig4(rows / o.table_s.max(1e-12)),
        gradflow_vs_batches: sig4(ours.rows_per_sec / batches),
        gradflow_vs_batches_cpu: ours.rows_per_cpu_sec.map(|c| sig4(c / batches_cpu)),
    }))
}

/// `s3s-fs` serving `dir` (whose files are put in its bucket folder) on a loopback port.
struct S3Server {
    child: Child,
    port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// `None` when `s3s-fs` is not on `PATH`. The files of `dir` are hard-linked (or copied)
    /// into `dir/s3/bench/`, the folder the server serves as bucket `bench`.
    fn start(dir: &Path) -> Result<Option<S3Server>, BenchError> {
        let on_path = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("s3s-fs").is_file()));
        if !on_path {
            return Ok(None);
        }
        let root = dir.join("s3");
        let bucket = root.join(S3_BUCKET);
        std::fs::create_dir_all(&bucket).map_err(BenchError::io(format!("creating {}", bucket.display())))?;
        for entry in std::fs::read_dir(dir).map_err(BenchError::io(format!("listing {}", dir.display())))? {
            let path = entry.map_err(BenchError::io("listing the data folder"))?.path();
            if path.is_file() {
                let to = bucket.join(path.file_name().unwrap_or_default());
                if std::fs::hard_link(&path, &to).is_err() {
                    std::fs::copy(&path, &to)
                        .map_err(BenchError::io(format!("copying {}", path.display())))?;
                }
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::io("choosing a port for s3s-fs"))?
            .port();
        let mut child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(BenchError::io("starting s3s-fs"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::Internal(format!("s3s-fs exited with {status} before listening")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Internal(format!(
                    "s3s-fs did not listen on port {port} within 30 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(S3Server { child, port }))
    }

    fn options(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("aws_access_key_id", S3_KEY.to_string()),
            ("aws_secret_access_key", S3_SECRET.to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
