//! The reader: files → this worker's byte ranges → lines → examples → shuffle → batches.
//!
//! Everything streams. Memory is one read buffer, the longest line, and the shuffle buffer's
//! examples; a file larger than memory is read like any other. In the steady state filling a
//! batch allocates nothing: lines are read into a reused buffer, fields are parsed from slices
//! of it, and examples are parsed into reused shuffle slots and copied into the caller's
//! [`Batch`], whose vectors keep their capacity.
//!
//! Batches never straddle an epoch: the last batch of an epoch may be short, and
//! [`Reader::end_of_epoch`] says when a batch was the last of its epoch.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::batch::Batch;
use crate::csv::{CsvLayout, CsvSchema, header_names};
use crate::error::{DataError, Result};
use crate::example::{Example, Issue, Labels, SHOWN_BYTES, utf8};
use crate::libsvm::{self, LibsvmOptions};
use crate::lines::{DEFAULT_BUFFER_BYTES, RangeLines, line_number_in};
use crate::parquet::ParquetRows;
use crate::tfrecord::TfRows;

/// The rows of a file read by record rather than by line.
#[derive(Debug)]
enum Records {
    Parquet(ParquetRows),
    Tf(TfRows),
}

impl Records {
    fn next_example(&mut self, ex: &mut Example) -> Result<Option<std::result::Result<(), Issue>>> {
        match self {
            Records::Parquet(r) => r.next_example(ex),
            Records::Tf(r) => r.next_example(ex),
        }
    }

    fn row_number(&self) -> u64 {
        match self {
            Records::Parquet(r) => r.row_number(),
            Records::Tf(r) => r.row_number(),
        }
    }
}
use crate::remote::{Location, RemoteOptions, Stores, glob_matches, has_glob};
use crate::rng::derive_seed;
use crate::shard::{FilePiece, ShardSpec};
use crate::shuffle::ShuffleBuffer;
use crate::source::{Compression, extension, open_stream, without_compression};

/// The format of the data files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// From the first file's extension (after a compression extension such as `.gz`):
    /// see [`Format::of_path`]; CSV when the extension names no format.
    #[default]
    Auto,
    /// `label index:value ...` lines, or `label field:id:value ...`; see [`crate::libsvm`].
    Libsvm,
    /// CSV with a header row; see [`crate::csv`].
    Csv,
    /// Parquet, columns chosen by name as for CSV; see [`crate::parquet`].
    Parquet,
    /// TFRecord of `tf.Example`, features chosen by name as CSV columns; see [`crate::tfrecord`].
    Tfrecord,
}

impl Format {
    /// The format `path`'s extension names, looking past a compression extension:
    /// `.csv` is CSV; `.libsvm`, `.svm`, `.libffm` and `.ffm` are libsvm; `.parquet`, `.parq`
    /// and `.pq` are Parquet; `.tfrecord`, `.tfrecords` and `.tfr` are TFRecord.
    pub fn of_path(path: &Path) -> Option<Format> {
        match extension(without_compression(path)).as_deref() {
            Some("csv") => Some(Format::Csv),
            Some("libsvm" | "svm" | "libffm" | "ffm") => Some(Format::Libsvm),
            Some("parquet" | "parq" | "pq") => Some(Format::Parquet),
            Some("tfrecord" | "tfrecords" | "tfr") => Some(Format::Tfrecord),
            _ => None,
        }
    }

    /// This format, or for [`Format::Auto`] the one `first_file`'s extension names (CSV when it
    /// names none, the default before formats were inferred).
    pub fn resolve(self, first_file: Option<&Path>) -> Format {
        match self {
            Format::Auto => first_file.and_then(Format::of_path).unwrap_or(Format::Csv),
            given => given,
        }
    }
}

/// How many passes over the data to make.
///
/// In config files: a positive integer, or the string `"forever"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epochs {
    /// This many passes (at least 1).
    Count(u64),
    /// Passes until the caller stops reading.
    Forever,
}

impl Default for Epochs {
    /// One pass.
    fn default() -> Epochs {
        Epochs::Count(1)
    }
}

impl Serialize for Epochs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Epochs::Count(n) => s.serialize_u64(*n),
            Epochs::Forever => s.serialize_str("forever"),
        }
    }
}

