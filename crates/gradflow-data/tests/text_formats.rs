//! Compressed text files (gzip, zstd), the format inferred from the extension, and libsvm for
//! field-aware models (the libffm form and `dense_indices`), read through the reader.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{Row, drain, read_shard, write};
use gradflow_data::{
    CsvSchema, DataError, FilePiece, Format, LibsvmOptions, Reader, ReaderConfig, ShardSpec, task_pieces,
};

fn gzip(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut e =
        flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
    e.write_all(text).unwrap();
    e.finish().unwrap();
    path
}

fn zstd(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
    write(dir, name, zstd::encode_all(text, 3).unwrap())
}

fn csv_text(rows: usize) -> String {
    let mut text = String::from("label,d0,c0,d1\n");
    for i in 0..rows {
        text.push_str(&format!("{},{}.5,v{},{}\n", i % 2, i, i % 7, i * 3));
    }
    text
}

fn read_all(config: &ReaderConfig) -> Vec<Row> {
    read_shard(config, 0, 1).unwrap()
}

#[test]
fn gzip_and_zstd_files_read_as_their_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let text = csv_text(500);
    let plain = write(dir.path(), "a.csv", &text);
    let schema = CsvSchema::new("label", vec!["c0".into()]);
    let mut config = ReaderConfig::new(Format::Csv, vec![plain]);
    config.csv = schema.clone();
    let expected = read_all(&config);
    assert_eq!(expected.len(), 500);
    // Format::Auto: `a.csv.gz` is CSV, whatever the compression.
    for path in
        [gzip(dir.path(), "a.csv.gz", text.as_bytes()), zstd(dir.path(), "a.csv.zst", text.as_bytes())]
    {
        let mut config = ReaderConfig::new(Format::Auto, vec![path.clone()]);
        config.csv = schema.clone();
        assert_eq!(read_all(&config), expected, "{}", path.display());
    }

    // A concatenation of gzip members (`cat a.gz b.gz`) is one file of both texts.
    let a = gzip(dir.path(), "x.gz", b"1 1:1\n");
    let b = gzip(dir.path(), "y.gz", b"0 2:1\n");
    let mut both = std::fs::read(a).unwrap();
    both.extend(std::fs::read(b).unwrap());
    let config = ReaderConfig::new(Format::Libsvm, vec![write(dir.path(), "both.libsvm.gz", both)]);
    assert_eq!(
        read_all(&config),
        vec![Row::new(1.0, &[], &[(0, 1, 1.0)]), Row::new(0.0, &[], &[(0, 2, 1.0)])]
    );
}

#[test]
fn compressed_files_are_dealt_out_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut all = Vec::new();
    for f in 0..5 {
        let text: String = (0..40).map(|i| format!("{} {}:1\n", i % 2, f * 100 + i)).collect();
        files.push(gzip(dir.path(), &format!("part-{f}.libsvm.gz"), text.as_bytes()));
        all.extend(read_all(&ReaderConfig::new(
            Format::Libsvm,
            vec![write(dir.path(), "plain.libsvm", &text)],
        )));
    }
    let config = ReaderConfig::new(Format::Auto, files.clone());
    let mut union = Vec::new();
    for worker in 0..2 {
        let shard = ShardSpec::new(worker, 2).unwrap();
        let reader = Reader::open(&config, shard).unwrap();
        let mine: Vec<&Path> = reader.pieces().iter().map(|p| p.path.as_path()).collect();
        let dealt: Vec<&Path> = files.iter().skip(worker).step_by(2).map(PathBuf::as_path).collect();
        assert_eq!(mine, dealt, "worker {worker} reads every other file, whole");
        let rows = read_shard(&config, worker, 2).unwrap();
        assert_eq!(rows.len(), 40 * dealt.len());
        union.extend(rows);
    }
    union.sort();
    all.sort();
    assert_eq!(union, all);

    // Dynamic sharding: one task per compressed file, byte ranges for plain ones.
    let plain = write(dir.path(), "big.libsvm", "1 1:1\n".repeat(1000));
    let tasks =
        task_pieces(&[files[0].clone(), plain.clone()], 1024, &Default::default(), Format::Auto).unwrap();
    assert_eq!(tasks[0], FilePiece::whole(&files[0]));
    assert_eq!(tasks.len(), 1 + 6, "6000 bytes in tasks of 1024");
    assert!(tasks[1..].iter().all(|t| t.path == plain && t.range.end - t.range.start <= 1024));
    // A task that is a whole compressed file reads all of it; any other piece of it nothing.
    let mut r = Reader::from_pieces(&config, vec![tasks[0].clone()]).unwrap();
    assert_eq!(drain(&mut r, 16).unwrap().len(), 40);
    let mut r =
        Reader::from_pieces(&config, vec![FilePiece { path: files[0].clone(), range: 5..9 }]).unwrap();
    assert_eq!(drain(&mut r, 16).unwrap().len(), 0);
}

