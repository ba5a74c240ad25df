//! Parsing of real libsvm and CSV files through the reader, and the errors for bad lines.

mod common;

use common::{Row, drain, read_shard, write};
use gradflow_data::{CsvSchema, DataError, Epochs, Format, Reader, ReaderConfig, ShardSpec, categorical_id};

fn libsvm(path: std::path::PathBuf) -> ReaderConfig {
    ReaderConfig::new(Format::Libsvm, vec![path])
}

#[test]
fn libsvm_labels_comments_crlf_and_no_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let text = "# header comment\n+1 1:0.5 7:2 # trailing comment\r\n-1 3:1\n\n   \n0 2:-1.5e2\r\n1 \t 18446744073709551615:1\n0.75 4:4";
    let config = libsvm(write(dir.path(), "a.libsvm", text));
    let rows = read_shard(&config, 0, 1).unwrap();
    assert_eq!(
        rows,
        vec![
            Row::new(1.0, &[], &[(0, 1, 0.5), (0, 7, 2.0)]),
            Row::new(0.0, &[], &[(0, 3, 1.0)]),
            Row::new(0.0, &[], &[(0, 2, -150.0)]),
            Row::new(1.0, &[], &[(0, u64::MAX, 1.0)]),
            Row::new(0.75, &[], &[(0, 4, 4.0)]),
        ]
    );
}

#[test]
fn csv_dense_categorical_crlf_quotes_and_no_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let text = "d0,color,label,\"size, in cm\",shape\r\n1.5,red,1,2,\"round, mostly\"\r\n\r\n-2,\"\",-1,3e1,red\r\n0,red,0,0,\"say \"\"hi\"\"\"";
    let mut config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "a.csv", text)]);
    config.csv = CsvSchema::new("label", vec!["shape".into(), "color".into()]);
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    assert_eq!(reader.num_dense(), 2);
    assert_eq!(reader.dense_names(), ["d0", "size, in cm"]);
    assert_eq!(reader.categorical_names(), ["shape", "color"]);
    let rows = drain(&mut reader, 2).unwrap();
    let cat = |f: u32, s: &str| (f, categorical_id(f, s.as_bytes()), 1.0);
    assert_eq!(
        rows,
        vec![
            Row::new(1.0, &[1.5, 2.0], &[cat(0, "round, mostly"), cat(1, "red")]),
            Row::new(0.0, &[-2.0, 30.0], &[cat(0, "red"), cat(1, "")]),
            Row::new(0.0, &[0.0, 0.0], &[cat(0, "say \"hi\""), cat(1, "red")]),
        ]
    );
    // Same text, different columns: different ids.
    assert_ne!(rows[0].sparse[1].1, rows[1].sparse[0].1);
}

#[test]
fn csv_dense_only_reads_breast_cancer() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/breast_cancer.csv");
    let mut config = ReaderConfig::new(Format::Csv, vec![path]);
    config.csv = CsvSchema::dense_only("label");
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    assert_eq!(reader.num_dense(), 30);
    assert_eq!(reader.dense_names()[0], "mean_radius");
    let rows = drain(&mut reader, 100).unwrap();
    assert_eq!(rows.len(), 569);
    let malignant = rows.iter().filter(|r| r.label() == 1.0).count();
    assert_eq!(malignant, 212);
    assert!(rows.iter().all(|r| r.sparse.is_empty()));
}

#[test]
fn csv_files_with_reordered_columns_agree() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.csv", "label,x,y,c\n1,1,2,k\n");
    let b = write(dir.path(), "b.csv", "y,c,label,x\n20,k,0,10\n");
    let mut config = ReaderConfig::new(Format::Csv, vec![a, b]);
    config.csv = CsvSchema::new("label", vec!["c".into()]);
    let rows = read_shard(&config, 0, 1).unwrap();
    assert_eq!(rows[0].dense, rows_dense(&[1.0, 2.0]));
    assert_eq!(rows[1].dense, rows_dense(&[10.0, 20.0]));
    assert_eq!(rows[0].sparse, rows[1].sparse);

    let c = write(dir.path(), "c.csv", "label,x,z,c\n1,1,2,k\n");
    config.paths.push(c.clone());
    let err = read_shard(&config, 0, 1).unwrap_err().to_string();
    assert!(err.contains("c.csv, line 1: expected the dense columns `x`, `y`"), "{err}");
}