impl<'de> Deserialize<'de> for Epochs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Epochs, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Epochs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive number of epochs or \"forever\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Epochs, E> {
                // 0 is refused rather than read as "forever": a typo must not train forever.
                if n == 0 {
                    return Err(E::invalid_value(serde::de::Unexpected::Unsigned(0), &self));
                }
                Ok(Epochs::Count(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Epochs, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Epochs, E> {
                if s == "forever" {
                    Ok(Epochs::Forever)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Where the data is and how to read it.
///
/// In a config file (TOML shown; every field but `paths` and `format` is optional):
///
/// ```toml
/// paths = ["data/train.csv"]   # or `path = "data/"`; a directory means its files, sorted;
///                              # or "data/part-*.csv", or "s3://bucket/day=*/part-*.csv"
/// format = "csv"               # or "libsvm"; default: from the extension
/// skip_malformed = false       # default: a bad line is an error
/// labels = "binary"            # default: 0/1 (-1 read as 0); or "any"
/// shuffle_buffer = 0           # default: no shuffle
/// seed = 0
/// epochs = 1                   # or "forever"
/// buffer_bytes = 262144
/// [csv]
/// label = "label"              # default
/// categorical = ["c0", "c1"]   # default: none; other columns are dense
/// [libsvm]
/// dense_indices = 0            # default: every feature sparse
/// [storage_options]            # object_store keys, after the AWS_* (GOOGLE_*, AZURE_*) variables
/// aws_endpoint = "http://127.0.0.1:9000"
/// [remote]
/// chunk_bytes = 8388608        # default: ranged reads of 8 MiB
/// read_ahead = 4               # default: 4 of them in flight per open file
/// ```
///
/// Files ending in `.gz` or `.zst` are decompressed as they are read; each is read whole by
/// one worker (see [`ShardSpec::pieces`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    /// Data files, or directories whose regular, non-hidden files (sorted by name) are read,
    /// or globs (`*`, `?`, `[a-z]` within a path part, `**` for any number of parts). A path
    /// with `://` is a URL: `file://`, or an object, folder or glob on `s3://`, `gs://`, `az://`,
    /// `http(s)://` (see [`crate::remote`]). Accepts one path or a list, under `paths` or `path`.
    #[serde(alias = "path", deserialize_with = "one_or_many")]
    pub paths: Vec<PathBuf>,
    /// File format. Default: [`Format::Auto`], from the first file's extension.
    #[serde(default)]
    pub format: Format,
    /// Column roles for CSV; ignored for libsvm. Default: label `"label"`, all else dense.
    #[serde(default)]
    pub csv: CsvSchema,
    /// Dense features in libsvm files; ignored for CSV. Default: none.
    #[serde(default)]
    pub libsvm: LibsvmOptions,
    /// If true, lines that do not parse are skipped and counted ([`Reader::skipped`]);
    /// if false (default), the first one is an error naming its file and line.
    #[serde(default)]
    pub skip_malformed: bool,
    /// Which labels are valid; a line with another is malformed. Default: binary (0 or 1).
    #[serde(default)]
    pub labels: Labels,
    /// Examples held by the streaming shuffle; 0 or 1 (default 0) reads in file order.
    /// When above 1, the order of this worker's file pieces is shuffled too.
    #[serde(default)]
    pub shuffle_buffer: usize,
    /// Seed of the shuffle; the order of an epoch depends on seed, epoch and worker only.
    #[serde(default)]
    pub seed: u64,
    /// Number of passes. Default 1.
    #[serde(default)]
    pub epochs: Epochs,
    /// Read buffer per open file, in bytes. Default 256 KiB. Lines may be longer.
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: usize,
    /// Object-store settings for URL paths, applied after the environment's (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`): object_store keys such as `aws_endpoint`. Default: none.
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
    /// How remote files are read (ranged reads and read-ahead).
    #[serde(default)]
    pub remote: RemoteOptions,
}

fn default_buffer_bytes() -> usize {
    DEFAULT_BUFFER_BYTES
}

/// Deserializes one path or a list of paths (for config fields such as `paths`).
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

impl ReaderConfig {
    /// A config reading `paths` in `format` with every other setting at its default.
    pub fn new(format: Format, paths: Vec<PathBuf>) -> ReaderConfig {
        ReaderConfig {
            paths,
            format,
            csv: CsvSchema::default(),
            libsvm: LibsvmOptions::default(),
            skip_malformed: false,
            labels: Labels::default(),
            shuffle_buffer: 0,
            seed: 0,
            epochs: Epochs::default(),
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            storage_options: BTreeMap::new(),
            remote: RemoteOptions::default(),
        }
    }

    /// Checks the settings that do not need the file system.
    pub fn validate(&self) -> Result<()> {
        if self.paths.is_empty() {
            return Err(DataError::Config("paths must name at least one file".into()));
        }
        if self.buffer_bytes == 0 {
            return Err(DataError::Config("buffer_bytes must be at least 1, found 0".into()));
        }
        if let Epochs::Count(0) = self.epochs {
            return Err(DataError::Config("epochs must be at least 1, found 0".into()));
        }
        if matches!(self.format, Format::Csv | Format::Auto | Format::Parquet | Format::Tfrecord) {
            self.csv.validate().map_err(DataError::Config)?;
        }
        Ok(())
    }

    /// The stores URL paths are read from, with this config's storage options.
    pub fn stores(&self) -> Stores {
        Stores::new(self.storage_options.clone().into_iter().collect(), self.remote)
    }

    /// The data files: `paths` with directories, folders and globs replaced by their files
    /// (local paths and URLs). The same on every worker, which sharding relies on.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        let stores = self.stores();
        let mut files = Vec::new();
        for p in &self.paths {
            let local = match stores.locate(p)? {
                Location::Remote(remote) => {
                    files.extend(remote.expand()?.into_iter().map(|(f, _)| PathBuf::from(f.url)));
                    continue;
                }
                Location::Local(local) => local,
            };
            if has_glob(&local) && !local.exists() {
                files.extend(local_glob(&local)?);
                continue;
            }
            let meta = std::fs::metadata(&local).map_err(|e| DataError::io(p, e))?;
            if !meta.is_dir() {
                files.push(local);
                continue;
            }
            let mut inside = Vec::new();
            for entry in std::fs::read_dir(&local).map_err(|e| DataError::io(p, e))? {
                let entry = entry.map_err(|e| DataError::io(p, e))?;
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                let path = entry.path();
                if !hidden && path.is_file() {
                    inside.push(path);
                }
            }
            if inside.is_empty() {
                return Err(DataError::Config(format!("directory {} holds no data files", p.display())));
            }
            inside.sort();
            files.extend(inside);
        }
        Ok(files)
    }
}

/// The local files matching the glob `pattern`, sorted (hidden names left out).
fn local_glob(pattern: &Path) -> Result<Vec<PathBuf>> {
    let text = pattern.to_string_lossy();
    let parts: Vec<&str> = text.split('/').collect();
    let fixed = parts.iter().take_while(|p| !has_glob(p)).count();
    let base = match parts[..fixed].join("/") {
        b if b.is_empty() && fixed > 0 => PathBuf::from("/"),
        b if b.is_empty() => PathBuf::from("."),
        b => PathBuf::from(b),
    };
    let rest = parts[fixed..].join("/");
    let deep = parts[fixed..].contains(&"**");
    let mut found = Vec::new();
    let mut dirs = vec![(base.clone(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let path = entry.path();
            if path.is_dir() {
                if deep || depth + 1 < parts.len() - fixed {
                    dirs.push((path, child, depth + 1));
                }
            } else if glob_matches(&rest, &child) {
                found.push(path);
            }
        }
    }
    if found.is_empty() {
        return Err(DataError::NotFound { url: text.into_owned(), what: "no file matches the pattern" });
    }
    found.sort();
    Ok(found)
}

/// The CSV columns every file must have, fixed by the first file so that all files and all
/// workers agree on what dense feature `i` is.
#[derive(Debug)]
struct CsvPlan {
    schema: CsvSchema,
    dense: Vec<String>,
    /// CSV, Parquet or TFRecord: the formats whose columns are chosen by name.
    kind: Format,
}

/// Reads the header of a CSV file: its names and the offset of the first data line.
fn read_header(path: &Path, stores: &Stores) -> Result<(Vec<String>, u64)> {
    let mut reader =
        open_stream(path, 0, 64 * 1024, 64 * 1024, stores).map_err(|e| DataError::io(path, e))?;
    let mut line = Vec::new();
    let n = reader.read_until(b'\n', &mut line).map_err(|e| DataError::io(path, e))?;
    let header_error = |i: Issue| DataError::Parse {
        path: path.to_path_buf(),
        line: 1,
        expected: i.expected.into_owned(),
        found: i.found,
    };
    if n == 0 {
        return Err(header_error(Issue::new("a header row", "an empty file")));
    }
    let text = line.strip_suffix(b"\n").unwrap_or(&line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let names = header_names(utf8(text).map_err(header_error)?).map_err(header_error)?;
    Ok((names, n as u64))
}

#[derive(Debug)]
enum Parser {
    Libsvm(LibsvmOptions),
    Csv(CsvLayout),
}

/// The examples of one file piece.
#[derive(Debug)]
struct PieceReader {
    path: PathBuf,
    lines: RangeLines,
    parser: Parser,
    labels: Labels,
    skip_malformed: bool,
    skipped: u64,
    stores: Stores,
    /// The rows of a Parquet or TFRecord piece (then `lines` is empty).
    records: Option<Records>,
}

/// How many skipped lines a reader remembers with their file, line and reason
/// ([`Reader::skipped_lines`]); the rest are only counted.
pub const SKIPPED_LINES_KEPT: usize = 5;

impl PieceReader {
    fn open(
        piece: &FilePiece,
        csv: Option<&CsvPlan>,
        libsvm: LibsvmOptions,
        labels: Labels,
        skip_malformed: bool,
        buffer_bytes: usize,
        stores: &Stores,
    ) -> Result<PieceReader> {
        let path = &piece.path;
        // A file that cannot be cut is read whole by the piece that starts at 0.
        let splittable = Compression::of(path).splittable() && csv.is_none_or(|p| p.kind != Format::Tfrecord);
        let piece_range = if splittable {
            piece.range.clone()
        } else if piece.range.start == 0 && !piece.range.is_empty() {
            0..u64::MAX
        } else {
            0..0
        };
        if piece_range.is_empty() {
            let lines = RangeLines::empty();
            let parser = Parser::Libsvm(libsvm);
            let stores = stores.clone();
            return Ok(PieceReader {
                path: path.clone(),
                lines,
                parser,
                labels,
                skip_malformed,
                skipped: 0,
                stores,
                records: None,
            });
        }
        if let Some(plan) = csv.filter(|p| p.kind != Format::Csv) {
            let rows = match plan.kind {
                Format::Tfrecord => Records::Tf(TfRows::open(path, &plan.schema, &plan.dense, stores)?),
                _ => Records::Parquet(ParquetRows::open(
                    path,
                    piece.range.clone(),
                    &plan.schema,
                    &plan.dense,
                    stores,
                    stores.remote(),
                )?),
            };
            return Ok(PieceReader {
                path: path.clone(),
                lines: RangeLines::empty(),
                parser: Parser::Libsvm(libsvm),
                labels,
                skip_malformed,
                skipped: 0,
                stores: stores.clone(),
                records: Some(rows),
            });
        }
        let (parser, range) = match csv {
            None => (Parser::Libsvm(libsvm), piece_range),
            Some(plan) => {
                let (header, header_end) = read_header(path, stores)?;
                let (layout, _) =
                    CsvLayout::resolve(&plan.schema, &header, Some(&plan.dense)).map_err(|i| {
                        DataError::Parse {
                            path: path.clone(),
                            line: 1,
                            expected: i.expected.into_owned(),
                            found: i.found,
                        }
                    })?;
                // The header starts at offset 0, so it belongs to the piece holding offset 0;
                // starting that piece at the first data line leaves it out while every data
                // line still belongs to exactly the piece it did before.
                let start = piece_range.start.max(header_end);
                (Parser::Csv(layout), start..piece_range.end.max(start))
            }
        };
        let end = range.end;
        let lines =
            RangeLines::from_stream(|offset| open_stream(path, offset, end, buffer_bytes, stores), range)
                .map_err(|e| DataError::io(path, e))?;
        let stores = stores.clone();
        Ok(PieceReader {
            path: path.clone(),
            lines,
            parser,
            labels,
            skip_malformed,
            skipped: 0,
            stores,
            records: None,
        })
    }

    /// Parses the next example into `ex`; `false` at the end of the piece. A skipped line is
    /// added to `noted` while it holds fewer than [`SKIPPED_LINES_KEPT`].
    fn next_example(&mut self, ex: &mut Example, noted: &mut Vec<DataError>) -> Result<bool> {
        if let Some(rows) = &mut self.records {
            loop {
                let issue = match rows.next_example(ex)? {
                    None => return Ok(false),
                    Some(parsed) => match parsed.and_then(|()| self.labels.check(ex.label)) {
                        Ok(()) => return Ok(true),
                        Err(issue) => issue,
                    },
                };
                let error = DataError::Row {
                    path: self.path.clone(),
                    row: rows.row_number(),
                    expected: issue.expected.into_owned(),
                    found: issue.found,
                };
                if !self.skip_malformed {
                    return Err(error);
                }
                self.skipped += 1;
                if noted.len() < SKIPPED_LINES_KEPT {
                    noted.push(error);
                }
            }
        }
        loop {
            let Some((offset, line)) = self.lines.next_line().map_err(|e| DataError::io(&self.path, e))?
            else {
                return Ok(false);
            };
            let line_bytes = line.len();
            let parsed = utf8(line)
                .and_then(|text| match &self.parser {
                    Parser::Libsvm(options) => libsvm::parse_line(text, *options, ex),
                    Parser::Csv(layout) => layout.parse_line(text, ex),
                })
                .and_then(|found| {
                    if found {
                        self.labels.check(ex.label)?;
                    }
                    Ok(found)
                });
            let issue = match parsed {
                Ok(true) => return Ok(true),
                Ok(false) => continue,
                Err(issue) => issue,
            };
            if self.skip_malformed {
                self.skipped += 1;
                if noted.len() < SKIPPED_LINES_KEPT
                    && let Ok(e) = self.parse_error(offset, line_bytes, issue)
                {
                    noted.push(e);
                }
                continue;
            }
            return Err(self.parse_error(offset, line_bytes, issue)?);
        }
    }

    /// The error for a line that does not parse (or the error finding its number).
    fn parse_error(&self, offset: u64, line_bytes: usize, issue: Issue) -> Result<DataError> {
        let line = open_stream(&self.path, 0, offset, 64 * 1024, &self.stores)
            .and_then(|stream| line_number_in(stream, offset))
            .map_err(|e| DataError::io(&self.path, e))?;
        let mut found = issue.found;
        if line_bytes > SHOWN_BYTES {
            // What is shown of it is cut; say how much there was.
            found.push_str(&format!(" (in a line of {line_bytes} bytes)"));
        }
        Ok(DataError::Parse { path: self.path.clone(), line, expected: issue.expected.into_owned(), found })
    }
}

/// The pieces of one epoch, read one after the other. Kept apart from the shuffle buffer so
/// that a shuffle slot can be borrowed while the source is advanced.
#[derive(Debug)]
struct Source {
    pieces: Vec<FilePiece>,
    csv: Option<Arc<CsvPlan>>,
    libsvm: LibsvmOptions,
    labels: Labels,
    skip_malformed: bool,
    buffer_bytes: usize,
    stores: Stores,
    order: Vec<usize>,
    next: usize,
    current: Option<PieceReader>,
    exhausted: bool,
    /// Lines skipped in pieces already closed.
    skipped_closed: u64,
    /// The first skipped lines, with their reasons.
    noted: Vec<DataError>,
}

impl Source {
    fn restart(&mut self, order: Vec<usize>) {
        if let Some(c) = self.current.take() {
            self.skipped_closed += c.skipped;
        }
        self.order = order;
        self.next = 0;
        self.exhausted = false;
    }

    fn next_example(&mut self, ex: &mut Example) -> Result<bool> {
        loop {
            if self.exhausted {
                return Ok(false);
            }
            if self.current.is_none() {
                let Some(&i) = self.order.get(self.next) else {
                    self.exhausted = true;
                    return Ok(false);
                };
                self.next += 1;
                self.current = Some(PieceReader::open(
                    &self.pieces[i],
                    self.csv.as_deref(),
                    self.libsvm,
                    self.labels,
                    self.skip_malformed,
                    self.buffer_bytes,
                    &self.stores,
                )?);
            }
            let current = self.current.as_mut().expect("opened above");
            if current.next_example(ex, &mut self.noted)? {
                return Ok(true);
            }
            self.skipped_closed += current.skipped;
            self.current = None;
        }
    }

    fn skipped(&self) -> u64 {
        self.skipped_closed + self.current.as_ref().map_or(0, |c| c.skipped)
    }
}

/// Streams batches of examples from a list of file pieces, over one or more epochs.
///
/// `Send`, so it can be moved to a blocking thread of an async worker.
#[derive(Debug)]
pub struct Reader {
    source: Source,
    shuffle: ShuffleBuffer<Example>,
    num_dense: usize,
    dense_names: Vec<String>,
    categorical_names: Vec<String>,
    seed: u64,
    epochs: Epochs,
    /// Epochs started so far.
    started: u64,
    in_epoch: bool,
    end_of_epoch: bool,
    finished: bool,
}

impl Reader {
    /// The reader of worker `shard.worker_index` of `shard.num_workers`: its byte range of
    /// every file of `config` (see [`ShardSpec::pieces`]).
    pub fn open(config: &ReaderConfig, shard: ShardSpec) -> Result<Reader> {
        config.validate()?;
        let files = config.files()?;
        let format = config.format.resolve(files.first().map(PathBuf::as_path));
        let pieces = shard.pieces_of(&files, &config.stores(), format)?;
        Reader::build(config, &files, pieces, shard.worker_index as u64)
    }

    /// A reader over explicit pieces (for dynamic sharding, where a coordinator hands out
    /// pieces). `config.paths` still fixes the CSV columns (from its first file) and must be
    /// the same on every worker; the pieces' files need not be in it.
    pub fn from_pieces(config: &ReaderConfig, pieces: Vec<FilePiece>) -> Result<Reader> {
        config.validate()?;
        let files = config.files()?;
        Reader::build(config, &files, pieces, 0)
    }

    fn build(
        config: &ReaderConfig,
        files: &[PathBuf],
        pieces: Vec<FilePiece>,
        stream: u64,
    ) -> Result<Reader> {
        let first = files.first().or(pieces.first().map(|p| &p.path));
        let (csv, dense_names, categorical_names) = match config.format.resolve(first.map(PathBuf::as_path)) {
            Format::Libsvm => {
                let dense = (0..config.libsvm.dense_indices).map(|i| i.to_string()).collect();
                (None, dense, Vec::new())
            }
            Format::Parquet => {
                let Some(first) = first else {
                    return Err(DataError::Config("paths must name at least one file".into()));
                };
                let info = crate::parquet::info(first, &config.stores())?;
                let dense = crate::parquet::dense_columns(&config.csv, &info, first)?;
                let plan =
                    CsvPlan { schema: config.csv.clone(), dense: dense.clone(), kind: Format::Parquet };
                (Some(Arc::new(plan)), dense, config.csv.categorical.clone())
            }
            Format::Tfrecord => {
                let Some(first) = first else {
                    return Err(DataError::Config("paths must name at least one file".into()));
                };
                let dense = crate::tfrecord::dense_features(&config.csv, first, &config.stores())?;
                let plan =
                    CsvPlan { schema: config.csv.clone(), dense: dense.clone(), kind: Format::Tfrecord };
                (Some(Arc::new(plan)), dense, config.csv.categorical.clone())
            }
            Format::Csv | Format::Auto => {
                let Some(first) = first else {
                    return Err(DataError::Config("paths must name at least one file".into()));
                };
                let (header, _) = read_header(first, &config.stores())?;
                let (_, dense) =
                    CsvLayout::resolve(&config.csv, &header, None).map_err(|i| DataError::Parse {
                        path: first.clone(),
                        line: 1,
                        expected: i.expected.into_owned(),
                        found: i.found,
                    })?;
                let plan = CsvPlan { schema: config.csv.clone(), dense: dense.clone(), kind: Format::Csv };
                (Some(Arc::new(plan)), dense, config.csv.categorical.clone())
            }
        };
        Ok(Reader {
            source: Source {
                pieces,
                csv,
                libsvm: config.libsvm,
                labels: config.labels,
                skip_malformed: config.skip_malformed,
                buffer_bytes: config.buffer_bytes,
                stores: config.stores(),
                order: Vec::new(),
                next: 0,
                current: None,
                exhausted: true,
                skipped_closed: 0,
                noted: Vec::new(),
            },
            shuffle: ShuffleBuffer::new(config.shuffle_buffer),
            num_dense: dense_names.len(),
            dense_names,
            categorical_names,
            // Workers draw different shuffles from one configured seed.
            seed: derive_seed(&[config.seed, stream]),
            epochs: config.epochs,
            started: 0,
            in_epoch: false,
            end_of_epoch: false,
            finished: false,
        })
    }

    /// Dense features per example (for libsvm, its `dense_indices`).
    pub fn num_dense(&self) -> usize {
        self.num_dense
    }

    /// Names of the dense features, in feature order (for libsvm, their indices).
    pub fn dense_names(&self) -> &[String] {
        &self.dense_names
    }

    /// Names of the categorical fields, in field order (CSV only; empty for libsvm).
    pub fn categorical_names(&self) -> &[String] {
        &self.categorical_names
    }

    /// The file pieces this reader reads.
    pub fn pieces(&self) -> &[FilePiece] {
        &self.source.pieces
    }

    /// Malformed lines skipped so far, over all epochs (a bad line counts once per epoch).
    /// Always 0 unless `skip_malformed` is set.
    pub fn skipped(&self) -> u64 {
        self.source.skipped()
    }

    /// The first [`SKIPPED_LINES_KEPT`] lines skipped (when `skip_malformed` is set), each a
    /// [`DataError::Parse`] naming its file, line and what was wrong with it.
    pub fn skipped_lines(&self) -> &[DataError] {
        &self.source.noted
    }

    /// The 0-based epoch of the last batch returned.
    pub fn epoch(&self) -> u64 {
        self.started.saturating_sub(1)
    }

    /// Whether the last batch returned was the last of its epoch.
    pub fn end_of_epoch(&self) -> bool {
        self.end_of_epoch
    }

    /// Whether every epoch has been read (the next [`next_batch`](Self::next_batch) returns 0).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Replaces the contents of `batch` with up to `batch_size` examples and returns how many.
    ///
    /// A batch never mixes two epochs, so the last one of an epoch may be short; check
    /// [`end_of_epoch`](Self::end_of_epoch). Returns 0 once all epochs are read, and at once
    /// if this reader's pieces hold no example (with [`Epochs::Forever`] it would otherwise
    /// spin forever). `batch.num_dense` is set to [`num_dense`](Self::num_dense). After an
    /// error the reader is finished.
    pub fn next_batch(&mut self, batch: &mut Batch, batch_size: usize) -> Result<usize> {
        if batch_size == 0 {
            return Err(DataError::Config("batch_size must be at least 1, found 0".into()));
        }
        batch.num_dense = self.num_dense;
        batch.clear();
        self.end_of_epoch = false;
        let result = self.fill(batch, batch_size);
        if result.is_err() {
            self.finished = true;
            self.in_epoch = false;
        }
        result
    }

    fn fill(&mut self, batch: &mut Batch, batch_size: usize) -> Result<usize> {
        if self.finished {
            return Ok(0);
        }
        if !self.in_epoch && !self.start_epoch()? {
            self.finished = true;
            return Ok(0);
        }
        while batch.len() < batch_size {
            let ex = self.shuffle.take().expect("an epoch in progress has buffered examples");
            batch.push(ex.label, &ex.dense, ex.sparse.iter().copied());
            // Refilling right away means an empty buffer here is the end of the epoch, so the
            // last batch of an epoch can be flagged even when it is full.
            self.refill()?;
            if self.shuffle.is_empty() {
                self.in_epoch = false;
                self.end_of_epoch = true;
                break;
            }
        }
        Ok(batch.len())
    }

    /// Starts the next epoch; `false` if there is none or it is empty.
    fn start_epoch(&mut self) -> Result<bool> {
        if let Epochs::Count(n) = self.epochs
            && self.started >= n
        {
            return Ok(false);
        }
        let epoch = self.started;
        self.started += 1;
        self.shuffle.start_epoch(self.seed, epoch);
        let mut order: Vec<usize> = (0..self.source.pieces.len()).collect();
        if self.shuffle.capacity() > 1 {
            self.shuffle.permute(&mut order);
        }
        self.source.restart(order);
        self.refill()?;
        // Every epoch reads the same data, so an empty one means all are empty.
        self.in_epoch = !self.shuffle.is_empty();
        Ok(self.in_epoch)
    }

    fn refill(&mut self) -> Result<()> {
        while !self.shuffle.is_full() {
            if !self.source.next_example(self.shuffle.vacant())? {
                break;
            }
            self.shuffle.commit();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reader_is_send() {
        fn send<T: Send>() {}
        send::<super::Reader>();
    }
}
