//! The `[data]` section: the format inferred from the extension, libsvm's dense features,
//! and what a worker's reader is built from.

use gradflow_data::Format;
use gradflow_job::JobConfig;

fn job(data: &str, model: &str) -> Result<JobConfig, gradflow_job::JobError> {
    JobConfig::parse(&format!("name = \"demo\"\n[model]\n{model}\n[data]\n{data}\n"))
}

const LR: &str = "kind = \"logistic_regression\"";

#[test]
fn the_format_comes_from_the_first_training_file() {
    for (train, format) in [
        ("train.csv", Format::Csv),
        ("train.csv.gz", Format::Csv),
        ("train.libsvm", Format::Libsvm),
        ("day-1.ffm.zst", Format::Libsvm),
        ("train.txt", Format::Csv),
    ] {
        let j = job(&format!("train = \"{train}\""), LR).unwrap();
        assert_eq!(j.data.format, Format::Auto, "{train}");
        assert_eq!(j.data_format(), format, "{train}");
        assert_eq!(j.train_reader().format, format, "{train}");
    }
    let j = job("train = \"train.libsvm\"\ntest = \"test.data\"\nformat = \"csv\"", LR).unwrap();
    assert_eq!(j.data_format(), Format::Csv, "a given format wins");
    assert_eq!(j.test_reader().unwrap().format, Format::Csv);
    // Left out, each set's format comes from its own first file: Parquet training rows
    // exported by a pipeline, a CSV test set kept aside.
    let j = job("train = \"day-*.parquet\"\ntest = \"test.csv\"", LR).unwrap();
    assert_eq!(j.train_reader().format, Format::Parquet);
    assert_eq!(j.test_reader().unwrap().format, Format::Csv);
    // A test file whose extension names no format (libsvm's `a9a.t`, a folder) is read in
    // the training files' format.
    for test in ["a9a.t", "test/", "s3://bucket/test/"] {
        let j = job(&format!("train = \"a9a.libsvm\"\ntest = \"{test}\""), LR).unwrap();
        assert_eq!(j.test_reader().unwrap().format, Format::Libsvm, "{test}");
    }
}

#[test]
fn libsvm_dense_indices_must_match_the_model() {
    let wd = |dense: usize| format!("kind = \"wide_deep\"\nnum_fields = 26\nnum_dense = {dense}");
    let j = job("train = \"criteo.libffm\"\ndense_indices = 13", &wd(13)).unwrap();
    assert_eq!(j.train_reader().libsvm.dense_indices, 13);
    assert_eq!(j.test_reader(), None);
    let err = job("train = \"criteo.libffm\"\ndense_indices = 12", &wd(13)).unwrap_err().to_string();
    assert!(err.contains("model.num_dense") && err.contains("dense_indices = 12"), "{err}");
    let err = job("train = \"criteo.libsvm\"", &wd(13)).unwrap_err().to_string();
    assert!(err.contains("dense_indices = 0"), "{err}");
    // Synthetic data is CSV, so a libsvm extension needs no format key to be refused.
    let err = job("train = \"s.libsvm\"\n[data.synth]", LR).unwrap_err().to_string();
    assert!(err.contains("data.synth"), "{err}");
}

#[test]
fn data_urls_are_kept_as_written_and_their_scheme_checked() {
    let mut j =
        job("train = \"s3://bucket/day=*/part-*.csv\"\ntest = [\"test.csv\", \"gs://b/t.csv\"]", LR).unwrap();
    j.resolve_paths(std::path::Path::new("/jobs"));
    assert_eq!(j.data.train, [std::path::PathBuf::from("s3://bucket/day=*/part-*.csv")]);
    assert_eq!(j.data.test, [std::path::PathBuf::from("/jobs/test.csv"), "gs://b/t.csv".into()]);
    assert_eq!(j.data_format(), Format::Csv);
    let err = job("train = \"ftp://host/train.csv\"", LR).unwrap_err().to_string();
    assert!(err.contains("data.train") && err.contains("`ftp://` is not a supported scheme"), "{err}");
    let err = job("train = \"s3://b/t.csv\"\n[data.synth]", LR).unwrap_err().to_string();
    assert!(err.contains("data.synth") && err.contains("is a URL"), "{err}");
}
