//! Parsing libsvm lines: `label index:value index:value ... [# comment]`, and the libffm
//! form `label field:id:value ...` that field-aware models read.
//!
//! An `index:value` becomes a sparse entry with field 0, id `index` (a `u64`, so hashed
//! feature spaces fit) and the value; a `field:id:value` becomes the entry `(field, id,
//! value)`. The two forms may be mixed. Labels may be 0/1, -1/+1 (-1 becomes 0) or any float.
//! Lines that are empty or hold only a comment are skipped.
//!
//! With [`LibsvmOptions::dense_indices`] `= N`, the first `N` features are dense, as
//! Criteo-style files write their integer features: an `index:value` with `index < N` is dense
//! feature `index`, a `field:id:value` with `field < N` is dense feature `field` (its id is not
//! used), and the categorical fields that follow are numbered from 0 again (`field - N`), so
//! that a model's `num_fields` counts only them. A dense feature a line leaves out is 0, as
//! libsvm's absent features are.

use serde::{Deserialize, Serialize};

use crate::example::{Example, Issue, parse_f32, parse_label, show};

/// How libsvm lines map onto dense and sparse features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LibsvmOptions {
    /// Features below this index (or field, in the `field:id:value` form) are dense features;
    /// see the [module docs](self). Default 0: every feature is sparse.
    pub dense_indices: usize,
}

/// Parses `line` into `ex`. Returns `false` for a line with no example (blank or comment).
pub(crate) fn parse_line(line: &str, options: LibsvmOptions, ex: &mut Example) -> Result<bool, Issue> {
    let data = match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    };
    let mut tokens = data.split_ascii_whitespace();
    let Some(label) = tokens.next() else {
        return Ok(false);
    };
    ex.label = parse_label(label)?;
    let dense = options.dense_indices;
    ex.dense.clear();
    ex.dense.resize(dense, 0.0);
    ex.sparse.clear();
    for token in tokens {
        let Some((first, rest)) = token.split_once(':') else {
            return Err(Issue::new("a feature `index:value`", show(token)));
        };
        let (field, index, value) = match rest.split_once(':') {
            None => (None, first, rest),
            Some((id, value)) => {
                let field = first
                    .parse::<u32>()
                    .map_err(|_| Issue::new("a field number (an unsigned 32-bit integer)", show(first)))?;
                (Some(field), id, value)
            }
        };
        let id = index
            .parse::<u64>()
            .map_err(|_| Issue::new("a feature index (an unsigned integer)", show(index)))?;
        let value = parse_f32(value).ok_or_else(|| Issue::new("a finite feature value", show(value)))?;
        match field {
            None if (id as u128) < dense as u128 => ex.dense[id as usize] = value,
            None => ex.sparse.push((0, id, value)),
            Some(f) if (f as usize) < dense => ex.dense[f as usize] = value,
            Some(f) => ex.sparse.push((f - dense as u32, id, value)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Option<Example>, Issue> {
        parse_with(line, 0)
    }

    fn parse_with(line: &str, dense_indices: usize) -> Result<Option<Example>, Issue> {
        let mut ex = Example::default();
        Ok(parse_line(line, LibsvmOptions { dense_indices }, &mut ex)?.then_some(ex))
    }

    #[test]
    fn parses_features_and_labels() {
        let ex = parse("+1 3:0.5 18446744073709551615:2 # tail").unwrap().unwrap();
        assert_eq!(ex.label, 1.0);
        assert_eq!(ex.sparse, vec![(0, 3, 0.5), (0, u64::MAX, 2.0)]);
        assert_eq!(parse("-1 1:1").unwrap().unwrap().label, 0.0);
        assert_eq!(parse("0.25").unwrap().unwrap().label, 0.25);
        assert_eq!(parse("   ").unwrap(), None);
        assert_eq!(parse("# only a comment").unwrap(), None);
        assert_eq!(parse("1\t2:3").unwrap().unwrap().sparse, vec![(0, 2, 3.0)]);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse("x 1:1").unwrap_err().expected, "a numeric label");
        assert_eq!(parse("1 1").unwrap_err().found, "`1`");
        assert!(parse("1 a:1").unwrap_err().expected.contains("index"));
        assert!(parse("1 -2:1").is_err());
        assert!(parse("1 2:nan").unwrap_err().expected.contains("finite"));
        assert!(parse("nan 2:1").is_err());
    }

    #[test]
    fn parses_the_libffm_form() {
        let ex = parse("1 0:7:1 2:18446744073709551615:0.5 5:3").unwrap().unwrap();
        assert_eq!(ex.sparse, vec![(0, 7, 1.0), (2, u64::MAX, 0.5), (0, 5, 3.0)]);
        assert!(parse("1 x:7:1").unwrap_err().expected.contains("field number"));
        assert!(parse("1 4294967296:7:1").unwrap_err().expected.contains("field number"));
        assert!(parse("1 1:x:1").unwrap_err().expected.contains("index"));
        assert!(parse("1 1:2:3:4").unwrap_err().expected.contains("finite"));
    }

    #[test]
    fn dense_indices_make_the_first_features_dense() {
        // libsvm form: indices 0..3 dense, the rest sparse in field 0; absent dense features are 0.
        let ex = parse_with("1 2:0.5 0:1.5 3:1 70:2", 3).unwrap().unwrap();
        assert_eq!(ex.dense, vec![1.5, 0.0, 0.5]);
        assert_eq!(ex.sparse, vec![(0, 3, 1.0), (0, 70, 2.0)]);
        // libffm form: fields 0..2 dense (id unused), categorical fields renumbered from 0.
        let ex = parse_with("0 0:0:0.25 1:1:4 2:991:1 4:12:1", 2).unwrap().unwrap();
        assert_eq!(ex.dense, vec![0.25, 4.0]);
        assert_eq!(ex.sparse, vec![(0, 991, 1.0), (2, 12, 1.0)]);
        // Every line has all its dense slots, whatever the previous line held.
        let mut ex = Example::default();
        let options = LibsvmOptions { dense_indices: 2 };
        parse_line("1 1:9", options, &mut ex).unwrap();
        parse_line("1 5:1", options, &mut ex).unwrap();
        assert_eq!(ex.dense, vec![0.0, 0.0]);
    }
}