#[test]
fn an_error_in_a_compressed_file_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = zstd(dir.path(), "bad.csv.zst", b"label,x\n1,2\n0,3\n1,oops\n");
    let config = ReaderConfig::new(Format::Auto, vec![path.clone()]);
    match read_shard(&config, 0, 1) {
        Err(DataError::Parse { path: p, line, expected, found }) => {
            assert_eq!((p, line), (path, 4));
            assert_eq!((expected.as_str(), found.as_str()), ("a finite number in column `x`", "`oops`"));
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    // Bytes that are not gzip are an I/O error naming the file.
    let fake = write(dir.path(), "fake.csv.gz", "label,x\n1,2\n");
    let err = read_shard(&ReaderConfig::new(Format::Auto, vec![fake]), 0, 1).unwrap_err().to_string();
    assert!(err.contains("fake.csv.gz"), "{err}");
}

#[test]
fn the_format_comes_from_the_extension() {
    assert_eq!(Format::of_path(Path::new("a.csv")), Some(Format::Csv));
    assert_eq!(Format::of_path(Path::new("a.csv.gz")), Some(Format::Csv));
    assert_eq!(Format::of_path(Path::new("day=1/a.libffm.zst")), Some(Format::Libsvm));
    assert_eq!(Format::of_path(Path::new("a.svm")), Some(Format::Libsvm));
    assert_eq!(Format::of_path(Path::new("a.txt")), None);
    assert_eq!(Format::Auto.resolve(Some(Path::new("a.txt"))), Format::Csv, "the old default");
    assert_eq!(Format::Csv.resolve(Some(Path::new("a.libsvm"))), Format::Csv, "a given format wins");

    let dir = tempfile::tempdir().unwrap();
    let libsvm = write(dir.path(), "t.libsvm", "1 3:1\n");
    assert_eq!(
        read_all(&ReaderConfig::new(Format::Auto, vec![libsvm])),
        vec![Row::new(1.0, &[], &[(0, 3, 1.0)])]
    );
    let unknown = write(dir.path(), "t.data", "label,x\n1,2\n");
    assert_eq!(read_all(&ReaderConfig::new(Format::Auto, vec![unknown])), vec![Row::new(1.0, &[2.0], &[])]);
    let config: ReaderConfig = toml::from_str("path = \"a.ffm\"").unwrap();
    assert_eq!(config.format, Format::Auto);
}

#[test]
fn libffm_files_with_dense_indices_feed_field_aware_models() {
    let dir = tempfile::tempdir().unwrap();
    // Criteo-style: fields 0 and 1 are integer features, 2.. categorical.
    let text = "1 0:0:0.5 1:1:3 2:9001:1 3:77:1\n0 1:1:2 2:9002:1 3:78:1\n";
    let mut config = ReaderConfig::new(Format::Auto, vec![write(dir.path(), "c.libffm", text)]);
    config.libsvm = LibsvmOptions { dense_indices: 2 };
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    assert_eq!(reader.num_dense(), 2);
    assert_eq!(reader.dense_names(), ["0", "1"]);
    assert_eq!(
        drain(&mut reader, 8).unwrap(),
        vec![
            Row::new(1.0, &[0.5, 3.0], &[(0, 9001, 1.0), (1, 77, 1.0)]),
            Row::new(0.0, &[0.0, 2.0], &[(0, 9002, 1.0), (1, 78, 1.0)]),
        ]
    );
    // The plain libsvm form: indices below 2 are dense.
    let mut config =
        ReaderConfig::new(Format::Libsvm, vec![write(dir.path(), "c.libsvm", "1 0:4 5:1 1:2\n")]);
    config.libsvm = toml::from_str("dense_indices = 2").unwrap();
    assert_eq!(read_all(&config), vec![Row::new(1.0, &[4.0, 2.0], &[(0, 5, 1.0)])]);
}

#[test]
fn local_globs_list_matching_files_sorted() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("day=2/part-0.libsvm", "0 2:1\n"),
        ("day=1/part-0.libsvm", "1 1:1\n"),
        ("day=1/.part-9.libsvm", "x"),
    ] {
        std::fs::create_dir_all(dir.path().join(name).parent().unwrap()).unwrap();
        write(dir.path(), name, text);
    }
    write(dir.path(), "day=1/notes.txt", "not data");
    let pattern = dir.path().join("day=*/part-*.libsvm");
    let config = ReaderConfig::new(Format::Auto, vec![pattern.clone()]);
    assert_eq!(
        config.files().unwrap(),
        [dir.path().join("day=1/part-0.libsvm"), dir.path().join("day=2/part-0.libsvm")]
    );
    assert_eq!(
        read_all(&config),
        vec![Row::new(1.0, &[], &[(0, 1, 1.0)]), Row::new(0.0, &[], &[(0, 2, 1.0)])]
    );
    let deep = ReaderConfig::new(Format::Libsvm, vec![dir.path().join("**/*.libsvm")]);
    assert_eq!(deep.files().unwrap().len(), 2);
    let none = ReaderConfig::new(Format::Libsvm, vec![dir.path().join("day=*/nope-*.libsvm")]);
    let err = none.files().unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }) && err.to_string().contains("nope-*"), "{err}");
}
