//! Reading text datasets: one text per line, JSONL records, or CSV/TSV with a header row. Every
//! record keeps its line number so a bad row is reported where the user can find it.

use std::path::Path;

use crate::error::{Error, Result};

/// One input row.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub text: String,
    /// Second text of a pair (`text_pair` in JSONL, a second `--pair-column` in CSV/TSV).
    pub pair: Option<String>,
    pub label: Option<String>,
    /// 1-based line in the file.
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Lines,
    Jsonl,
    Csv,
    Tsv,
}

impl Format {
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("json") => Format::Jsonl,
            Some("csv") => Format::Csv,
            Some("tsv") => Format::Tsv,
            _ => Format::Lines,
        }
    }
}

/// Which fields hold the text, the optional pair and the optional label.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub text: Option<String>,
    pub pair: Option<String>,
    pub label: Option<String>,
}

const TEXT_NAMES: [&str; 3] = ["text", "sentence", "sentence1"];
const LABEL_NAMES: [&str; 2] = ["label", "labels"];

/// Reads records from `path`. Empty texts are an error naming the line unless `skip_empty`.
pub fn read_records(path: &Path, cols: &Columns, skip_empty: bool) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records = parse(&text, Format::of(path), cols).map_err(|m| Error::file(path, m))?;
    finish(records, skip_empty).map_err(|m| Error::file(path, m))
}

/// Records from an in-memory text in the given format (stdin, tests).
pub fn parse(
    text: &str,
    format: Format,
    cols: &Columns,
) -> std::result::Result<Vec<Record>, String> {
    match format {
        Format::Lines => Ok(text
            .lines()
            .enumerate()
            .map(|(i, l)| Record {
                text: l.trim_end_matches('\r').to_string(),
                pair: None,
                label: None,
                line: i + 1,
            })
            .collect()),
        Format::Jsonl => parse_jsonl(text, cols),
        Format::Csv => parse_delimited(text, b',', true, cols),
        Format::Tsv => parse_delimited(text, b'\t', false, cols),
    }
}

fn finish(records: Vec<Record>, skip_empty: bool) -> std::result::Result<Vec<Record>, String> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        if r.text.trim().is_empty() {
            if skip_empty {
                continue;
            }
            return Err(format!(
                "line {}: empty text (remove the line or pass --skip-empty)",
                r.line
            ));
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err("no texts to process".into());
    }
    Ok(out)
}

fn field_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn parse_jsonl(text: &str, cols: &Columns) -> std::result::Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("line {}: invalid JSON: {e}", i + 1))?;
        let get = |names: &[&str]| names.iter().find_map(|n| v.get(*n)).and_then(field_string);
        let text_names: Vec<&str> = match &cols.text {
            Some(c) => vec![c.as_str()],
            None => TEXT_NAMES.to_vec(),
        };
        let text = get(&text_names).ok_or_else(|| {
            format!(
                "line {}: no text field (looked for {})",
                i + 1,
                text_names.join(", ")
            )
        })?;
        let pair_names: Vec<&str> = match &cols.pair {
            Some(c) => vec![c.as_str()],
            None => vec!["text_pair", "sentence2"],
        };
        let label_names: Vec<&str> = match &cols.label {
            Some(c) => vec![c.as_str()],
            None => LABEL_NAMES.to_vec(),
        };
        out.push(Record {
            text,
            pair: get(&pair_names),
            label: get(&label_names),
            line: i + 1,
        });
    }
    Ok(out)
}