fn rows_dense(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn csv_header_errors_name_line_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "h.csv", "target,x\n1,2\n")]);
    let err = Reader::open(&config, ShardSpec::default()).err().unwrap().to_string();
    assert!(
        err.contains("h.csv, line 1: expected a label column named `label`, found columns `target`, `x`"),
        "{err}"
    );
    let config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "e.csv", "")]);
    let err = Reader::open(&config, ShardSpec::default()).err().unwrap().to_string();
    assert!(err.contains("e.csv, line 1: expected a header row, found an empty file"), "{err}");
}

#[test]
fn csv_header_only_file_has_no_examples() {
    let dir = tempfile::tempdir().unwrap();
    for text in ["label,x", "label,x\n", "label,x\r\n"] {
        let config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "h.csv", text)]);
        for workers in 1..4 {
            for w in 0..workers {
                assert!(read_shard(&config, w, workers).unwrap().is_empty());
            }
        }
    }
}

/// 10 000 lines with a bad one at line 7321, which falls in the third of four shards.
fn file_with_bad_line(dir: &std::path::Path) -> (std::path::PathBuf, u64) {
    let mut text = String::new();
    let bad_line = 7321u64;
    for i in 1..=10_000u64 {
        if i == bad_line {
            text.push_str("1 5:0.5 oops 6:1\n");
        } else {
            text.push_str(&format!("{} {}:1.0\n", i % 2, i));
        }
    }
    (write(dir, "deep.libsvm", text), bad_line)
}

#[test]
fn malformed_line_deep_in_a_later_shard_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bad_line) = file_with_bad_line(dir.path());
    let config = libsvm(path);
    // The bad line is in worker 2's range of 4; the other workers read cleanly.
    for w in [0, 1, 3] {
        read_shard(&config, w, 4).unwrap();
    }
    let err = read_shard(&config, 2, 4).unwrap_err();
    match &err {
        DataError::Parse { line, expected, found, .. } => {
            assert_eq!(*line, bad_line);
            assert_eq!(expected, "a feature `index:value`");
            assert_eq!(found, "`oops`");
        }
        other => panic!("unexpected error {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("deep.libsvm, line 7321: expected a feature `index:value`, found `oops`"), "{msg}");
    // A single worker finds it at the same line.
    assert!(read_shard(&config, 0, 1).unwrap_err().to_string().contains("line 7321"));
}

#[test]
fn malformed_csv_line_with_crlf_names_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("label,a,b\r\n");
    for i in 0..500 {
        text.push_str(if i == 300 { "1,2\r\n" } else { "0,1,2\r\n" });
    }
    let config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "bad.csv", text)]);
    let errs: Vec<String> =
        (0..3).filter_map(|w| read_shard(&config, w, 3).err()).map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 1);
    // Line 1 is the header, data line i is file line i + 2.
    assert!(
        errs[0].contains("bad.csv, line 302: expected 3 cells (as in the header), found 2 cells"),
        "{}",
        errs[0]
    );
}

#[test]
fn skip_malformed_counts_skipped_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    let mut bad = 0;
    for i in 0..3000u64 {
        if i % 97 == 13 {
            text.push_str(["x 1:1\n", "1 2\n", "1 a:1\n", "1 1:nan\n"][(i % 4) as usize]);
            bad += 1;
        } else {
            text.push_str(&format!("1 {i}:1\n"));
        }
    }
    let mut config = libsvm(write(dir.path(), "s.libsvm", text));
    config.skip_malformed = true;
    config.epochs = Epochs::Count(2);
    let (mut good, mut skipped) = (0, 0);
    for w in 0..3 {
        let mut reader = Reader::open(&config, ShardSpec::new(w, 3).unwrap()).unwrap();
        good += drain(&mut reader, 64).unwrap().len();
        skipped += reader.skipped();
    }
    assert_eq!(good, 2 * (3000 - bad));
    assert_eq!(skipped, 2 * bad as u64);
}

