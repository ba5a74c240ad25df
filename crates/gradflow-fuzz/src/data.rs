//! Training data files: CSV with a header row and libsvm, read by every worker.

use gradflow_data::{Batch, DataError, Format, Reader, ReaderConfig, ShardSpec};

/// One example, bit for bit: label, dense features, sparse (field, id, value).
type Row = (u32, Vec<u32>, Vec<(u32, u64, u32)>);

/// What one reader read: its examples and the lines it skipped, or its error.
type Read = Result<(Vec<Row>, u64), DataError>;

/// Byte 0 picks the format (bit 0: CSV, else libsvm), the number of workers (bits 1-2: 1 to 4),
/// whether malformed lines are skipped (bit 3) and the read buffer (bits 4-7: 1 to 46 bytes,
/// so lines straddle buffer refills); the rest is the file. CSV files have columns `label`,
/// `c` (categorical) and any others (dense).
///
/// Every example read has finite values and the dense width the reader promises. Byte-range
/// sharding must neither lose nor repeat a line: the workers' examples, in worker order, are
/// the single reader's, and they skip the same number of lines. A refused line is reported
/// with a line number inside the file.
pub fn data_lines(data: &[u8]) {
    let Some((&flags, file)) = data.split_first() else { return };
    let csv = flags & 1 == 1;
    let workers = 1 + usize::from((flags >> 1) & 3);
    let skip = flags & 8 != 0;
    let buffer_bytes = 1 + usize::from(flags >> 4) * 3;

    let path = crate::scratch_dir().join(if csv { "data.csv" } else { "data.svm" });
    std::fs::write(&path, file).expect("writing the scratch file");
    let mut config = ReaderConfig::new(if csv { Format::Csv } else { Format::Libsvm }, vec![path]);
    config.csv.categorical = vec!["c".into()];
    config.skip_malformed = skip;
    config.buffer_bytes = buffer_bytes;

    let lines = file.split(|&b| b == b'\n').count() as u64;
    let whole = read(&config, 0, 1);
    if let Err(e) = &whole {
        check_refusal(e, lines);
    }
    let mut rows = Vec::new();
    let mut skipped = 0;
    let mut failed = false;
    for w in 0..workers {
        match read(&config, w, workers) {
            Ok((r, s)) => {
                rows.extend(r);
                skipped += s;
            }
            Err(e) => {
                check_refusal(&e, lines);
                failed = true;
            }
        }
    }
    match (whole, failed) {
        (Ok((all, all_skipped)), false) => {
            assert_eq!(rows, all, "{workers} workers read every example once, in order");
            assert_eq!(skipped, all_skipped, "{workers} workers skip the same lines");
        }
        (Ok(_), true) => panic!("a worker refused a file that one reader reads whole"),
        (Err(_), false) => {
            panic!("a file one reader refuses must be refused by the worker with the bad line")
        }
        (Err(_), true) => {}
    }
}

fn read(config: &ReaderConfig, worker: usize, workers: usize) -> Read {
    let mut reader = Reader::open(config, ShardSpec::new(worker, workers).expect("a valid shard"))?;
    let num_dense = reader.num_dense();
    let mut batch = Batch::new(num_dense);
    let mut rows = Vec::new();
    while reader.next_batch(&mut batch, 7)? > 0 {
        assert_eq!(batch.dense.len(), batch.len() * num_dense, "dense width");
        for i in 0..batch.len() {
            let label = batch.labels[i];
            assert!(label.is_finite(), "labels are finite");
            let dense = batch.dense_row(i);
            assert!(dense.iter().all(|v| v.is_finite()), "dense values are finite");
            let sparse: Vec<(u32, u64, u32)> = batch
                .sparse_range(i)
                .map(|j| (batch.sparse_fields[j], batch.sparse_ids[j], batch.sparse_values[j].to_bits()))
                .collect();
            assert!(
                batch.sparse_range(i).all(|j| batch.sparse_values[j].is_finite()),
                "sparse values are finite"
            );
            rows.push((label.to_bits(), dense.iter().map(|v| v.to_bits()).collect(), sparse));
        }
    }
    Ok((rows, reader.skipped()))
}

/// A refused file names a line that exists.
fn check_refusal(e: &DataError, lines: u64) {
    match e {
        DataError::Parse { line, .. } => {
            assert!((1..=lines.max(1)).contains(line), "line {line} of {lines}: {e}")
        }
        other => panic!("a bad data file is a parse error naming the line, not {other:?}"),
    }
}

pub(crate) fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let csv =
        "label,d0,c,d1\n1,0.5,red,2\n0,-1.25,\"blue, dark\",3e2\n1,7,,0\n-1,1e-3,\"say \"\"hi\"\"\",4\r\n";
    let svm = "+1 3:0.5 18446744073709551615:2 # tail\n-1 1:1\n\n# only a comment\n0.25 7:1e-2\t9:3\n";
    let bad_csv = "label,c,d0\n1,x,oops\n0,y,1\n";
    let bad_svm = "1 1:1\n1 a:1\nnan 2:1\n1 2:inf\n";
    let mut out = Vec::new();
    // flags: CSV bit, workers - 1 in bits 1-2, skip bit, buffer code in bits 4-7.
    for (name, flags, file) in [
        ("csv-3-workers", 0x01 | (2 << 1) | 0x30, csv),
        ("csv-skip-tiny-buffer", 0x01 | (1 << 1) | 0x08, bad_csv),
        ("libsvm-2-workers", 1 << 1, svm),
        ("libsvm-skip-4-workers", (3 << 1) | 0x08 | 0x20, bad_svm),
        ("csv-strict", 0x01 | 0xf0, bad_csv),
    ] {
        let mut b = vec![flags];
        b.extend_from_slice(file.as_bytes());
        out.push(("data_lines", format!("seed-{name}"), b));
    }
    out
}
