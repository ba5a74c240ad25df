//! Reading the lines of one byte range of a file, the building block of sharding.
//!
//! A line belongs to the range that holds its first byte. A reader over `start..end` therefore
//! skips the line in progress at `start` (it belongs to an earlier range) unless `start` is
//! itself a line start, then yields every line that starts before `end`, reading past `end`
//! to finish the last one. Splitting a file into any set of adjacent ranges thus yields every
//! line of the file exactly once, wherever the cuts fall.
//!
//! Line numbers are not tracked: counting them would cost on every line, and they are only
//! needed for error messages. [`line_number_at`] recounts from the file start when one is.
//!
//! Offsets are those of the bytes the lines are read from: for a compressed file, offsets
//! in its decompressed bytes (see [`crate::source`]).

use std::io::{self, BufRead, Read};
use std::ops::Range;
use std::path::Path;

use crate::remote::Stores;
use crate::source::open_stream;

/// Buffer size used when none is configured: large enough to amortize system calls, small
/// enough that many open shards stay cheap.
pub const DEFAULT_BUFFER_BYTES: usize = 256 * 1024;

/// The lines whose first byte lies in a byte range of a file, read through a fixed buffer.
///
/// Lines are returned without their terminator (`\n`, or `\r\n`). The whole file is never
/// held in memory: only the buffer and the longest line seen.
pub struct RangeLines {
    reader: Box<dyn BufRead + Send>,
    /// File offset of the next byte `reader` will return.
    pos: u64,
    end: u64,
    line: Vec<u8>,
}

impl std::fmt::Debug for RangeLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeLines").field("pos", &self.pos).field("end", &self.end).finish_non_exhaustive()
    }
}

impl RangeLines {
    /// Opens `path` for the lines starting in `range`, reading through a buffer of
    /// `buffer_bytes` (at least 1) bytes. A range past the end of the file yields no lines.
    pub fn open(path: &Path, range: Range<u64>, buffer_bytes: usize) -> io::Result<RangeLines> {
        let end = range.end;
        RangeLines::from_stream(
            |offset| open_stream(path, offset, end, buffer_bytes, &Stores::default()),
            range,
        )
    }

    /// No lines at all (a piece another reader reads).
    pub(crate) fn empty() -> RangeLines {
        RangeLines { reader: Box::new(io::empty()), pos: 0, end: 0, line: Vec::new() }
    }

    /// The lines starting in `range` of the bytes `open(offset)` streams from `offset` on.
    pub(crate) fn from_stream(
        open: impl FnOnce(u64) -> io::Result<Box<dyn BufRead + Send>>,
        range: Range<u64>,
    ) -> io::Result<RangeLines> {
        let mut pos = range.start;
        let reader = if range.start > 0 && range.start < range.end {
            // Start one byte early: if that byte is a newline, `start` begins a line and
            // nothing is skipped; otherwise everything up to the next newline belongs to the
            // line that started in an earlier range.
            let mut reader = open(range.start - 1)?;
            let skipped = reader.skip_until(b'\n')?;
            pos = range.start - 1 + skipped as u64;
            reader
        } else if range.start > 0 {
            // Empty range: no line can start in it, so there is nothing to position at.
            pos = range.end;
            Box::new(io::empty())
        } else {
            open(0)?
        };
        Ok(RangeLines { reader, pos, end: range.end, line: Vec::new() })
    }

    /// The next line: its offset in the file and its bytes without the terminator, or `None`
    /// when no more lines start in the range.
    pub fn next_line(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Ok(None);
        }
        let start = self.pos;
        self.pos += n as u64;
        let mut text = &self.line[..];
        if let [rest @ .., b'\n'] = text {
            text = rest;
        }
        if let [rest @ .., b'\r'] = text {
            text = rest;
        }
        Ok(Some((start, text)))
    }

    /// File offset just past the last line returned (or where reading will resume).
    pub fn position(&self) -> u64 {
        self.pos
    }
}

/// The 1-based number of the line that starts at byte `offset` of `path` (or holds it):
/// one plus the number of newlines before `offset`.
///
/// Reads the file from its start, so it is meant for error messages, not for every line.
pub fn line_number_at(path: &Path, offset: u64) -> io::Result<u64> {
    line_number_in(open_stream(path, 0, offset, 64 * 1024, &Stores::default())?, offset)
}

/// [`line_number_at`] in the bytes `stream` holds from the file start.
pub(crate) fn line_number_in(stream: impl Read, offset: u64) -> io::Result<u64> {
    let mut file = stream.take(offset);
    let mut buf = vec![0u8; 64 * 1024];
    let mut newlines = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        newlines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    Ok(newlines + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines_of(path: &Path, range: Range<u64>, buf: usize) -> Vec<(u64, String)> {
        let mut r = RangeLines::open(path, range, buf).unwrap();
        let mut out = Vec::new();
        while let Some((off, l)) = r.next_line().unwrap() {
            out.push((off, String::from_utf8(l.to_vec()).unwrap()));
        }
        out
    }

    #[test]
    fn boundaries() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"ab\ncd\r\n\nef").unwrap();
        let p = f.path();
        // Offsets: "ab"@0, "cd"@3, ""@7, "ef"@8.
        assert_eq!(
            lines_of(p, 0..11, 2),
            vec![(0, "ab".into()), (3, "cd".into()), (7, "".into()), (8, "ef".into())]
        );
        assert_eq!(lines_of(p, 0..1, 2), vec![(0, "ab".into())]);
        assert_eq!(lines_of(p, 1..3, 2), vec![]);
        assert_eq!(lines_of(p, 1..4, 2), vec![(3, "cd".into())]);
        assert_eq!(lines_of(p, 3..4, 2), vec![(3, "cd".into())]);
        assert_eq!(lines_of(p, 4..8, 2), vec![(7, "".into())]);
        assert_eq!(lines_of(p, 8..11, 2), vec![(8, "ef".into())]);
        assert_eq!(lines_of(p, 9..11, 2), vec![]);
        assert_eq!(lines_of(p, 11..20, 2), vec![]);
        assert_eq!(lines_of(p, 5..5, 2), vec![]);
    }

    #[test]
    fn line_numbers() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"ab\ncd\r\n\nef").unwrap();
        assert_eq!(line_number_at(f.path(), 0).unwrap(), 1);
        assert_eq!(line_number_at(f.path(), 3).unwrap(), 2);
        assert_eq!(line_number_at(f.path(), 7).unwrap(), 3);
        assert_eq!(line_number_at(f.path(), 8).unwrap(), 4);
    }
}
