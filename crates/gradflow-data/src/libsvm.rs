//! Parsing libsvm lines: `label index:value index:value ... [# comment]`.
//!
//! Every `index:value` becomes a sparse entry with field 0, id `index` (a `u64`, so hashed
//! feature spaces fit) and the value. Labels may be 0/1, -1/+1 (-1 becomes 0) or any float.
//! Lines that are empty or hold only a comment are skipped.

use crate::example::{Example, Issue, parse_f32, parse_label, show};

/// Parses `line` into `ex`. Returns `false` for a line with no example (blank or comment).
pub(crate) fn parse_line(line: &str, ex: &mut Example) -> Result<bool, Issue> {
    let data = match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    };
    let mut tokens = data.split_ascii_whitespace();
    let Some(label) = tokens.next() else {
        return Ok(false);
    };
    ex.label = parse_label(label)?;
    ex.dense.clear();
    ex.sparse.clear();
    for token in tokens {
        let Some((index, value)) = token.split_once(':') else {
            return Err(Issue::new("a feature `index:value`", show(token)));
        };
        let id = index
            .parse::<u64>()
            .map_err(|_| Issue::new("a feature index (an unsigned integer)", show(index)))?;
        let value = parse_f32(value).ok_or_else(|| Issue::new("a finite feature value", show(value)))?;
        ex.sparse.push((0, id, value));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Option<Example>, Issue> {
        let mut ex = Example::default();
        Ok(parse_line(line, &mut ex)?.then_some(ex))
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
}
