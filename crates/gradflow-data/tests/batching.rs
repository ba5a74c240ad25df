//! Batches, epochs, the shuffle and standardization, through the reader.

mod common;

use common::{drain, rows_of, write};
use gradflow_data::{Batch, CsvSchema, Epochs, Format, Reader, ReaderConfig, ShardSpec, Standardizer};

/// A libsvm file whose example `i` has label `i % 2` and the single feature `i:1`.
fn numbered(dir: &std::path::Path, n: u64) -> ReaderConfig {
    let text: String = (0..n).map(|i| format!("{} {i}:1\n", i % 2)).collect();
    ReaderConfig::new(Format::Libsvm, vec![write(dir, "n.libsvm", text)])
}

/// The example numbers of each epoch, read in batches of `batch_size`, with the
/// end-of-epoch flags checked on the way.
fn epochs_of(config: &ReaderConfig, batch_size: usize) -> Vec<Vec<u64>> {
    let mut reader = Reader::open(config, ShardSpec::default()).unwrap();
    let mut batch = Batch::new(0);
    let mut epochs: Vec<Vec<u64>> = vec![Vec::new()];
    loop {
        let n = reader.next_batch(&mut batch, batch_size).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(n, batch.len());
        assert!(n <= batch_size);
        assert_eq!(reader.epoch() as usize, epochs.len() - 1);
        epochs.last_mut().unwrap().extend(batch.sparse_ids.iter().copied());
        if reader.end_of_epoch() {
            epochs.push(Vec::new());
        } else {
            assert_eq!(n, batch_size, "only the last batch of an epoch may be short");
        }
    }
    assert!(epochs.pop().unwrap().is_empty(), "the last batch must end its epoch");
    assert!(reader.is_finished());
    assert_eq!(reader.next_batch(&mut batch, batch_size).unwrap(), 0);
    epochs
}

#[test]
fn epochs_and_batch_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = numbered(dir.path(), 10);
    config.epochs = Epochs::Count(3);
    for batch_size in [1, 3, 5, 10, 64] {
        let epochs = epochs_of(&config, batch_size);
        assert_eq!(epochs.len(), 3);
        for e in &epochs {
            assert_eq!(*e, (0..10).collect::<Vec<u64>>(), "batch size {batch_size}");
        }
    }
}

#[test]
fn forever_keeps_going_and_empty_data_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = numbered(dir.path(), 4);
    config.epochs = Epochs::Forever;
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    let mut batch = Batch::new(0);
    let mut ends = 0;
    for i in 0..100 {
        // 4 examples in batches of 3: 3, 1 (end of epoch), 3, 1, ...
        assert_eq!(reader.next_batch(&mut batch, 3).unwrap(), if i % 2 == 0 { 3 } else { 1 });
        assert_eq!(reader.end_of_epoch(), i % 2 == 1);
        if reader.end_of_epoch() {
            ends += 1;
        }
    }
    assert_eq!(ends, 50);
    assert_eq!(reader.epoch(), 49);

    let empty = write(dir.path(), "empty.libsvm", "# nothing\n\n");
    let mut config = ReaderConfig::new(Format::Libsvm, vec![empty]);
    config.epochs = Epochs::Forever;
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    assert_eq!(reader.next_batch(&mut batch, 3).unwrap(), 0);
}

#[test]
fn shuffle_is_a_seeded_permutation_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = numbered(dir.path(), 500);
    config.epochs = Epochs::Count(2);
    config.shuffle_buffer = 64;
    config.seed = 11;
    let a = epochs_of(&config, 32);
    let b = epochs_of(&config, 17);
    // Same seed and epoch: same order, whatever the batch size.
    assert_eq!(a, b);
    for e in &a {
        let mut sorted = e.clone();
        sorted.sort();
        assert_eq!(sorted, (0..500).collect::<Vec<u64>>());
        assert_ne!(*e, sorted, "a shuffled epoch should not be in file order");
    }
    assert_ne!(a[0], a[1], "epochs must differ");
    config.seed = 12;
    assert_ne!(epochs_of(&config, 32)[0], a[0], "seeds must differ");
}

