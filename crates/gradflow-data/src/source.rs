//! Byte streams of data files: where a file's bytes come from and whether they are compressed.
//!
//! Every reader in this crate gets its bytes through `open_stream`: a local file read
//! through a buffer or an object read by ranged reads ([`crate::remote`]), or, for a gzip
//! (`.gz`) or zstd (`.zst`, `.zstd`) file, its decompressed bytes. A compressed file cannot be entered in the middle, so it is not cut into byte
//! ranges: it is read whole by one worker ([`Compression::splittable`]).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::remote::{Location, Stores};

/// How a data file's bytes are compressed, as its last extension says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain bytes.
    None,
    /// gzip (`.gz`); files of several gzip members (as `cat a.gz b.gz` makes) are read whole.
    Gzip,
    /// zstd (`.zst` or `.zstd`).
    Zstd,
}

impl Compression {
    /// The compression of `path`, from its extension (case-insensitive).
    pub fn of(path: &Path) -> Compression {
        match extension(path).as_deref() {
            Some("gz") => Compression::Gzip,
            Some("zst" | "zstd") => Compression::Zstd,
            _ => Compression::None,
        }
    }

    /// Whether the file can be cut into byte ranges read independently: only plain bytes can.
    pub fn splittable(self) -> bool {
        self == Compression::None
    }
}

/// The lowercase last extension of `path`, if it has one.
pub(crate) fn extension(path: &Path) -> Option<String> {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase())
}

/// The name of `path` without its compression extension (`a.csv.gz` gives `a.csv`), for the
/// extension that names the format.
pub(crate) fn without_compression(path: &Path) -> &Path {
    match Compression::of(path) {
        Compression::None => path,
        _ => path.file_stem().map(Path::new).unwrap_or(path),
    }
}

/// The (decompressed) bytes of `path` (a local path or a URL) from byte `offset` on, read
/// through a buffer of `buffer_bytes`. In a compressed file `offset` counts decompressed bytes,
/// and reaching it means decompressing everything before it. For a remote file, reads are made
/// ahead of the reader up to byte `soft_end` (the end of the piece being read).
pub(crate) fn open_stream(
    path: &Path,
    offset: u64,
    soft_end: u64,
    buffer_bytes: usize,
    stores: &Stores,
) -> io::Result<Box<dyn BufRead + Send>> {
    let buffer_bytes = buffer_bytes.max(1);
    let compression = Compression::of(path);
    let raw: Box<dyn Read + Send> = match stores.locate(path).map_err(io::Error::other)? {
        Location::Local(local) => {
            let file = File::open(&local)?;
            if compression == Compression::None {
                let mut reader = BufReader::with_capacity(buffer_bytes, file);
                reader.seek(SeekFrom::Start(offset))?;
                return Ok(Box::new(reader));
            }
            Box::new(BufReader::with_capacity(64 * 1024, file))
        }
        Location::Remote(remote) => {
            let size = remote.size().map_err(|e| match e {
                crate::DataError::NotFound { what, .. } => io::Error::new(io::ErrorKind::NotFound, what),
                crate::DataError::Store { cause, .. } => io::Error::other(cause.to_string()),
                e => io::Error::other(e.to_string()),
            })?;
            if compression == Compression::None {
                return Ok(Box::new(remote.open(offset, size, soft_end, stores.remote())));
            }
            Box::new(remote.open(0, size, size, stores.remote()))
        }
    };
    let mut stream: Box<dyn BufRead + Send> = match compression {
        Compression::None => unreachable!("plain streams are returned above"),
        Compression::Gzip => {
            Box::new(BufReader::with_capacity(buffer_bytes, flate2::read::MultiGzDecoder::new(raw)))
        }
        Compression::Zstd => {
            Box::new(BufReader::with_capacity(buffer_bytes, zstd::stream::read::Decoder::new(raw)?))
        }
    };
    skip(&mut stream, offset)?;
    Ok(stream)
}

/// Reads and drops `count` bytes (fewer at the end of the stream).
pub(crate) fn skip(stream: &mut dyn BufRead, count: u64) -> io::Result<()> {
    io::copy(&mut stream.take(count), &mut io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn compression_from_the_extension() {
        assert_eq!(Compression::of(Path::new("a.csv.gz")), Compression::Gzip);
        assert_eq!(Compression::of(Path::new("a.libsvm.ZST")), Compression::Zstd);
        assert_eq!(Compression::of(Path::new("a.zstd")), Compression::Zstd);
        assert_eq!(Compression::of(Path::new("a.csv")), Compression::None);
        assert_eq!(Compression::of(Path::new("gz")), Compression::None);
        assert_eq!(without_compression(Path::new("d/a.csv.gz")), Path::new("a.csv"));
        assert_eq!(without_compression(Path::new("d/a.csv")), Path::new("d/a.csv"));
    }

    #[test]
    fn streams_from_an_offset_plain_and_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"hello\nworld\n";
        let plain = dir.path().join("a.txt");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.path().join("a.txt.gz");
        let mut e = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
        e.write_all(text).unwrap();
        e.finish().unwrap();
        let zst = dir.path().join("a.txt.zst");
        std::fs::write(&zst, zstd::encode_all(&text[..], 3).unwrap()).unwrap();
        for path in [&plain, &gz, &zst] {
            let mut s = String::new();
            open_stream(path, 6, u64::MAX, 4, &Stores::default()).unwrap().read_to_string(&mut s).unwrap();
            assert_eq!(s, "world\n", "{}", path.display());
        }
    }
}
