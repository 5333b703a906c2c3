//! Reading a COCO JSON file as labeling tools write them: a UTF-8 byte-order
//! mark is accepted, and a file that does not parse is explained — Python's
//! `NaN`/`Infinity` (which JSON does not have) named with the record and
//! field they are in, any other fault shown with the text around it.

use hotcoco::types::Dataset;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Why a JSON file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: invalid JSON: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The UTF-8 byte-order mark some Windows tools write first.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads `path` as a COCO instances file.
pub fn read_dataset(path: &Path) -> Result<Dataset, JsonError> {
    read_json(path)
}

/// What makes `dataset` unusable as a whole (training and evaluation alike):
/// no categories, a category or image id given twice.
pub fn structure_fault(dataset: &Dataset) -> Option<String> {
    if dataset.categories.is_empty() {
        return Some("no categories: a COCO instances file needs a non-empty \"categories\" list".into());
    }
    let mut seen = std::collections::HashSet::with_capacity(dataset.images.len());
    if let Some(c) = dataset.categories.iter().find(|c| !seen.insert(c.id)) {
        return Some(format!("category id {} appears twice in \"categories\"", c.id));
    }
    seen.clear();
    dataset
        .images
        .iter()
        .find(|im| !seen.insert(im.id))
        .map(|im| format!("image id {} appears twice in \"images\"", im.id))
}

/// Reads `path` as JSON of type `T` (BOM accepted; errors explained).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, JsonError> {
    let bytes = std::fs::read(path)
        .map_err(|e| JsonError::Read { path: path.to_path_buf(), message: format!("cannot read: {e}") })?;
    parse_json(&bytes).map_err(|message| JsonError::Parse { path: path.to_path_buf(), message })
}

/// Parses `bytes` (BOM accepted); on failure, the reason in one line.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let text = bytes.strip_prefix(BOM).unwrap_or(bytes);
    serde_json::from_slice(text).map_err(|e| explain(text, &e))
}

/// One line saying why `text` did not parse: a non-finite number with the
/// place it is in, else serde's message with the text around the fault.
fn explain(text: &[u8], error: &serde_json::Error) -> String {
    let tokens = non_finite_tokens(text);
    if let Some(&(offset, token)) = tokens.first() {
        let place = locate(text, &tokens).unwrap_or_else(|| format!("at byte {offset}"));
        let more =
            if tokens.len() > 1 { format!(" ({} such values in the file)", tokens.len()) } else { String::new() };
        return format!(
            "{place} is {token}, which JSON does not allow{more}: write a number or null (Python: json.dump(..., allow_nan=False) finds them)"
        );
    }
    let message = crate::text::one_line(&error.to_string());
    match context(text, error.line(), error.column()) {
        Some(around) => format!("{message}, near `{around}`"),
        None => message,
    }
}

/// Byte offsets and spellings of `NaN`, `Infinity` and `-Infinity` outside strings.
fn non_finite_tokens(text: &[u8]) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    let (mut i, mut in_string) = (0, false);
    while i < text.len() {
        let c = text[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else if c == b'"' {
            in_string = true;
        } else {
            for token in ["-Infinity", "Infinity", "NaN"] {
                if text[i..].starts_with(token.as_bytes()) {
                    found.push((i, token));
                    i += token.len() - 1;
                    break;
                }
            }
        }
        i += 1;
    }
    found
}

/// Where the first non-finite token is: the tokens are made strings, the
/// text parsed as a tree, and the first marked value's path named (with
/// the id of the record it is in: `annotation id 17 (annotations[4]) "bbox"[2]`).
fn locate(text: &[u8], tokens: &[(usize, &str)]) -> Option<String> {
    const MARK: &str = "@@maskrcnn: non-finite number@@";
    let mut marked = Vec::with_capacity(text.len() + tokens.len() * 24);
    let mut last = 0;
    for &(offset, token) in tokens {
        marked.extend_from_slice(&text[last..offset]);
        marked.extend_from_slice(format!("\"{MARK}\"").as_bytes());
        last = offset + token.len();
    }
    marked.extend_from_slice(&text[last..]);
    let tree: serde_json::Value = serde_json::from_slice(&marked).ok()?;
    let mut path = Vec::new();
    if !find_mark(&tree, MARK, &mut path) {
        return None;
    }
    Some(describe_path(&tree, &path))
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn find_mark(v: &serde_json::Value, mark: &str, path: &mut Vec<Step>) -> bool {
    match v {
        serde_json::Value::String(s) => s == mark,
        serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, x)| {
            path.push(Step::Index(i));
            let hit = find_mark(x, mark, path);
            if !hit {
                path.pop();
            }
            hit
        }),
        serde_json::Value::Object(map) => map.iter().any(|(k, x)| {
            path.push(Step::Key(k.clone()));
            let hit = find_mark(x, mark, path);
            if !hit {
                path.pop();
            }
            hit
        }),
        _ => false,
    }
}

/// `annotation id 17 (annotations[4]) "bbox"[2]`, or the bare path when the
/// value is not inside a record of a top-level list.
fn describe_path(tree: &serde_json::Value, path: &[Step]) -> String {
    let render = |steps: &[Step]| -> String {
        steps
            .iter()
            .map(|s| match s {
                Step::Key(k) => format!("{k:?}"),
                Step::Index(i) => format!("[{i}]"),
            })
            .collect()
    };
    if let [Step::Key(list), Step::Index(i), rest @ ..] = path {
        let record = tree.get(list).and_then(|l| l.get(*i));
        let kind = match list.as_str() {
            "annotations" => "annotation",
            "images" => "image",
            "categories" => "category",
            other => other,
        };
        let id = record.and_then(|r| r.get("id")).map(|id| format!(" id {id}")).unwrap_or_default();
        return format!("{kind}{id} ({list}[{i}]) field {}", render(rest));
    }
    if let [Step::Index(i), rest @ ..] = path {
        // A bare list (a results file): the i-th entry.
        return format!("entry {i} field {}", render(rest));
    }
    render(path)
}

/// Up to 40 characters of line `line` (1-based) around `column`.
fn context(text: &[u8], line: usize, column: usize) -> Option<String> {
    let line_text = text.split(|&c| c == b'\n').nth(line.checked_sub(1)?)?;
    let column = column.min(line_text.len());
    let start = column.saturating_sub(25);
    let end = (column + 15).min(line_text.len());
    let s = String::from_utf8_lossy(&line_text[start..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let v: serde_json::Value = parse_json(b"\xEF\xBB\xBF{\"a\": 1}").unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn non_finite_numbers_are_named_with_their_record() {
        let text = br#"{"images": [], "annotations": [{"id": 5, "bbox": [1, 2, NaN, 4]}, {"id": 6, "area": Infinity}], "note": "NaN"}"#;
        let e = parse_json::<serde_json::Value>(text).unwrap_err();
        assert!(e.contains(r#"annotation id 5 (annotations[0]) field "bbox"[2] is NaN"#), "{e}");
        assert!(e.contains("2 such values"), "{e}");
    }

    #[test]
    fn other_faults_show_the_text_around_them() {
        let e = parse_json::<serde_json::Value>(br#"{"images": [1, 2,, 3]}"#).unwrap_err();
        assert!(e.contains("near `"), "{e}");
        assert!(e.contains("2,, 3"), "{e}");
    }
}