#[test]
fn no_shuffle_for_buffer_zero_or_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = numbered(dir.path(), 50);
    config.epochs = Epochs::Count(2);
    for k in [0, 1] {
        config.shuffle_buffer = k;
        for e in epochs_of(&config, 8) {
            assert_eq!(e, (0..50).collect::<Vec<u64>>());
        }
    }
}

#[test]
fn shuffle_mixes_pieces_of_several_files() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..5)
        .map(|f| {
            let text: String = (0..20).map(|i| format!("1 {}:1\n", f * 100 + i)).collect();
            write(dir.path(), &format!("f{f}"), text)
        })
        .collect();
    let mut config = ReaderConfig::new(Format::Libsvm, paths);
    config.shuffle_buffer = 4;
    config.epochs = Epochs::Count(4);
    let epochs = epochs_of(&config, 10);
    let first_files: Vec<u64> =
        epochs.iter().map(|e| e[..4].iter().map(|id| id / 100).min().unwrap()).collect();
    assert!(first_files.iter().any(|&f| f != 0), "file order should be shuffled: {first_files:?}");
}

#[test]
fn batch_is_refilled_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let text = "label,a,c\n1,0.5,x\n0,1.5,y\n1,2.5,x\n";
    let mut config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "b.csv", text)]);
    config.csv = CsvSchema::new("label", vec!["c".into()]);
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    // A batch made for another shape is reset to the reader's.
    let mut batch = Batch::new(7);
    assert_eq!(reader.next_batch(&mut batch, 2).unwrap(), 2);
    assert_eq!(batch.num_dense, 1);
    assert_eq!(batch.labels, vec![1.0, 0.0]);
    assert_eq!(batch.dense, vec![0.5, 1.5]);
    assert_eq!(batch.sparse_offsets, vec![0, 1, 2]);
    assert_eq!(batch.sparse_fields, vec![0, 0]);
    assert_eq!(batch.sparse_values, vec![1.0, 1.0]);
    assert_eq!(batch.sparse_ids[0], gradflow_data::categorical_id(0, b"x"));
    assert_eq!(reader.next_batch(&mut batch, 2).unwrap(), 1);
    assert_eq!(rows_of(&batch).len(), 1);
    assert_eq!(batch.sparse_offsets, vec![0, 1]);
    assert!(reader.end_of_epoch());
}

#[test]
fn standardizer_on_breast_cancer() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/breast_cancer.csv");
    let config = ReaderConfig::new(Format::Csv, vec![path]);
    // Fit per worker and merge, as a distributed job would.
    let mut merged = Standardizer::new(30);
    for w in 0..3 {
        let mut reader = Reader::open(&config, ShardSpec::new(w, 3).unwrap()).unwrap();
        let mut s = Standardizer::new(reader.num_dense());
        let mut batch = Batch::new(0);
        while reader.next_batch(&mut batch, 50).unwrap() > 0 {
            s.observe(&batch);
        }
        merged.merge(&s);
    }
    assert_eq!(merged.count(), 569);
    // Known mean of mean_area in this data set.
    assert!((merged.mean()[3] - 654.889).abs() < 1e-2, "{}", merged.mean()[3]);
    let mut reader = Reader::open(&config, ShardSpec::default()).unwrap();
    let mut batch = Batch::new(0);
    reader.next_batch(&mut batch, 1000).unwrap();
    merged.apply(&mut batch);
    let after = Standardizer::fit(30, [&batch]);
    for j in 0..30 {
        assert!(after.mean()[j].abs() < 1e-4, "feature {j} mean {}", after.mean()[j]);
        assert!((after.std()[j] - 1.0).abs() < 1e-4, "feature {j} std {}", after.std()[j]);
    }
    let _ = drain(&mut reader, 10).unwrap();
}
