//! Getting a job's data ready before any process starts: synthetic data is written once, and
//! the data is checked against the job, so that a mistake fails in the launcher, once, and not
//! in N workers that each retry it: every file exists, a data folder holds files, the CSV
//! header has the label and categorical columns and as many dense columns as the model's
//! `num_dense`, and the first example of the training and test data parses.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use gradflow_data::{Batch, Epochs, Reader, ReaderConfig, ShardSpec, SynthConfig};
use tracing::info;

use gradflow_core::Restore;
use gradflow_job::JobConfig;

use crate::LaunchError;

fn io(context: String) -> impl FnOnce(std::io::Error) -> LaunchError {
    move |source| LaunchError::Io { context, source }
}

/// The step of the latest complete checkpoint under `url`, or `None` when none was written
/// yet. Every start that restores "latest" pins it to a step through this.
pub async fn latest_step(url: &str) -> Result<Option<u64>, LaunchError> {
    let fail = |e: gradflow_checkpoint::CheckpointError| LaunchError::JobFailed(format!("restore: {e}"));
    let store = gradflow_checkpoint::CheckpointStore::open(url).map_err(fail)?;
    match store.resolve("latest").await {
        Ok(manifest) => Ok(Some(manifest.step)),
        Err(gradflow_checkpoint::CheckpointError::NoCheckpoint { .. }) => Ok(None),
        Err(e) => Err(fail(e)),
    }
}

/// Turns `restore = "latest"` into the step `latest` names now, so that every server of the
/// job restores the same checkpoint even if `latest` moves while they start (a previous run's
/// last upload finishing, say).
pub async fn pin_restore(job: &mut JobConfig) -> Result<(), LaunchError> {
    let (Some(Restore::Latest), Some(ck)) = (&job.restore, job.checkpoint.as_ref()) else { return Ok(()) };
    let Some(step) = latest_step(&ck.url).await? else {
        return Err(LaunchError::JobFailed(format!("restore: no checkpoint under `{}`", ck.url)));
    };
    info!(step, url = %ck.url, "restoring the latest checkpoint");
    job.restore = Some(Restore::Step(step));
    Ok(())
}

/// Writes the job's synthetic data if it asks for some and the files are missing, then checks
/// the data against the job (see the module documentation); the error is
/// [`LaunchError::Data`].
pub fn prepare_data(job: &JobConfig) -> Result<(), LaunchError> {
    if let Some(config) = job.synth_config(false) {
        let train = &job.data.train[0];
        let test = job.data.test.first();
        if !train.exists() || test.is_some_and(|t| !t.exists()) {
            let test_rows = job.data.synth.as_ref().map_or(0, |s| s.test_rows);
            write_split(&config, test_rows, train, test.map(|p| p.as_path()))?;
        }
    }
    // URLs and globs are checked by opening them below, as a worker would.
    let named_file =
        |p: &&std::path::PathBuf| !gradflow_data::is_url(p) && !gradflow_data::remote::has_glob(p);
    for p in job.data.train.iter().chain(&job.data.test).filter(named_file) {
        if !p.exists() {
            return Err(LaunchError::JobFailed(format!(
                "data file {} does not exist (data.train / data.test in the job file)",
                p.display()
            )));
        }
    }
    check_against_model(job)
}

/// Opens the training and test data as a worker would and reads their first example: the
/// built-in trainer's checks, made once before anything starts. A job that runs its own
/// trainer (`worker.command`) reads its data itself, so only the files' existence is checked.
fn check_against_model(job: &JobConfig) -> Result<(), LaunchError> {
    let Some(config) = &job.model else { return Ok(()) };
    let model = gradflow_models::build(config).map_err(|e| LaunchError::Data(format!("model: {e}")))?;
    let readers: [(&str, Option<ReaderConfig>); 2] =
        [("data.train", Some(job.train_reader())), ("data.test", job.test_reader())];
    for (key, config) in readers {
        let Some(mut config) = config else { continue };
        config.shuffle_buffer = 0;
        config.epochs = Epochs::Count(1);
        let fail = |e: gradflow_data::DataError| LaunchError::Data(format!("{key}: {e}"));
        let mut reader = Reader::open(&config, ShardSpec::default()).map_err(fail)?;
        if reader.num_dense() != model.num_dense() {
            return Err(LaunchError::Data(format!(
                "{key}: the data has {} dense feature column(s) ({}), but model.num_dense is {}; every CSV column other \
                 than the label (`{}`) and the categorical ones (data.categorical) is a dense feature",
                reader.num_dense(),
                reader.dense_names().join(", "),
                model.num_dense(),
                job.data.label
            )));
        }
        let mut batch = Batch::new(reader.num_dense());
        reader.next_batch(&mut batch, 1).map_err(fail)?;
    }
    Ok(())
}

