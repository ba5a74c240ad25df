//! Sharding: whatever the cuts, every line (and so every example) is read exactly once.

mod common;

use std::ops::Range;

use common::{Row, read_shard, write};
use gradflow_data::lines::RangeLines;
use gradflow_data::{CsvSchema, FilePiece, Format, Reader, ReaderConfig, categorical_id, split_ranges};
use proptest::prelude::*;

/// The lines of `bytes` with their offsets, by the definition: a line starts at 0 and after
/// every newline (but not at the end of the file), and ends before `\n` or `\r\n`.
fn naive_lines(bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |k| start + k);
        let mut line = &bytes[start..end];
        if end < bytes.len() || line.last() == Some(&b'\r') {
            line = line.strip_suffix(b"\r").unwrap_or(line);
        }
        out.push((start as u64, line.to_vec()));
        start = end + 1;
    }
    out
}

fn range_lines(path: &std::path::Path, range: Range<u64>, buffer: usize) -> Vec<(u64, Vec<u8>)> {
    let mut r = RangeLines::open(path, range, buffer).unwrap();
    let mut out = Vec::new();
    while let Some((off, line)) = r.next_line().unwrap() {
        out.push((off, line.to_vec()));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Arbitrary bytes (dense in newlines and carriage returns) cut at arbitrary points: the
    /// concatenation of the ranges' lines is the file's lines, in order.
    #[test]
    fn any_cuts_partition_the_lines(
        bytes in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'\n'), Just(b'\r')], 0..200),
        cuts in proptest::collection::vec(any::<u16>(), 0..8),
        buffer in 1usize..16,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "f", &bytes);
        let len = bytes.len() as u64;
        let mut points: Vec<u64> = cuts.iter().map(|&c| c as u64 % (len + 1)).collect();
        points.push(0);
        points.push(len);
        points.sort();
        let mut got = Vec::new();
        for w in points.windows(2) {
            got.extend(range_lines(&path, w[0]..w[1], buffer));
        }
        prop_assert_eq!(got, naive_lines(&bytes));
    }
}

/// A libsvm file from `examples` (label, ids), each line ended by `\n` or `\r\n` at random,
/// with blank and comment lines mixed in, and optionally no final newline.
fn libsvm_text(
    examples: &[(bool, Vec<u64>)],
    crlf: &[bool],
    blank_every: usize,
    final_newline: bool,
) -> String {
    let mut text = String::new();
    for (i, (label, ids)) in examples.iter().enumerate() {
        if blank_every > 0 && i % blank_every == 0 {
            text.push_str(if i % 2 == 0 { "\n" } else { "# comment only\r\n" });
        }
        text.push_str(if *label { "+1" } else { "-1" });
        for id in ids {
            text.push_str(&format!(" {id}:{}", *id as f32 / 8.0));
        }
        if i % 3 == 0 {
            text.push_str(" # trailing");
        }
        let last = i + 1 == examples.len();
        if !last || final_newline {
            text.push_str(if crlf[i % crlf.len()] { "\r\n" } else { "\n" });
        }
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]

    /// Every worker count from 1 to 7: the union of the workers' examples is the file's.
    #[test]
    fn libsvm_workers_read_each_example_once(
        examples in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(0u64..1_000_000, 0..6)), 0..60),
        crlf in proptest::collection::vec(any::<bool>(), 1..5),
        blank_every in 0usize..5,
        final_newline in any::<bool>(),
        workers in 1usize..8,
        buffer in 1usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let text = libsvm_text(&examples, &crlf, blank_every, final_newline);
        let mut config = ReaderConfig::new(Format::Libsvm, vec![write(dir.path(), "d.libsvm", &text)]);
        config.buffer_bytes = buffer;
        let mut got = Vec::new();
        for w in 0..workers {
            got.extend(read_shard(&config, w, workers).unwrap());
        }
        let mut want: Vec<Row> = examples
            .iter()
            .map(|(label, ids)| {
                let sparse: Vec<(u32, u64, f32)> = ids.iter().map(|&id| (0, id, id as f32 / 8.0)).collect();
                Row::new(if *label { 1.0 } else { 0.0 }, &[], &sparse)
            })
            .collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
    }

    /// The same for CSV with a header, which every shard reads but none yields.
    #[test]
    fn csv_workers_read_each_example_once(
        examples in proptest::collection::vec((0u8..2, -1000i32..1000, "[a-z]{0,3}"), 0..60),
        crlf in any::<bool>(),
        final_newline in any::<bool>(),
        workers in 1usize..8,
        buffer in 1usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("x,label,cat{eol}");
        for (i, (label, x, cat)) in examples.iter().enumerate() {
            text.push_str(&format!("{},{label},{cat}", *x as f32 / 4.0));
            if i + 1 < examples.len() || final_newline {
                text.push_str(eol);
            }
        }
        let mut config = ReaderConfig::new(Format::Csv, vec![write(dir.path(), "d.csv", &text)]);
        config.csv = CsvSchema::new("label", vec!["cat".into()]);
        config.buffer_bytes = buffer;
        let mut got = Vec::new();
        for w in 0..workers {
            got.extend(read_shard(&config, w, workers).unwrap());
        }
        let mut want: Vec<Row> = examples
            .iter()
            .map(|(label, x, cat)| {
                Row::new(*label as f32, &[*x as f32 / 4.0], &[(0, categorical_id(0, cat.as_bytes()), 1.0)])
            })
            .collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn several_files_split_among_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    let mut want = Vec::new();
    for f in 0..4u64 {
        let mut text = String::new();
        // File 3 is empty: sharding must cope with it.
        for i in 0..(f * 37 % 100) {
            let id = f * 1000 + i;
            text.push_str(&format!("1 {id}:1\n"));
            want.push(id);
        }
        paths.push(write(dir.path(), &format!("part-{f}"), text));
    }
    let config = ReaderConfig::new(Format::Libsvm, paths);
    for workers in 1..8 {
        let mut got: Vec<u64> = (0..workers)
            .flat_map(|w| read_shard(&config, w, workers).unwrap())
            .map(|r| r.sparse[0].1)
            .collect();
        got.sort();
        assert_eq!(got, want, "{workers} workers");
    }
}

#[test]
fn explicit_pieces_cover_the_file_like_dynamic_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("label,x\n");
    for i in 0..1000 {
        text.push_str(&format!("{},{i}\n", i % 2));
    }
    let path = write(dir.path(), "t.csv", &text);
    let config = ReaderConfig::new(Format::Csv, vec![path.clone()]);
    // Many more tasks than workers, read one reader per task.
    let mut xs = Vec::new();
    for range in split_ranges(text.len() as u64, 37) {
        let mut reader = Reader::from_pieces(&config, vec![FilePiece { path: path.clone(), range }]).unwrap();
        xs.extend(
            common::drain(&mut reader, 10).unwrap().into_iter().map(|r| f32::from_bits(r.dense[0]) as u32),
        );
    }
    xs.sort();
    assert_eq!(xs, (0..1000).collect::<Vec<_>>());
    let mut whole = Reader::from_pieces(&config, vec![FilePiece::whole(&path)]).unwrap();
    assert_eq!(common::drain(&mut whole, 64).unwrap().len(), 1000);
}
