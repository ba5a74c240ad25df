//! TFRecord files of `tf.Example`, written by a small Python writer of its own (the framing,
//! crc32c and the protobuf encoded by hand, no TensorFlow), so that the reader is checked
//! against an implementation that shares no code with it. Plain and gzip, checksums verified.
//!
//! Skipped, with a notice, when `python3` is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Row, read_shard};
use gradflow_data::{CsvSchema, DataError, Format, Reader, ReaderConfig, ShardSpec, categorical_id};

const WRITER: &str = r#"
import gzip, struct, sys

def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def masked(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def ld(field, payload):
    return varint(field << 3 | 2) + varint(len(payload)) + payload

def bytes_list(vals):
    return ld(1, b"".join(ld(1, v) for v in vals))

def float_list(vals):
    return ld(2, ld(1, struct.pack("<%df" % len(vals), *vals)))

def int64_list(vals):
    return ld(3, ld(1, b"".join(varint(v & 0xFFFFFFFFFFFFFFFF) for v in vals)))

def example(features):
    return ld(1, b"".join(ld(1, ld(1, k.encode()) + ld(2, v)) for k, v in features.items()))

def record(data):
    n = struct.pack("<Q", len(data))
    return n + struct.pack("<I", masked(n)) + data + struct.pack("<I", masked(data))

def rows(start, count):
    out = b""
    for i in range(start, start + count):
        f = {"label": int64_list([i % 2]), "d1": int64_list([i * 3 - 7]), "d0": float_list([i * 0.5]),
             "c": bytes_list([b"v%d" % (i % 5)]), "tags": int64_list([] if i % 4 == 0 else [i, -i])}
        out += record(example(f))
    return out

open("a.tfrecord", "wb").write(rows(0, 40))
with gzip.open("b.tfrecord.gz", "wb") as f:
    f.write(rows(40, 25))
"#;

fn write_files() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    match Command::new("python3").arg("-c").arg(WRITER).current_dir(dir.path()).output() {
        Ok(o) if o.status.success() => Some(dir),
        Ok(o) => panic!("the TFRecord writer failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => {
            eprintln!("NOTICE: skipping the TFRecord test: python3 is missing");
            None
        }
    }
}

fn expected(i: i64) -> Row {
    let id = |f: u32, s: String| (f, categorical_id(f, s.as_bytes()), 1.0);
    let mut sparse = vec![id(0, format!("v{}", i % 5))];
    if i % 4 != 0 {
        sparse.extend([id(1, i.to_string()), id(1, (-i).to_string())]);
    }
    Row::new((i % 2) as f32, &[i as f32 * 0.5, (i * 3 - 7) as f32], &sparse)
}

fn config(paths: Vec<PathBuf>) -> ReaderConfig {
    let mut c = ReaderConfig::new(Format::Auto, paths);
    c.csv = CsvSchema::new("label", vec!["c".into(), "tags".into()]);
    c
}

#[test]
fn tf_examples_plain_and_gzip_by_feature_name() {
    let Some(dir) = write_files() else { return };
    let files = vec![dir.path().join("a.tfrecord"), dir.path().join("b.tfrecord.gz")];
    let c = config(files.clone());
    let reader = Reader::open(&c, ShardSpec::default()).unwrap();
    assert_eq!(reader.dense_names(), ["d0", "d1"], "every other feature of the first record, by name");
    assert_eq!(read_shard(&c, 0, 1).unwrap(), (0..65).map(expected).collect::<Vec<_>>());
    // Each file is read whole by one worker.
    for worker in 0..2 {
        let r = Reader::open(&c, ShardSpec::new(worker, 2).unwrap()).unwrap();
        assert_eq!(r.pieces().len(), 1);
        assert_eq!(r.pieces()[0].path, files[worker]);
        let n = read_shard(&c, worker, 2).unwrap().len();
        assert_eq!(n, [40, 25][worker]);
    }
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn checksums_and_framing_are_verified() {
    let Some(dir) = write_files() else { return };
    let path = dir.path().join("a.tfrecord");
    let record = {
        let bytes = std::fs::read(&path).unwrap();
        16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
    };
    // A byte of the third record's data: its checksum no longer matches, whatever
    // skip_malformed says.
    flip(&path, 2 * record + 14);
    let mut c = config(vec![path.clone()]);
    c.skip_malformed = true;
    match read_shard(&c, 0, 1) {
        Err(DataError::Row { path: p, row, found, .. }) => {
            assert_eq!((p, row), (path.clone(), 3));
            assert!(found.contains("checksum"), "{found}");
        }
        other => panic!("expected a checksum error in record 3, got {other:?}"),
    }
    // A corrupt length is caught by the length's own checksum.
    flip(&path, 2 * record + 14);
    flip(&path, record + 1);
    let err = read_shard(&config(vec![path.clone()]), 0, 1).unwrap_err().to_string();
    assert!(err.contains("row 2") && err.contains("length whose checksum does not match"), "{err}");
    // A file cut inside a record.
    flip(&path, record + 1);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = read_shard(&config(vec![path.clone()]), 0, 1).unwrap_err().to_string();
    assert!(err.contains("row 40") && err.contains("ends inside a record"), "{err}");
    // A feature the config names must be in the first record.
    let mut c = config(vec![dir.path().join("b.tfrecord.gz")]);
    c.csv.categorical.push("nope".into());
    let err = Reader::open(&c, ShardSpec::default()).unwrap_err().to_string();
    assert!(err.contains("a feature named `nope`") && err.contains("`tags`"), "{err}");
}

#[test]
fn inspect_shows_the_first_records_features() {
    let Some(dir) = write_files() else { return };
    let path = dir.path().join("b.tfrecord.gz");
    let i = gradflow_data::inspect(&path, Format::Auto, 2, &Default::default()).unwrap();
    assert_eq!((i.format, i.compression), (Format::Tfrecord, gradflow_data::Compression::Gzip));
    assert_eq!(i.first.len(), 2);
    assert_eq!(i.first[0], ["c=[\"v0\"]", "d0=[20]", "d1=[113]", "label=[0]", "tags=[]"]);
    assert_eq!(i.first[1][4], "tags=[41, -41]");
}

#[test]
fn tfrecord_converted_to_parquet_reads_the_same() {
    let Some(dir) = write_files() else { return };
    let c = config(vec![dir.path().join("b.tfrecord.gz")]);
    let out = dir.path().join("b.parquet");
    let stores = gradflow_data::Stores::default();
    let done = gradflow_data::convert::tfrecord_to_parquet(&c.paths[0], &c.csv, &out, 10, &stores).unwrap();
    assert_eq!((done.rows, done.row_groups), (25, 3));
    let mut p = config(vec![out]);
    p.format = Format::Parquet;
    let from_parquet = read_shard(&p, 0, 1).unwrap();
    assert_eq!(from_parquet, (40..65).map(expected).collect::<Vec<_>>());
}
