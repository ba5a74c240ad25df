//! Training data on a real S3-protocol server: `s3s-fs`, started on loopback by the test,
//! serving a folder the test writes. Data read from S3 must give the same batches as the same
//! files read locally, for every worker of a sharded job.
//!
//! The server is configured through `storage_options` (object_store's keys), not the `AWS_*`
//! variables, so that no test changes the process environment; the CLI tests
//! (`crates/gradflow-cli/tests/data_*.rs`) cover the variables.
//!
//! Skipped, with a notice, when `s3s-fs` is not on `PATH`; install it with
//! `cargo install s3s-fs@0.14.1 --features binary --locked`.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Row, drain};
use gradflow_data::{
    CsvSchema, DataError, FilePiece, Format, Reader, ReaderConfig, RemoteOptions, ShardSpec,
};

struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

/// An `s3s-fs` serving a fresh folder with one bucket, `bucket`; `None` (with a notice) when
/// `s3s-fs` is not installed.
fn server() -> Option<Server> {
    if !on_path("s3s-fs") {
        eprintln!(
            "NOTICE: skipping the S3 test: `s3s-fs` is not on PATH \
             (cargo install s3s-fs@0.14.1 --features binary --locked)"
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bucket")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "gradflow-key", "--secret-key", "gradflow-secret"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting s3s-fs");
    let server = Server { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(server)
}

impl Server {
    /// Writes `bytes` as object `key` of `bucket` (through the folder the server serves).
    fn put(&self, key: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join("bucket").join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A reader config for `paths`, configured for this server.
    fn config(&self, format: Format, paths: &[&str]) -> ReaderConfig {
        let mut c = ReaderConfig::new(format, paths.iter().map(PathBuf::from).collect());
        for (k, v) in [
            ("aws_access_key_id", "gradflow-key".to_string()),
            ("aws_secret_access_key", "gradflow-secret".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".to_string()),
        ] {
            c.storage_options.insert(k.into(), v);
        }
        // Small ranged reads, so that pieces span many of them and lines cross their edges.
        c.remote = RemoteOptions { chunk_bytes: 1000, read_ahead: 3 };
        c
    }

    fn local(&self, key: &str) -> String {
        self.dir.path().join("bucket").join(key).to_string_lossy().into_owned()
    }
}

fn csv_text(day: usize, rows: usize) -> String {
    let mut text = String::from("label,d0,c0,d1\n");
    for i in 0..rows {
        text.push_str(&format!("{},{}.25,day{day}-v{},{}\n", i % 2, i, i % 13, (i * 7) % 100));
    }
    text
}

/// Every batch worker `worker` of `workers` reads, as rows per batch.
fn batches(config: &ReaderConfig, worker: usize, workers: usize) -> Result<Vec<Vec<Row>>, DataError> {
    let mut reader = Reader::open(config, ShardSpec::new(worker, workers)?)?;
    let mut batch = gradflow_data::Batch::new(0);
    let mut out = Vec::new();
    while reader.next_batch(&mut batch, 64)? > 0 {
        out.push(common::rows_of(&batch));
    }
    Ok(out)
}

#[test]
fn data_on_s3() {
    let Some(s3) = server() else { return };
    for day in 1..=3 {
        s3.put(&format!("train/day={day}/part-0.csv"), csv_text(day, 400 + 50 * day));
    }
    s3.put("train/day=2/_SUCCESS", "");
    s3.put("train/notes.txt", "not data");
    let schema = CsvSchema::new("label", vec!["c0".into()]);

    // A glob over days, sharded 1, 2 and 3 ways, shuffled: the same batches as locally.
    let pattern = "train/day=*/part-*.csv";
    let mut remote = s3.config(Format::Auto, &[&format!("s3://bucket/{pattern}")]);
    let mut local = ReaderConfig::new(Format::Auto, vec![PathBuf::from(s3.local(pattern))]);
    for c in [&mut remote, &mut local] {
        c.csv = schema.clone();
        c.shuffle_buffer = 100;
        c.seed = 7;
        c.epochs = gradflow_data::Epochs::Count(2);
    }
    assert_eq!(remote.files().unwrap().len(), 3);
    assert_eq!(remote.files().unwrap()[0], Path::new("s3://bucket/train/day=1/part-0.csv"));
    let mut total = 0;
    for workers in 1..=3 {
        for worker in 0..workers {
            let got = batches(&remote, worker, workers).unwrap();
            assert_eq!(got, batches(&local, worker, workers).unwrap(), "worker {worker} of {workers}");
            total += got.iter().map(Vec::len).sum::<usize>();
        }
    }
    assert_eq!(total, 3 * 2 * (450 + 500 + 550), "every row once per epoch, for each split");

    // A folder: its objects, hidden ones (`_SUCCESS`) left out; and a compressed object.
    let folder = s3.config(Format::Csv, &["s3://bucket/train/day=2/"]);
    assert_eq!(folder.files().unwrap(), [PathBuf::from("s3://bucket/train/day=2/part-0.csv")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(csv_text(9, 300).as_bytes()).unwrap();
    let plain = s3.put("more/plain.csv", csv_text(9, 300));
    s3.put("more/day9.csv.gz", gz.finish().unwrap());
    let mut remote = s3.config(Format::Auto, &["s3://bucket/more/day9.csv.gz"]);
    remote.csv = schema.clone();
    let mut local = ReaderConfig::new(Format::Auto, vec![plain]);
    local.csv = schema.clone();
    assert_eq!(batches(&remote, 0, 1).unwrap(), batches(&local, 0, 1).unwrap());

    // Dynamic-sharding tasks name the object by URL.
    let mut remote = s3.config(Format::Csv, &["s3://bucket/train/day=1/part-0.csv"]);
    remote.csv = schema.clone();
    let piece = FilePiece { path: "s3://bucket/train/day=1/part-0.csv".into(), range: 100..2000 };
    let mut local = ReaderConfig::new(Format::Csv, vec![PathBuf::from(s3.local("train/day=1/part-0.csv"))]);
    local.csv = schema.clone();
    let local_piece = FilePiece { path: local.paths[0].clone(), range: 100..2000 };
    let rows = drain(&mut Reader::from_pieces(&remote, vec![piece]).unwrap(), 10).unwrap();
    assert!(!rows.is_empty());
    assert_eq!(rows, drain(&mut Reader::from_pieces(&local, vec![local_piece]).unwrap(), 10).unwrap());

    // A bad line is named by its URL and line.
    s3.put("bad/x.csv", "label,d0\n1,2\n0,oops\n");
    match batches(&s3.config(Format::Csv, &["s3://bucket/bad/x.csv"]), 0, 1) {
        Err(DataError::Parse { path, line, .. }) => {
            assert_eq!((path, line), (PathBuf::from("s3://bucket/bad/x.csv"), 3))
        }
        other => panic!("expected a parse error, got {other:?}"),
    }

    // Missing objects, folders, matches and buckets fail at once, naming the URL.
    for (url, says) in [
        ("s3://bucket/train/day=1/nope.csv", "no such object"),
        ("s3://bucket/nothing/", "no such object"),
        ("s3://bucket/train/day=*/nope-*.csv", "no object matches"),
        ("s3://no-such-bucket/train.csv", "no such object"),
    ] {
        let started = Instant::now();
        let err = Reader::open(&s3.config(Format::Csv, &[url]), ShardSpec::default()).unwrap_err();
        assert!(matches!(err, DataError::NotFound { .. }), "{url}: {err:?}");
        let message = err.to_string();
        assert!(message.contains(url) && message.contains(says), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5), "{url} took {:?}", started.elapsed());
    }
}

#[test]
fn unsupported_and_malformed_urls_are_named() {
    for (url, says) in [
        (
            "ftp://host/train.csv",
            "`ftp://` is not a supported scheme (supported: a local path, file://, s3://",
        ),
        ("s3://", "data URL `s3://`"),
    ] {
        let config = ReaderConfig::new(Format::Csv, vec![PathBuf::from(url)]);
        let err = Reader::open(&config, ShardSpec::default()).unwrap_err();
        assert!(matches!(err, DataError::Url { .. }), "{url}: {err:?}");
        assert!(err.to_string().contains(says), "{err}");
    }
    // file:// is a local path.
    let dir = tempfile::tempdir().unwrap();
    let path = common::write(dir.path(), "a.libsvm", "1 3:1\n");
    let config = ReaderConfig::new(Format::Auto, vec![PathBuf::from(format!("file://{}", path.display()))]);
    assert_eq!(common::read_shard(&config, 0, 1).unwrap(), vec![Row::new(1.0, &[], &[(0, 3, 1.0)])]);
}
