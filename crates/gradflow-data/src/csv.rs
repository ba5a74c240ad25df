//! Parsing CSV files with a header row into labels, dense and categorical features.
//!
//! Columns are chosen by name with a [`CsvSchema`]: one label column, a list of categorical
//! columns, and every other column dense. Dense cells parse as `f32`; an empty dense cell is
//! an error (silently imputing 0 would hide broken exports). A categorical cell becomes one
//! sparse entry `(field, id, 1.0)` where `field` is the column's position in
//! [`CsvSchema::categorical`] and `id` is [`categorical_id`]`(field, text)`. An empty
//! categorical cell is a value like any other (it gets its own id), so every example has
//! exactly one entry per categorical field, which field-aware models rely on.
//!
//! Quoting follows RFC 4180 within a line (`"a,b"` and `"say ""hi"""` work); a quoted cell
//! may not span lines, because byte-range sharding must be able to find line starts without
//! reading from the file start.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::example::{Example, Issue, parse_f32, parse_label, show};
use crate::hash::{IdHasher, categorical_id};

/// Which CSV columns are the label and which are categorical; all others are dense.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsvSchema {
    /// Name of the label column. Default `"label"`.
    pub label: String,
    /// Names of the categorical columns, in field order. Default: none.
    pub categorical: Vec<String>,
}

impl Default for CsvSchema {
    fn default() -> CsvSchema {
        CsvSchema { label: "label".into(), categorical: Vec::new() }
    }
}

impl CsvSchema {
    /// Every column other than `label` is dense.
    pub fn dense_only(label: impl Into<String>) -> CsvSchema {
        CsvSchema { label: label.into(), categorical: Vec::new() }
    }

    /// A label column and categorical columns; all others are dense.
    pub fn new(label: impl Into<String>, categorical: Vec<String>) -> CsvSchema {
        CsvSchema { label: label.into(), categorical }
    }

    /// Checks that the label is named, and no column is listed twice or as both label and
    /// categorical.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.label.is_empty() {
            return Err("csv.label must name a column, found an empty name".into());
        }
        for (i, c) in self.categorical.iter().enumerate() {
            if *c == self.label {
                return Err(format!("csv column `{c}` is both the label and categorical"));
            }
            if self.categorical[..i].contains(c) {
                return Err(format!("csv.categorical lists `{c}` twice"));
            }
        }
        Ok(())
    }
}

/// What one column of a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Label,
    /// Index among the dense features.
    Dense(usize),
    /// Index among the categorical fields.
    Categorical(u32),
}

/// The columns of one file mapped onto the schema.
#[derive(Debug, Clone)]
pub(crate) struct CsvLayout {
    roles: Vec<Role>,
    names: Vec<String>,
    num_dense: usize,
    num_categorical: usize,
}

/// Splits a header line into unescaped, trimmed column names.
pub(crate) fn header_names(line: &str) -> Result<Vec<String>, Issue> {
    // A UTF-8 byte order mark is invisible in editors but would otherwise become part of the
    // first column's name.
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    Cells::new(line)
        .map(|c| {
            let c = c?;
            let name = if c.escaped { c.text.replace("\"\"", "\"") } else { c.text.to_string() };
            Ok(name.trim().to_string())
        })
        .collect()
}

/// Splits a data line into its unescaped cells (not trimmed: a cell is data).
pub(crate) fn cells(line: &str) -> Result<Vec<String>, Issue> {
    Cells::new(line)
        .map(|c| {
            let c = c?;
            Ok(if c.escaped { c.text.replace("\"\"", "\"") } else { c.text.to_string() })
        })
        .collect()
}

fn list(names: &[String]) -> String {
    format!("columns {}", column_list(names))
}

/// Column names for a message: quoted, each cut short, and no more than about 200 characters
/// in all (`` `a`, `b` and 998 more ``), so that a header of a million columns or one huge
/// name cannot flood a log.
pub fn column_list(names: &[String]) -> String {
    let mut out = String::new();
    for (i, n) in names.iter().enumerate() {
        let shown = if n.is_empty() { "``".to_string() } else { show(n) };
        if i > 0 && out.len() + shown.len() > crate::example::SHOWN_BYTES {
            return format!("{out} and {} more", names.len() - i);
        }
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&shown);
    }
    if out.is_empty() { "none".into() } else { out }
}