#[test]
fn invalid_utf8_is_a_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = libsvm(write(dir.path(), "u.libsvm", b"1 1:1\n1 2:\xff\n"));
    let err = read_shard(&config, 0, 1).unwrap_err().to_string();
    assert!(err.contains("u.libsvm, line 2: expected UTF-8 text"), "{err}");
}

#[test]
fn file_much_larger_than_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    let mut expected_sum = 0u64;
    let mut n = 0;
    while text.len() < 3 << 20 {
        // Lines longer than the buffer, so every line spans several refills.
        text.push_str(&format!("{} {}:1 {}:2 {}:3 # padding padding\n", n % 2, n, n + 1, n + 2));
        expected_sum += 3 * n + 3;
        n += 1;
    }
    let mut config = libsvm(write(dir.path(), "big.libsvm", &text));
    config.buffer_bytes = 13;
    let mut total = 0;
    let mut sum = 0u64;
    for w in 0..3 {
        for row in read_shard(&config, w, 3).unwrap() {
            total += 1;
            sum += row.sparse.iter().map(|s| s.1).sum::<u64>();
        }
    }
    assert_eq!(total, n);
    assert_eq!(sum, expected_sum);
}

#[test]
fn directories_expand_to_sorted_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.libsvm", "1 2:1\n");
    write(dir.path(), "a.libsvm", "1 1:1\n");
    write(dir.path(), ".hidden", "garbage\n");
    let config = libsvm(dir.path().to_path_buf());
    let rows = read_shard(&config, 0, 1).unwrap();
    assert_eq!(rows.iter().map(|r| r.sparse[0].1).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn missing_file_names_it() {
    let config = libsvm("/nonexistent/train.libsvm".into());
    let err = Reader::open(&config, ShardSpec::default()).err().unwrap().to_string();
    assert!(err.starts_with("/nonexistent/train.libsvm: "), "{err}");
}

#[test]
fn config_from_toml_and_json() {
    let c: ReaderConfig = toml::from_str(
        r#"
        path = "data/train.csv"
        format = "csv"
        shuffle_buffer = 1000
        epochs = "forever"
        [csv]
        categorical = ["c0", "c1"]
        "#,
    )
    .unwrap();
    assert_eq!(c.paths, vec![std::path::PathBuf::from("data/train.csv")]);
    assert_eq!(c.format, Format::Csv);
    assert_eq!(c.csv.label, "label");
    assert_eq!(c.csv.categorical, vec!["c0", "c1"]);
    assert_eq!(c.epochs, Epochs::Forever);
    assert!(!c.skip_malformed);
    assert_eq!(c.buffer_bytes, 256 * 1024);

    let c: ReaderConfig =
        serde_json::from_str(r#"{"paths": ["a", "b"], "format": "libsvm", "epochs": 3}"#).unwrap();
    assert_eq!(c.paths.len(), 2);
    assert_eq!(c.epochs, Epochs::Count(3));
    assert_eq!(c, serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap());

    for bad in [
        r#"{"paths": ["a"], "format": "libsvm", "shufle_buffer": 3}"#,
        r#"{"paths": ["a"], "format": "orc"}"#,
        r#"{"paths": ["a"], "format": "libsvm", "epochs": 0}"#,
        r#"{"paths": ["a"], "format": "libsvm", "epochs": "always"}"#,
        r#"{"paths": ["a"], "format": "csv", "csv": {"lable": "y"}}"#,
    ] {
        assert!(serde_json::from_str::<ReaderConfig>(bad).is_err(), "{bad}");
    }
}

#[test]
fn invalid_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.csv", "label,x\n1,2\n");
    let mut c = ReaderConfig::new(Format::Csv, vec![path]);
    c.csv = CsvSchema::new("label", vec!["label".into()]);
    assert!(matches!(Reader::open(&c, ShardSpec::default()), Err(DataError::Config(_))));
    c.csv = CsvSchema::default();
    c.buffer_bytes = 0;
    assert!(matches!(Reader::open(&c, ShardSpec::default()), Err(DataError::Config(_))));
    c.buffer_bytes = 10;
    assert!(Reader::open(&c, ShardSpec { worker_index: 2, num_workers: 2 }).is_err());
    let mut r = Reader::open(&c, ShardSpec::default()).unwrap();
    assert!(r.next_batch(&mut gradflow_data::Batch::new(1), 0).is_err());
}

#[test]
fn labels_a_binary_model_cannot_learn_are_malformed_unless_any_label_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "l.libsvm", "1 1:1\n-1 2:1\n0.25 3:1\n2 4:1\n");
    let config = libsvm(path.clone());
    let err = read_shard(&config, 0, 1).unwrap_err();
    match &err {
        DataError::Parse { path: p, line, found, .. } => {
            assert_eq!((p, *line, found.as_str()), (&path, 4, "`2`"), "{err}")
        }
        other => panic!("expected a parse error, got {other}"),
    }
    assert!(err.to_string().contains("a label 0 or 1"), "{err}");

    let csv = write(dir.path(), "l.csv", "label,x\n1,1\n-5,2\n");
    let mut config = ReaderConfig::new(Format::Csv, vec![csv]);
    let err = read_shard(&config, 0, 1).unwrap_err().to_string();
    assert!(err.contains("l.csv, line 3") && err.contains("found `-5`"), "{err}");
    config.labels = gradflow_data::Labels::Any;
    assert_eq!(read_shard(&config, 0, 1).unwrap().len(), 2);

    let any = read_shard(&ReaderConfig { labels: gradflow_data::Labels::Any, ..libsvm(path) }, 0, 1).unwrap();
    assert_eq!(any.iter().map(Row::label).collect::<Vec<_>>(), [1.0, 0.0, 0.25, 2.0]);
}