fn parse_delimited(
    text: &str,
    delim: u8,
    quoting: bool,
    cols: &Columns,
) -> std::result::Result<Vec<Record>, String> {
    let mut rd = csv::ReaderBuilder::new()
        .delimiter(delim)
        .quoting(quoting)
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = rd
        .headers()
        .map_err(|e| format!("line 1: cannot read the header: {e}"))?
        .iter()
        .map(String::from)
        .collect();
    let find = |want: &Option<String>, defaults: &[&str], what: &str, required: bool| {
        let names: Vec<&str> = match want {
            Some(c) => vec![c.as_str()],
            None => defaults.to_vec(),
        };
        match names
            .iter()
            .find_map(|n| header.iter().position(|h| h == n))
        {
            Some(i) => Ok(Some(i)),
            None if required || want.is_some() => Err(format!(
                "line 1: no {what} column named {} in the header {header:?} (use --column)",
                names.join(" or ")
            )),
            None => Ok(None),
        }
    };
    let ti = find(&cols.text, &TEXT_NAMES, "text", true)?.unwrap();
    let pi = find(&cols.pair, &["text_pair", "sentence2"], "pair", false)?;
    let li = find(&cols.label, &LABEL_NAMES, "label", false)?;
    let mut out = Vec::new();
    for row in rd.records() {
        let row = row.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            format!("line {line}: {e}")
        })?;
        let line = row.position().map_or(0, |p| p.line() as usize);
        let at = |i: usize| row.get(i).map(String::from);
        out.push(Record {
            text: at(ti).unwrap_or_default(),
            pair: pi.and_then(at),
            label: li.and_then(at),
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_with_header_and_quotes_kept_verbatim() {
        let t = "sentence\tlabel\nit 's a \"charming\" film\t1\nawful\t0\n";
        let r = parse(t, Format::Tsv, &Columns::default()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].text, "it 's a \"charming\" film");
        assert_eq!(r[0].label.as_deref(), Some("1"));
        assert_eq!(r[1].line, 3);
    }

    #[test]
    fn csv_quoted_commas() {
        let t = "label,text\nspam,\"win, now\"\n";
        let r = parse(t, Format::Csv, &Columns::default()).unwrap();
        assert_eq!(r[0].text, "win, now");
        assert_eq!(r[0].label.as_deref(), Some("spam"));
    }

    #[test]
    fn jsonl_fields_and_errors_name_the_line() {
        let t = "{\"text\": \"a\", \"label\": 2}\n\n{\"txt\": \"b\"}\n";
        let e = parse(t, Format::Jsonl, &Columns::default()).unwrap_err();
        assert!(e.starts_with("line 3: no text field"), "{e}");
        let r = parse(
            "{\"text\":\"a\",\"label\":2}",
            Format::Jsonl,
            &Columns::default(),
        )
        .unwrap();
        assert_eq!(r[0].label.as_deref(), Some("2"));
    }

    #[test]
    fn empty_lines_are_errors_unless_skipped() {
        let r = parse("a\n\nb\n", Format::Lines, &Columns::default()).unwrap();
        assert_eq!(
            finish(r.clone(), false).unwrap_err(),
            "line 2: empty text (remove the line or pass --skip-empty)"
        );
        assert_eq!(finish(r, true).unwrap().len(), 2);
    }

    #[test]
    fn missing_column_is_named() {
        let cols = Columns {
            text: Some("body".into()),
            ..Default::default()
        };
        let e = parse("text,label\na,1\n", Format::Csv, &cols).unwrap_err();
        assert!(e.contains("no text column named body"), "{e}");
    }
}

/// A source text and its target text (a translation, a summary, a correction).
#[derive(Debug, Clone, PartialEq)]
pub struct TextPair {
    pub input: String,
    pub target: String,
    /// 1-based line in the file.
    pub line: usize,
}

/// The two field names a pair may use.
const PAIR_FIELDS: [(&str, &str, &str); 2] = [
    ("input", "target", "input/target"),
    ("prompt", "completion", "prompt/completion"),
];

/// JSONL pairs, one `{"input", "target"}` or `{"prompt", "completion"}` object per line
/// (blank lines skipped), with the names the file used.
pub fn read_pairs(path: &Path) -> Result<(Vec<TextPair>, &'static str)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |n: usize, msg: String| Error::Data(format!("{}: line {n}: {msg}", path.display()));
    let (mut out, mut format) = (Vec::new(), "input/target");
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(n, format!("not JSON: {e}")))?;
        let Some(&(src, tgt, name)) = PAIR_FIELDS.iter().find(|f| v.get(f.0).is_some()) else {
            return Err(bad(
                n,
                "expected {\"input\", \"target\"} or {\"prompt\", \"completion\"}".into(),
            ));
        };
        format = name;
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad(n, format!("no \"{k}\" string")))
        };
        out.push(TextPair {
            input: field(src)?,
            target: field(tgt)?,
            line: n,
        });
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{}: no pairs", path.display())));
    }
    Ok((out, format))
}