impl CsvLayout {
    /// Maps `header` onto `schema`. Dense features are ordered as in `reference_dense` when
    /// given (the first file's dense columns, so that every file and every worker agree on
    /// what dense feature `i` is), otherwise as in `header`. Returns the layout and the dense
    /// column names in feature order.
    pub(crate) fn resolve(
        schema: &CsvSchema,
        header: &[String],
        reference_dense: Option<&[String]>,
    ) -> Result<(CsvLayout, Vec<String>), Issue> {
        // Sets and maps, not scans: a header may have a million columns.
        let mut seen = HashSet::with_capacity(header.len());
        for name in header {
            if !seen.insert(name.as_str()) {
                return Err(Issue::new("distinct column names", format!("{} twice", show(name))));
            }
        }
        if !header.contains(&schema.label) {
            return Err(Issue::new(format!("a label column named `{}`", schema.label), list(header)));
        }
        for c in &schema.categorical {
            if !header.contains(c) {
                return Err(Issue::new(format!("a categorical column named `{c}`"), list(header)));
            }
        }
        let dense: Vec<String> = header
            .iter()
            .filter(|n| **n != schema.label && !schema.categorical.contains(n))
            .cloned()
            .collect();
        let order: &[String] = match reference_dense {
            Some(r) => {
                let is_dense = |n: &String| *n != schema.label && !schema.categorical.contains(n);
                let same_set =
                    r.len() == dense.len() && r.iter().all(|n| seen.contains(n.as_str()) && is_dense(n));
                if !same_set {
                    return Err(Issue::new(
                        format!("the dense {} (as in the first file)", list(r)),
                        format!("dense {}", list(&dense)),
                    ));
                }
                r
            }
            None => &dense,
        };
        let dense_index: HashMap<&str, usize> =
            order.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let roles = header
            .iter()
            .map(|name| {
                if *name == schema.label {
                    Role::Label
                } else if let Some(f) = schema.categorical.iter().position(|c| c == name) {
                    Role::Categorical(f as u32)
                } else {
                    Role::Dense(dense_index[name.as_str()])
                }
            })
            .collect();
        let layout = CsvLayout {
            roles,
            names: header.to_vec(),
            num_dense: order.len(),
            num_categorical: schema.categorical.len(),
        };
        Ok((layout, order.to_vec()))
    }

    /// Parses a data line into `ex`. Returns `false` for a blank line.
    pub(crate) fn parse_line(&self, line: &str, ex: &mut Example) -> Result<bool, Issue> {
        if line.trim().is_empty() {
            return Ok(false);
        }
        ex.dense.clear();
        ex.dense.resize(self.num_dense, 0.0);
        // Entries go to their field's slot, so field order never depends on column order.
        ex.sparse.clear();
        ex.sparse.resize(self.num_categorical, (0, 0, 0.0));
        let mut cells = Cells::new(line);
        let mut count = 0;
        for cell in cells.by_ref() {
            let cell = cell?;
            let Some(&role) = self.roles.get(count) else {
                count += 1;
                break;
            };
            let name = &self.names[count];
            count += 1;
            match role {
                Role::Label => {
                    ex.label = parse_label(cell.text)
                        .map_err(|i| Issue::new(format!("a numeric label in column `{name}`"), i.found))?;
                }
                Role::Dense(d) => {
                    ex.dense[d] = parse_f32(cell.text).ok_or_else(|| {
                        Issue::new(format!("a finite number in column `{name}`"), show(cell.text))
                    })?;
                }
                Role::Categorical(f) => {
                    let id = if cell.escaped {
                        let mut h = IdHasher::new(f);
                        let mut parts = cell.text.split("\"\"");
                        h.write(parts.next().unwrap_or("").as_bytes());
                        for p in parts {
                            h.write(b"\"");
                            h.write(p.as_bytes());
                        }
                        h.finish()
                    } else {
                        categorical_id(f, cell.text.as_bytes())
                    };
                    ex.sparse[f as usize] = (f, id, 1.0);
                }
            }
        }
        if count != self.roles.len() {
            // Only on the error path: count the rest to say how many cells the line has.
            let total = count + cells.count();
            return Err(Issue::new(
                format!("{} cells (as in the header)", self.roles.len()),
                format!("{total} cells"),
            ));
        }
        Ok(true)
    }
}

/// One cell of a line: its text without surrounding quotes, and whether it holds `""`
/// escapes still to be collapsed.
#[derive(Debug, Clone, Copy)]
struct Cell<'a> {
    text: &'a str,
    escaped: bool,
}

/// The cells of one CSV line, borrowed from it.
struct Cells<'a> {
    line: &'a str,
    pos: usize,
    done: bool,
}

