//! Synthetic data: determinism, shape, label statistics, and the oracle AUC.

mod common;

use gradflow_data::synth::{self, SynthConfig, SynthModel, oracle, write_synth};
use gradflow_data::{Batch, Format, Reader, ReaderConfig, ShardSpec, metrics};

fn small(rows: u64, seed: u64) -> SynthConfig {
    SynthConfig { rows, seed, ..SynthConfig::default() }
}

#[test]
fn deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a.csv"), dir.path().join("b.csv"), dir.path().join("c.csv"));
    let sa = write_synth(&small(2000, 5), &a).unwrap();
    let sb = write_synth(&small(2000, 5), &b).unwrap();
    write_synth(&small(2000, 6), &c).unwrap();
    let (ta, tb, tc) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(ta, tb);
    assert_eq!(sa, sb);
    assert_ne!(ta, tc);
    // Row i depends on (seed, i) only: a longer file starts with the shorter one.
    let d = dir.path().join("d.csv");
    write_synth(&small(3000, 5), &d).unwrap();
    assert!(std::fs::read(&d).unwrap().starts_with(&ta));
}

#[test]
fn header_and_row_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.csv");
    let config = small(500, 1);
    write_synth(&config, &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let want: Vec<String> = std::iter::once("label".to_string())
        .chain((0..13).map(|i| format!("d{i}")))
        .chain((0..26).map(|i| format!("c{i}")))
        .collect();
    assert_eq!(header, want.join(","));
    assert_eq!(header, synth::header(&config));
    let mut rows = 0;
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 40);
        assert!(cells[0] == "0" || cells[0] == "1");
        for c in &cells[1..14] {
            c.parse::<f32>().unwrap();
        }
        for c in &cells[14..] {
            assert!(c.parse::<u32>().unwrap() < config.vocab_per_field);
        }
        rows += 1;
    }
    assert_eq!(rows, 500);
}

#[test]
fn reader_reads_synthetic_files_with_their_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.csv");
    let config = SynthConfig { rows: 300, num_dense: 3, num_categorical: 4, ..SynthConfig::default() };
    let summary = write_synth(&config, &path).unwrap();
    let mut rc = ReaderConfig::new(Format::Csv, vec![path]);
    rc.csv = config.schema();
    let mut reader = Reader::open(&rc, ShardSpec::default()).unwrap();
    assert_eq!(reader.num_dense(), 3);
    assert_eq!(reader.categorical_names(), ["c0", "c1", "c2", "c3"]);
    let mut batch = Batch::new(0);
    let mut positives = 0;
    let mut rows = 0;
    while reader.next_batch(&mut batch, 64).unwrap() > 0 {
        rows += batch.len();
        positives += batch.labels.iter().filter(|&&y| y == 1.0).count() as u64;
        for i in 0..batch.len() {
            let fields: Vec<u32> = batch.sparse_range(i).map(|k| batch.sparse_fields[k]).collect();
            assert_eq!(fields, vec![0, 1, 2, 3]);
        }
    }
    assert_eq!(rows, 300);
    assert_eq!(positives, summary.positives);
}

#[test]
fn default_config_label_statistics_and_oracle() {
    let config = small(100_000, 0);
    let s = oracle(&config).unwrap();
    assert_eq!(s.rows, 100_000);
    assert!((0.23..0.27).contains(&s.positive_rate), "positive rate {}", s.positive_rate);
    assert!((0.77..0.83).contains(&s.oracle_auc), "oracle AUC {}", s.oracle_auc);
    // Other seeds stay in range too.
    for seed in 1..3 {
        let s = oracle(&small(30_000, seed)).unwrap();
        assert!((0.22..0.28).contains(&s.positive_rate), "seed {seed}: positive rate {}", s.positive_rate);
        assert!((0.76..0.84).contains(&s.oracle_auc), "seed {seed}: oracle AUC {}", s.oracle_auc);
    }
}

#[test]
fn oracle_matches_the_hidden_model_applied_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.csv");
    let config = small(20_000, 3);
    let summary = write_synth(&config, &path).unwrap();
    assert_eq!(summary, oracle(&config).unwrap());
    let model = SynthModel::new(&config).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let (mut labels, mut scores) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let dense: Vec<f32> = cells[1..14].iter().map(|c| c.parse().unwrap()).collect();
        let cats: Vec<u32> = cells[14..].iter().map(|c| c.parse().unwrap()).collect();
        labels.push(cells[0].parse::<f32>().unwrap());
        scores.push(model.logit(&dense, &cats) as f32);
    }
    let exact = metrics::auc(&labels, &scores);
    assert!((exact - summary.oracle_auc).abs() < 1e-3, "{exact} vs {}", summary.oracle_auc);
    let probs: Vec<f32> = scores.iter().map(|&z| metrics::sigmoid(z)).collect();
    assert!((metrics::log_loss(&labels, &probs) - summary.oracle_log_loss).abs() < 1e-3);
}

#[test]
fn calibration_follows_the_config() {
    let s = oracle(&SynthConfig { rows: 30_000, positive_rate: 0.1, ..SynthConfig::default() }).unwrap();
    assert!((0.08..0.12).contains(&s.positive_rate), "{}", s.positive_rate);
    let weak = oracle(&SynthConfig { rows: 30_000, logit_std: 0.5, ..SynthConfig::default() }).unwrap();
    let strong = oracle(&SynthConfig { rows: 30_000, logit_std: 3.0, ..SynthConfig::default() }).unwrap();
    assert!(weak.oracle_auc < 0.7 && strong.oracle_auc > 0.88, "{} {}", weak.oracle_auc, strong.oracle_auc);
    // Few columns: parts that cannot exist give their share to the others.
    let tiny = SynthConfig { rows: 5000, num_dense: 1, num_categorical: 0, ..SynthConfig::default() };
    assert!(oracle(&tiny).unwrap().oracle_auc > 0.7);
}

#[test]
fn bad_configs_are_refused() {
    for c in [
        SynthConfig { num_dense: 0, num_categorical: 0, ..SynthConfig::default() },
        SynthConfig { vocab_per_field: 0, ..SynthConfig::default() },
        SynthConfig { positive_rate: 1.0, ..SynthConfig::default() },
        SynthConfig { logit_std: f64::NAN, ..SynthConfig::default() },
    ] {
        assert!(oracle(&c).is_err());
    }
    let c: SynthConfig = serde_json::from_str(r#"{"rows": 10, "seed": 4}"#).unwrap();
    assert_eq!(c.num_categorical, 26);
    assert!(serde_json::from_str::<SynthConfig>(r#"{"row": 10}"#).is_err());
}