/// One synthetic dataset of `train` + `test_rows` rows from one hidden model, split into a
/// training file and a test file.
fn write_split(
    config: &SynthConfig,
    test_rows: u64,
    train: &Path,
    test: Option<&Path>,
) -> Result<(), LaunchError> {
    let test_rows = if test.is_some() { test_rows } else { 0 };
    let all = SynthConfig { rows: config.rows + test_rows, ..config.clone() };
    let dir = train.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let tmp = train.with_extension("all.tmp");
    info!(rows = all.rows, path = %train.display(), "writing synthetic data");
    let summary = gradflow_data::write_synth(&all, &tmp)
        .map_err(|e| LaunchError::JobFailed(format!("synthetic data: {e}")))?;
    let reader = BufReader::new(std::fs::File::open(&tmp).map_err(io(format!("reading {}", tmp.display())))?);
    let mut lines = reader.lines();
    let header =
        lines.next().transpose().map_err(io(format!("reading {}", tmp.display())))?.unwrap_or_default();
    let write = |path: &Path, rows: u64, lines: &mut dyn Iterator<Item = std::io::Result<String>>| {
        let part = path.with_extension("part.tmp");
        let mut out =
            BufWriter::new(std::fs::File::create(&part).map_err(io(format!("writing {}", part.display())))?);
        writeln!(out, "{header}").map_err(io(format!("writing {}", part.display())))?;
        for line in lines.take(rows as usize) {
            let line = line.map_err(io(format!("reading {}", tmp.display())))?;
            writeln!(out, "{line}").map_err(io(format!("writing {}", part.display())))?;
        }
        out.flush().map_err(io(format!("writing {}", part.display())))?;
        // Renamed into place only when complete: an interrupted run never leaves half a file.
        std::fs::rename(&part, path).map_err(io(format!("renaming to {}", path.display())))
    };
    write(train, config.rows, &mut lines)?;
    if let Some(test) = test {
        write(test, test_rows, &mut lines)?;
    }
    let _ = std::fs::remove_file(&tmp);
    info!(
        positive_rate = format!("{:.3}", summary.positive_rate),
        oracle_auc = format!("{:.4}", summary.oracle_auc),
        "synthetic data ready (the oracle AUC is what the hidden model itself scores)"
    );
    Ok(())
}

/// The training examples of `job`, counted as lines, when that is cheap and exact: local,
/// uncompressed CSV (less each file's header) and libsvm files. `None` otherwise (Parquet,
/// TFRecord, compressed or remote files): progress then shows no total.
pub fn count_examples(job: &JobConfig) -> Option<u64> {
    let config = job.train_reader();
    let files = config.files().ok()?;
    let format = config.format.resolve(files.first().map(|p| p.as_path()));
    let header = match format {
        gradflow_data::Format::Csv => 1,
        gradflow_data::Format::Libsvm => 0,
        _ => return None,
    };
    let mut total = 0u64;
    for file in &files {
        let name = file.to_string_lossy();
        if name.contains("://") || name.ends_with(".gz") || name.ends_with(".zst") {
            return None;
        }
        let mut reader = BufReader::with_capacity(1 << 20, std::fs::File::open(file).ok()?);
        let (mut lines, mut last) = (0u64, b'\n');
        loop {
            let buf = reader.fill_buf().ok()?;
            let Some(&end) = buf.last() else { break };
            lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
            last = end;
            let n = buf.len();
            reader.consume(n);
        }
        // A last line without a newline is a line too.
        lines += u64::from(last != b'\n');
        total += lines.saturating_sub(header);
    }
    Some(total)
}