impl<'a> Cells<'a> {
    fn new(line: &'a str) -> Cells<'a> {
        Cells { line, pos: 0, done: false }
    }
}

impl<'a> Iterator for Cells<'a> {
    type Item = Result<Cell<'a>, Issue>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let bytes = self.line.as_bytes();
        let start = self.pos;
        if bytes.get(start) != Some(&b'"') {
            let text = match bytes[start..].iter().position(|&b| b == b',') {
                Some(k) => {
                    self.pos = start + k + 1;
                    &self.line[start..start + k]
                }
                None => {
                    self.done = true;
                    &self.line[start..]
                }
            };
            return Some(Ok(Cell { text, escaped: false }));
        }
        let mut i = start + 1;
        let mut escaped = false;
        loop {
            let Some(k) = bytes[i..].iter().position(|&b| b == b'"') else {
                self.done = true;
                return Some(Err(Issue::new(
                    "a closing quote (quoted cells may not span lines)",
                    "end of line",
                )));
            };
            let q = i + k;
            if bytes.get(q + 1) == Some(&b'"') {
                escaped = true;
                i = q + 2;
                continue;
            }
            let text = &self.line[start + 1..q];
            match bytes.get(q + 1) {
                None => self.done = true,
                Some(b',') => self.pos = q + 2,
                Some(_) => {
                    self.done = true;
                    return Some(Err(Issue::new("`,` after a closing quote", show(&self.line[q + 1..]))));
                }
            }
            return Some(Ok(Cell { text, escaped }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn cells(line: &str) -> Vec<(String, bool)> {
        Cells::new(line).map(|c| c.map(|c| (c.text.to_string(), c.escaped)).unwrap()).collect()
    }

    #[test]
    fn splits_cells() {
        assert_eq!(
            cells("a,b,,c"),
            vec![("a".into(), false), ("b".into(), false), ("".into(), false), ("c".into(), false)]
        );
        assert_eq!(cells("a,"), vec![("a".into(), false), ("".into(), false)]);
        assert_eq!(
            cells("\"x,y\",\"say \"\"hi\"\"\""),
            vec![("x,y".into(), false), ("say \"\"hi\"\"".into(), true)]
        );
        assert!(Cells::new("\"open").next().unwrap().is_err());
        assert!(Cells::new("\"a\"b").next().unwrap().is_err());
    }

    #[test]
    fn header_unescapes_and_strips_bom() {
        assert_eq!(header_names("\u{feff}label,\"a\"\"b\", c ").unwrap(), names(&["label", "a\"b", "c"]));
    }

    #[test]
    fn layout_and_parse() {
        let schema = CsvSchema::new("y", names(&["c1", "c0"]));
        let header = names(&["d0", "c0", "y", "c1", "d1"]);
        let (layout, dense) = CsvLayout::resolve(&schema, &header, None).unwrap();
        assert_eq!(dense, names(&["d0", "d1"]));
        let mut ex = Example::default();
        assert!(layout.parse_line("1.5,red,-1,\"big\"\"\",2", &mut ex).unwrap());
        assert_eq!(ex.label, 0.0);
        assert_eq!(ex.dense, vec![1.5, 2.0]);
        assert_eq!(
            ex.sparse,
            vec![(0, categorical_id(0, b"big\""), 1.0), (1, categorical_id(1, b"red"), 1.0)]
        );
        assert!(!layout.parse_line("  ", &mut ex).unwrap());
        let e = layout.parse_line("1,a,1,b", &mut ex).unwrap_err();
        assert_eq!((e.expected.as_ref(), e.found.as_str()), ("5 cells (as in the header)", "4 cells"));
        let e = layout.parse_line("1,a,1,b,2,3,4", &mut ex).unwrap_err();
        assert_eq!(e.found, "7 cells");
        let e = layout.parse_line(",a,1,b,2", &mut ex).unwrap_err();
        assert_eq!(e.expected, "a finite number in column `d0`");
        assert_eq!(e.found, "nothing");
    }

    #[test]
    fn reference_order_wins() {
        let schema = CsvSchema::dense_only("label");
        let (layout, dense) =
            CsvLayout::resolve(&schema, &names(&["b", "label", "a"]), Some(&names(&["a", "b"]))).unwrap();
        assert_eq!(dense, names(&["a", "b"]));
        let mut ex = Example::default();
        layout.parse_line("2,1,3", &mut ex).unwrap();
        assert_eq!(ex.dense, vec![3.0, 2.0]);
        assert!(
            CsvLayout::resolve(&schema, &names(&["b", "label", "z"]), Some(&names(&["a", "b"]))).is_err()
        );
        assert!(CsvLayout::resolve(&schema, &names(&["b", "a"]), None).is_err());
        assert!(CsvLayout::resolve(&schema, &names(&["label", "a", "a"]), None).is_err());
    }
}
