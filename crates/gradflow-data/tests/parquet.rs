//! Parquet files written by pyarrow (an implementation independent of the one reading them):
//! columns by name as for CSV, string and integer categorical columns, list columns as
//! multi-id fields, row groups as the units of sharding, and errors that name the row.
//!
//! Skipped, with a notice, when `python3 -c "import pyarrow"` fails; CI installs pyarrow
//! (`.ci/run`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Row, read_shard};
use gradflow_data::{
    CsvSchema, DataError, FilePiece, Format, Reader, ReaderConfig, ShardSpec, Stores, categorical_id,
    task_pieces,
};

/// Runs `script` with python3 in `dir`; `false` (with a notice) when pyarrow is missing.
fn python(dir: &Path, script: &str) -> bool {
    let probe = Command::new("python3").args(["-c", "import pyarrow"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("NOTICE: skipping the Parquet test: pyarrow is missing (python3 -m pip install pyarrow)");
        return false;
    }
    let out = Command::new("python3").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    true
}

const WRITE: &str = r#"
import pyarrow as pa, pyarrow.parquet as pq
n = 450
label = [i % 2 for i in range(n)]
d0 = [i * 0.25 for i in range(n)]
d1 = [float((i * 7) % 100) for i in range(n)]
c_str = [None if i % 50 == 3 else "v%d" % (i % 13) for i in range(n)]
c_int = [i % 17 - 5 for i in range(n)]
table = pa.table({
    "d0": pa.array(d0, pa.float64()),
    "label": pa.array(label, pa.int64()),
    "c_str": pa.array(c_str, pa.string()),
    "d1": pa.array(d1, pa.float32()),
    "c_int": pa.array(c_int, pa.int32()),
})
pq.write_table(table, "s.parquet", row_group_size=100, compression="snappy")
pq.write_table(table, "z.parquet", row_group_size=1000, compression="zstd")
with open("s.csv", "w") as f:
    f.write("d0,label,c_str,d1,c_int\n")
    for i in range(n):
        f.write("%r,%d,%s,%r,%d\n" % (d0[i], label[i], c_str[i] or "", d1[i], c_int[i]))
tags = pa.table({
    "label": pa.array([1, 0, 1], pa.int8()),
    "tags": pa.array([[3, 4], [], None], pa.list_(pa.int64())),
    "words": pa.array([["a"], ["b", "c"], ["d"]], pa.list_(pa.string())),
    "x": pa.array([1.5, None, 2.0], pa.float64()),
})
pq.write_table(tags, "tags.parquet")
"#;

fn write_files() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    python(dir.path(), WRITE).then_some(dir)
}

fn config(path: PathBuf, categorical: &[&str]) -> ReaderConfig {
    let mut c = ReaderConfig::new(Format::Auto, vec![path]);
    c.csv = CsvSchema::new("label", categorical.iter().map(|s| s.to_string()).collect());
    c
}

#[test]
fn parquet_reads_as_the_same_data_in_csv() {
    let Some(dir) = write_files() else { return };
    let categorical = ["c_str", "c_int"];
    let csv = read_shard(&config(dir.path().join("s.csv"), &categorical), 0, 1).unwrap();
    assert_eq!(csv.len(), 450);
    for name in ["s.parquet", "z.parquet"] {
        let c = config(dir.path().join(name), &categorical);
        let reader = Reader::open(&c, ShardSpec::default()).unwrap();
        assert_eq!(reader.dense_names(), ["d0", "d1"], "{name}");
        assert_eq!(reader.categorical_names(), categorical);
        assert_eq!(read_shard(&c, 0, 1).unwrap(), csv, "{name}: the same examples as the CSV file");
    }
    // A null categorical value is the empty text, as an empty CSV cell is.
    assert_eq!(csv[3].sparse[0], (0, categorical_id(0, b""), 1.0f32.to_bits()));
    assert_eq!(
        csv[5].sparse[1],
        (1, categorical_id(1, b"0"), 1.0f32.to_bits()),
        "5 % 17 - 5, written as text"
    );
}

#[test]
fn row_groups_are_the_units_of_sharding() {
    let Some(dir) = write_files() else { return };
    let path = dir.path().join("s.parquet");
    let c = config(path.clone(), &["c_str", "c_int"]);
    let all = read_shard(&c, 0, 1).unwrap();
    let mut union = Vec::new();
    for worker in 0..3 {
        let reader = Reader::open(&c, ShardSpec::new(worker, 3).unwrap()).unwrap();
        let groups = &reader.pieces()[0].range;
        assert_eq!(groups, &[0..1, 1..3, 3..5][worker], "5 row groups among 3 workers");
        let rows = read_shard(&c, worker, 3).unwrap();
        let first = groups.start as usize * 100;
        assert_eq!(rows, all[first..(first + rows.len())], "worker {worker} reads its row groups in order");
        union.extend(rows);
    }
    assert_eq!(union, all);
    // Several files: their row groups are split as one sequence, so 2 files of 5 groups give
    // 2 workers 5 groups each (a file at a time), not 2 and 3 of each file.
    let two = [path.clone(), path.clone()];
    for (worker, want) in [(0, [0..5, 0..0]), (1, [5..5, 0..5])] {
        let pieces =
            ShardSpec::new(worker, 2).unwrap().pieces_of(&two, &Stores::default(), Format::Auto).unwrap();
        let ranges: Vec<_> = pieces.iter().map(|p| p.range.clone()).collect();
        assert_eq!(ranges, want, "worker {worker}");
    }
    // Dynamic sharding: one task per row group, each read alone.
    let tasks = task_pieces(std::slice::from_ref(&path), 1 << 20, &Stores::default(), Format::Auto).unwrap();
    assert_eq!(tasks, (0..5).map(|g| FilePiece { path: path.clone(), range: g..g + 1 }).collect::<Vec<_>>());
    let last = common::drain(&mut Reader::from_pieces(&c, vec![tasks[4].clone()]).unwrap(), 7).unwrap();
    assert_eq!(last, all[400..]);
}

