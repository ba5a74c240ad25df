//! TensorBoard event files: what `tensorboard --logdir` reads, written without TensorFlow.
//!
//! An event file (`events.out.tfevents.<seconds>.<host>.<pid>`) is a TFRecord file (the
//! framing is [`gradflow_data::tfrecord::write_record`]) of `tensorflow.Event` protobufs: the
//! first says the file's version (`brain.Event:2`), every later one holds a `Summary` of
//! scalar values, each a tag (`train/loss`) and a number, at a step and a wall time. Only the
//! fields scalars need are declared here, with prost derive; their tags are TensorFlow's
//! (`tensorflow/core/util/event.proto`, `tensorflow/core/framework/summary.proto`).
//!
//! TensorBoard treats each folder holding event files as one run, so a writer's folder is
//! one process of one training run (`<output dir>/tensorboard/<run id>/worker-0`).
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let mut events = gradflow_tensorboard::EventWriter::create(dir.path()).unwrap();
//! events.scalars(50, &[("train/loss", 0.47), ("train/samples_per_sec", 1.2e5)]).unwrap();
//! events.flush().unwrap();
//! let read = gradflow_tensorboard::read_scalars(events.path()).unwrap();
//! assert_eq!(read[0].tag, "train/loss");
//! ```

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use thiserror::Error;

/// What TensorBoard expects the first event of a file to say.
pub const FILE_VERSION: &str = "brain.Event:2";

/// An event file that could not be written or read.
#[derive(Debug, Error)]
pub enum EventError {
    #[error("event file {}: {cause}", .path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("event file {}: {what}", .path.display())]
    Corrupt { path: PathBuf, what: String },
}

/// `tensorflow.Event`: one record of an event file.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The first event's `file_version`, or a summary.
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// What an [`Event`] holds.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`: values at one step.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`, scalars only (`simple_value`).
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, tag = "2")]
    pub simple_value: f32,
}

/// Appends scalar summaries to a new event file in a folder.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` (and its parents) and a new event file in it, named as TensorFlow names
    /// them, and writes the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter, EventError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = hostname();
        let name = format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id());
        let path = dir.join(name);
        let io = |cause| EventError::Io { path: path.clone(), cause };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = File::options().create_new(true).write(true).open(&path).map_err(io)?;
        let mut writer = EventWriter { out: BufWriter::new(file), path };
        writer.write(Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `values` (tag, value) at `step`, stamped with the time now. Buffered: call
    /// [`EventWriter::flush`] for TensorBoard to see them.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), EventError> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue { tag: (*tag).to_string(), simple_value: *v as f32 })
            .collect();
        self.write(Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<(), EventError> {
        self.out.flush().map_err(|cause| EventError::Io { path: self.path.clone(), cause })
    }

    fn write(&mut self, event: Event) -> Result<(), EventError> {
        gradflow_data::tfrecord::write_record(&mut self.out, &event.encode_to_vec())
            .map_err(|cause| EventError::Io { path: self.path.clone(), cause })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub step: u64,
    pub tag: String,
    pub value: f32,
}

/// Every scalar of the event file at `path`, in file order; checks the framing, the checksums
/// and the file-version event.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>, EventError> {
    let corrupt = |what: String| EventError::Corrupt { path: path.to_path_buf(), what };
    let mut records = gradflow_data::tfrecord::Records::open(path, &Default::default())
        .map_err(|e| corrupt(e.to_string()))?;
    let mut out = Vec::new();
    let mut first = true;
    while let Some(data) = records.next_record().map_err(|e| corrupt(e.to_string()))? {
        let event = Event::decode(data).map_err(|e| corrupt(format!("a record that is no Event ({e})")))?;
        match (first, event.what) {
            (true, Some(What::FileVersion(v))) if v == FILE_VERSION => {}
            (true, other) => {
                return Err(corrupt(format!(
                    "expected the file version {FILE_VERSION:?} first, found {other:?}"
                )));
            }
            (false, Some(What::Summary(s))) => out.extend(s.value.into_iter().map(|v| Scalar {
                step: event.step.max(0) as u64,
                tag: v.tag,
                value: v.simple_value,
            })),
            (false, _) => {}
        }
        first = false;
    }
    Ok(out)
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// This machine's name for the file name (as TensorFlow does), `localhost` if unknown.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String =
        name.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if name.is_empty() { "localhost".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_read_back_in_order_with_their_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join("run/worker-0")).unwrap();
        w.scalars(50, &[("train/loss", 0.5), ("train/samples_per_sec", 1000.0)]).unwrap();
        w.scalars(100, &[("train/loss", 0.25)]).unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let got = read_scalars(w.path()).unwrap();
        let want =
            [(50, "train/loss", 0.5), (50, "train/samples_per_sec", 1000.0), (100, "train/loss", 0.25)];
        assert_eq!(got.len(), want.len());
        for (g, (step, tag, value)) in got.iter().zip(want) {
            assert_eq!((g.step, g.tag.as_str(), g.value), (step, tag, value));
        }
    }

    #[test]
    fn a_file_without_the_version_event_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.out.tfevents.1.h.1");
        let mut bytes = Vec::new();
        let event = Event { wall_time: 1.0, step: 3, what: Some(What::Summary(Summary::default())) };
        gradflow_data::tfrecord::write_record(&mut bytes, &event.encode_to_vec()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let err = read_scalars(&path).unwrap_err().to_string();
        assert!(err.contains("brain.Event:2"), "{err}");
    }
}
