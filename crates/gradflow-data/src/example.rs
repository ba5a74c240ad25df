//! One parsed example, the unit that flows from a parser through the shuffle into a batch.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// One example: a label, its dense features, and its sparse entries `(field, id, value)`.
///
/// Readers overwrite an `Example` in place, so its vectors keep their capacity and parsing
/// allocates nothing once they have grown to the widest example.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    /// The label (0/1 for classification; any finite value for regression).
    pub label: f32,
    /// Dense features, `num_dense` of them.
    pub dense: Vec<f32>,
    /// Sparse entries `(field, id, value)`.
    pub sparse: Vec<(u32, u64, f32)>,
}

/// Why a line does not parse, before the file and line number are known.
///
/// Kept apart from [`DataError`](crate::DataError) because the line number is computed only
/// once an error is certain (it costs a pass over the file up to the line).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    pub(crate) expected: Cow<'static, str>,
    pub(crate) found: String,
}

impl Issue {
    pub(crate) fn new(expected: impl Into<Cow<'static, str>>, found: impl Into<String>) -> Issue {
        Issue { expected: expected.into(), found: found.into() }
    }
}

/// How a token is shown in an error: quoted, and cut short so a huge line cannot flood a log.
pub(crate) fn show(token: &str) -> String {
    const MAX: usize = 40;
    if token.is_empty() {
        return "nothing".into();
    }
    if token.len() <= MAX {
        return format!("`{token}`");
    }
    let mut cut = MAX;
    while !token.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("`{}...`", &token[..cut])
}

/// Which labels a reader accepts.
///
/// In config files: `"binary"` (the default) or `"any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Labels {
    /// The labels of a binary classifier, which every built-in model is: 0 and 1 (`-1` is read
    /// as 0, libsvm's -1/+1 convention), or a soft label between them. Any other value makes
    /// the line malformed: a label of 2 or -5 would otherwise train a model on a loss it
    /// cannot reach.
    #[default]
    Binary,
    /// Any finite value (regression targets).
    Any,
}

impl Labels {
    /// Checks a parsed label (after `-1` became 0).
    pub(crate) fn check(self, label: f32) -> Result<(), Issue> {
        match self {
            Labels::Binary if !(0.0..=1.0).contains(&label) => Err(Issue::new(
                "a label 0 or 1 (or -1, read as 0; or a soft label between 0 and 1)",
                format!("`{label}`"),
            )),
            _ => Ok(()),
        }
    }
}

/// How much of a line an error shows at most, in bytes: enough to recognize it, not enough
/// for one huge line to flood a log.
pub(crate) const SHOWN_BYTES: usize = 200;

/// Parses a label. `-1` becomes 0 so that libsvm's -1/+1 convention and 0/1 agree; any
/// other finite value is kept, which leaves room for regression targets.
pub(crate) fn parse_label(token: &str) -> Result<f32, Issue> {
    let v = parse_f32(token).ok_or_else(|| Issue::new("a numeric label", show(token)))?;
    Ok(if v == -1.0 { 0.0 } else { v })
}

/// A finite `f32`, ignoring surrounding whitespace. `NaN` and infinities are rejected because
/// one of them poisons every parameter it reaches.
pub(crate) fn parse_f32(token: &str) -> Option<f32> {
    token.trim().parse::<f32>().ok().filter(|v| v.is_finite())
}

/// The line as UTF-8, or an issue saying where it stops being UTF-8.
pub(crate) fn utf8(line: &[u8]) -> Result<&str, Issue> {
    std::str::from_utf8(line)
        .map_err(|e| Issue::new("UTF-8 text", format!("an invalid byte at column {}", e.valid_up_to() + 1)))
}