#[test]
fn list_columns_are_multi_id_fields_and_bad_rows_are_named() {
    let Some(dir) = write_files() else { return };
    let path = dir.path().join("tags.parquet");
    let mut c = config(path.clone(), &["tags", "words"]);
    let id = |f: u32, s: &str| (f, categorical_id(f, s.as_bytes()), 1.0);
    match read_shard(&c, 0, 1) {
        Err(DataError::Row { path: p, row, expected, found }) => {
            assert_eq!((p, row), (path.clone(), 2));
            assert_eq!((expected.as_str(), found.as_str()), ("a number in column `x`", "null"));
        }
        other => panic!("expected the null in row 2 to be named, got {other:?}"),
    }
    c.skip_malformed = true;
    let mut reader = Reader::open(&c, ShardSpec::default()).unwrap();
    let rows = common::drain(&mut reader, 8).unwrap();
    assert_eq!(
        rows,
        vec![
            Row::new(1.0, &[1.5], &[id(0, "3"), id(0, "4"), id(1, "a")]),
            Row::new(1.0, &[2.0], &[id(1, "d")]),
        ]
    );
    assert_eq!(reader.skipped(), 1);

    // Columns the config names must be there; the message lists what is.
    let err = Reader::open(&config(path.clone(), &["nope"]), ShardSpec::default()).unwrap_err().to_string();
    assert!(err.contains("a categorical column named `nope`") && err.contains("`tags`"), "{err}");
    // A list column cannot be a dense feature.
    let err = read_shard(&config(path, &["words"]), 0, 1).unwrap_err().to_string();
    assert!(err.contains("column `tags` to be numeric") && err.contains("row 1"), "{err}");
}

#[test]
fn inspect_shows_columns_row_groups_and_first_rows() {
    let Some(dir) = write_files() else { return };
    let stores = Stores::default();
    let i = gradflow_data::inspect(&dir.path().join("s.parquet"), Format::Auto, 2, &stores).unwrap();
    assert_eq!(i.format, Format::Parquet);
    assert_eq!(i.columns, ["d0", "label", "c_str", "d1", "c_int"]);
    assert_eq!(i.parquet.as_ref().unwrap().row_group_rows, [100, 100, 100, 100, 50]);
    assert_eq!(i.first, [["0", "0", "v0", "0", "-5"], ["0.25", "1", "v1", "7", "-4"]]);
    let i = gradflow_data::inspect(&dir.path().join("tags.parquet"), Format::Auto, 5, &stores).unwrap();
    assert_eq!(i.first[0], ["1", "[3, 4]", "[a]", "1.5"]);
    assert_eq!(i.first[2], ["1", "null", "[d]", "2"]);
    let i = gradflow_data::inspect(&dir.path().join("s.csv"), Format::Auto, 1, &stores).unwrap();
    assert_eq!((i.format, i.parquet.is_none()), (Format::Csv, true));
    assert_eq!(i.columns, ["d0", "label", "c_str", "d1", "c_int"]);
    assert_eq!(i.first, [["0.0,0,v0,0.0,-5"]]);
}

#[test]
fn csv_converted_to_parquet_reads_the_same_here_and_in_pyarrow() {
    let Some(dir) = write_files() else { return };
    let categorical = ["c_str", "c_int"];
    let csv = config(dir.path().join("s.csv"), &categorical);
    let out = dir.path().join("converted.parquet");
    let done = gradflow_data::convert::csv_to_parquet(&csv.paths[0], &csv.csv, &out, 200, &Stores::default())
        .unwrap();
    assert_eq!((done.rows, done.row_groups), (450, 3));
    assert_eq!(
        read_shard(&config(out.clone(), &categorical), 0, 1).unwrap(),
        read_shard(&csv, 0, 1).unwrap()
    );
    let check = r#"
import pyarrow.parquet as pq
f = pq.ParquetFile("converted.parquet")
assert f.metadata.num_rows == 450 and f.metadata.num_row_groups == 3, f.metadata
t = f.read()
assert [str(x.type) for x in t.schema] == ["float", "float", "string", "float", "string"], t.schema
assert t.column("c_str")[3].as_py() == "" and t.column("c_int")[0].as_py() == "-5"
"#;
    assert!(python(dir.path(), check));
    // A bad cell is named by line.
    let bad = common::write(dir.path(), "bad.csv", "label,x\n1,2\n0,zz\n");
    let err =
        gradflow_data::convert::csv_to_parquet(&bad, &CsvSchema::default(), &out, 10, &Stores::default())
            .unwrap_err()
            .to_string();
    assert!(err.contains("bad.csv, line 3: expected a finite number in column `x`, found `zz`"), "{err}");
}