#[test]
fn skipped_lines_keep_the_first_five_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..40 {
        // Lines 4, 8, ..., 40 are malformed in different ways.
        text.push_str(if i % 4 == 3 { ["1 1:nan\n", "7 1:1\n"][i / 4 % 2] } else { "1 1:1\n" });
    }
    let mut config = libsvm(write(dir.path(), "s.libsvm", text));
    config.skip_malformed = true;
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    assert_eq!(drain(&mut reader, 7).unwrap().len(), 30);
    assert_eq!(reader.skipped(), 10);
    let noted: Vec<String> = reader.skipped_lines().iter().map(ToString::to_string).collect();
    assert_eq!(noted.len(), gradflow_data::SKIPPED_LINES_KEPT);
    for (k, n) in noted.iter().enumerate() {
        assert!(n.contains(&format!("s.libsvm, line {}: expected", 4 * (k + 1))), "{n}");
    }
    assert!(noted[0].contains("a finite feature value") && noted[1].contains("found `7`"), "{noted:?}");
}

#[test]
fn a_huge_line_or_header_is_shown_cut_with_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let long = "y".repeat(1 << 20);
    let config = libsvm(write(dir.path(), "a.libsvm", format!("1 1:1\n1 2:{long}\n")));
    let err = read_shard(&config, 0, 1).unwrap_err().to_string();
    assert!(err.len() < 400, "{} bytes: {err}", err.len());
    assert!(err.contains("line 2") && err.contains(&format!("a line of {} bytes", long.len() + 4)), "{err}");

    // A header whose one column name is a megabyte, and no label column.
    let csv = write(dir.path(), "h.csv", format!("{long},x\n1,2\n"));
    let err = read_shard(&ReaderConfig::new(Format::Csv, vec![csv]), 0, 1).unwrap_err().to_string();
    assert!(err.len() < 400, "{} bytes: {err}", err.len());
    assert!(err.contains("expected a label column named `label`") && err.contains("`x`"), "{err}");
    // Many columns: the first few, then how many more.
    let names: Vec<String> = (0..10_000).map(|i| format!("c{i}")).collect();
    let listed = gradflow_data::csv::column_list(&names);
    assert!(listed.len() < 300 && listed.starts_with("`c0`, `c1`") && listed.ends_with(" more"), "{listed}");
}

#[test]
fn an_io_error_says_what_the_system_said_once() {
    let missing = std::path::PathBuf::from("/nonexistent/gradflow/train.csv");
    let err = Reader::open(&ReaderConfig::new(Format::Csv, vec![missing]), ShardSpec::default()).unwrap_err();
    // As `{:#}` prints an error and its sources.
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
    assert!(chain.contains("/nonexistent/gradflow/train.csv"), "{chain}");
}