/// The steps a local sync job will take: `epochs` passes of every worker's share in batches,
/// at most `max_steps`; `None` when unknown (see [`count_examples`]) or for async jobs, whose
/// workers step apart.
pub fn total_steps(job: &JobConfig, examples: Option<u64>) -> Option<u64> {
    if job.mode != gradflow_core::Mode::Sync {
        return None;
    }
    let per_epoch = examples
        .map(|n| n.div_ceil(u64::from(job.workers.max(1))).div_ceil(job.train.batch_size.max(1) as u64));
    match (per_epoch.map(|s| s * job.train.epochs), job.train.max_steps) {
        (Some(t), Some(m)) => Some(t.min(m)),
        (t, m) => t.or(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_data_is_split_into_train_and_test() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "name = \"s\"\n[model]\nkind = \"logistic_regression\"\nnum_dense = 13\n[data]\ntrain = \"{0}/train.csv\"\ntest = \"{0}/test.csv\"\n[data.synth]\ntrain_rows = 300\ntest_rows = 100\n",
            dir.path().display()
        );
        let job = JobConfig::parse(&text).unwrap();
        prepare_data(&job).unwrap();
        let count = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap().lines().count();
        assert_eq!(count("train.csv"), 301);
        assert_eq!(count("test.csv"), 101);
        let train = std::fs::read_to_string(dir.path().join("train.csv")).unwrap();
        let test = std::fs::read_to_string(dir.path().join("test.csv")).unwrap();
        assert_eq!(train.lines().next(), test.lines().next(), "same header");
        assert!(!train.lines().skip(1).any(|l| test.contains(l)), "no row in both");
        // Already there: left alone.
        let before = std::fs::metadata(dir.path().join("train.csv")).unwrap().modified().unwrap();
        prepare_data(&job).unwrap();
        assert_eq!(before, std::fs::metadata(dir.path().join("train.csv")).unwrap().modified().unwrap());
    }

    #[test]
    fn examples_are_counted_for_the_progress_total() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = csv_job(dir.path(), "label,x,y,c", "");
        job.workers = 2;
        // Two files, the second without a newline at its end.
        std::fs::write(dir.path().join("more.csv"), "label,x,y,c\n1,1,1,a\n0,0,0,b\n1,2,2,c").unwrap();
        job.data.train = vec![dir.path().join("train.csv"), dir.path().join("more.csv")];
        assert_eq!(count_examples(&job), Some(5));
        job.train.batch_size = 2;
        job.train.epochs = 3;
        // 5 examples over 2 workers: 3 each at most, 2 batches, 3 epochs.
        assert_eq!(total_steps(&job, Some(5)), Some(6));
        job.train.max_steps = Some(4);
        assert_eq!(total_steps(&job, Some(5)), Some(4));
        assert_eq!(total_steps(&job, None), Some(4));
        job.mode = gradflow_core::Mode::Async;
        assert_eq!(total_steps(&job, Some(5)), None);
        job.data.train = vec![dir.path().join("train.csv.gz")];
        assert_eq!(count_examples(&job), None);
    }

    fn csv_job(dir: &Path, header: &str, extra: &str) -> JobConfig {
        std::fs::write(dir.join("train.csv"), format!("{header}\n1,0.5,0.25,a\n0,0.1,0.2,b\n")).unwrap();
        JobConfig::parse(&format!(
            "name = \"s\"\n[model]\nkind = \"logistic_regression\"\nnum_dense = 2\n{extra}[data]\ntrain = \"{}\"\ncategorical = [\"c\"]\n",
            dir.join("train.csv").display()
        ))
        .unwrap()
    }

    #[test]
    fn data_that_does_not_fit_the_model_is_refused_with_one_message() {
        let dir = tempfile::tempdir().unwrap();
        prepare_data(&csv_job(dir.path(), "label,x,y,c", "")).unwrap();

        let err = prepare_data(&csv_job(dir.path(), "click,x,y,c", "")).unwrap_err();
        assert!(matches!(err, LaunchError::Data(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.starts_with("data: data.train: ") && text.contains("label"), "{text}");

        let err =
            prepare_data(&csv_job(dir.path(), "label,x,y,c", "").clone().with_num_dense(3)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("2 dense feature column(s) (x, y)") && text.contains("model.num_dense is 3"),
            "{text}"
        );

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let mut job = csv_job(dir.path(), "label,x,y,c", "");
        job.data.train = vec![empty.clone()];
        let text = prepare_data(&job).unwrap_err().to_string();
        assert!(text.contains(&empty.display().to_string()) && text.contains("no data files"), "{text}");
    }

    trait WithNumDense {
        fn with_num_dense(self, n: usize) -> JobConfig;
    }

    impl WithNumDense for JobConfig {
        fn with_num_dense(mut self, n: usize) -> JobConfig {
            let text = serde_json::to_value(&self.model).unwrap();
            let mut text = text;
            text["num_dense"] = n.into();
            self.model = Some(serde_json::from_value(text).unwrap());
            self
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let job = JobConfig::parse(
            "name = \"s\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"/nonexistent/x.libsvm\"\nformat = \"libsvm\"\n",
        )
        .unwrap();
        let err = prepare_data(&job).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/x.libsvm"), "{err}");
    }
}
