//! The TOML overlay behind [`super::Config::load`]: `--set key=value`
//! parsing, writing a file's or an override's keys over the defaults with
//! each key and type checked against the defaults' shape, and the "did you
//! mean" suggestions of an unknown key.

use super::error::ConfigError;
use crate::text::one_line;
use toml::Value;

/// serde's wording for unsigned integers and enums, said for config users.
pub(super) fn describe_serde_error(msg: &str, key: &str) -> String {
    let msg = one_line(msg);
    let msg = msg.strip_suffix(&format!(" in `{key}`")).unwrap_or(&msg);
    msg.replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
}

pub(super) fn collect_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Table(t) = v {
        for (k, child) in t {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if child.is_table() {
                collect_keys(child, &path, out);
            } else {
                out.push(path);
            }
        }
    }
}

/// Splits `section.key=value`; the value is read as a TOML value (`0.02`,
/// `[512, 640]`, `true`, `"fp16"`) and, failing that, as a bare string
/// (`fp16`), so the common cases need no quoting in a shell.
pub(super) fn parse_override(item: &str) -> Result<(String, Value), ConfigError> {
    let (key, raw) = item.split_once('=').ok_or_else(|| ConfigError::BadOverride(item.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::BadOverride(item.to_string()));
    }
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    };
    Ok((key.to_string(), value))
}

/// `value` under the dotted `key`'s tables (`a.b` → `{a = {b = value}}`).
pub(super) fn nest(key: &str, value: Value) -> Value {
    key.rsplit('.').fold(value, |inner, part| {
        let mut t = toml::Table::new();
        t.insert(part.to_string(), inner);
        Value::Table(t)
    })
}

/// Writes `src` into `dst` key by key, checking each key exists in `schema`
/// (the defaults; `keys` its key paths, for suggestions) and each value has
/// the schema's type. Integers widen to floats, and a scalar given for a
/// list becomes a one-element list.
pub(super) fn overlay(
    dst: &mut Value,
    schema: &Value,
    src: Value,
    prefix: &str,
    origin: &str,
    keys: &[String],
) -> Result<(), ConfigError> {
    let (Value::Table(dst_t), Value::Table(schema_t)) = (dst, schema) else {
        return Ok(());
    };
    let Value::Table(src_t) = src else {
        return Ok(());
    };
    for (k, v) in src_t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(expected) = schema_t.get(&k) else {
            // Name the first full key under an unknown section, so a misspelt
            // section (`modle.num_classes`) gets a full-key suggestion.
            let mut leaves = Vec::new();
            collect_keys(&v, &path, &mut leaves);
            let key = leaves.into_iter().next().unwrap_or(path);
            return Err(ConfigError::UnknownKey { origin: origin.to_string(), closest: closest_keys(&key, keys), key });
        };
        if expected.is_table() {
            if !v.is_table() {
                return Err(wrong_type(origin, &path, expected, &v));
            }
            let slot = dst_t.entry(k.clone()).or_insert_with(|| expected.clone());
            overlay(slot, expected, v, &path, origin, keys)?;
        } else {
            let coerced = coerce(expected, v).map_err(|v| wrong_type(origin, &path, expected, &v))?;
            dst_t.insert(k, coerced);
        }
    }
    Ok(())
}

fn coerce(expected: &Value, v: Value) -> Result<Value, Value> {
    match (expected, v) {
        (Value::Float(_), Value::Integer(i)) => Ok(Value::Float(i as f64)),
        (Value::Array(proto), Value::Array(items)) => {
            let Some(elem) = proto.first() else {
                return Ok(Value::Array(items));
            };
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match coerce(elem, item) {
                    Ok(x) => out.push(x),
                    Err(_) => {
                        let bad = Value::Array(out);
                        return Err(bad);
                    }
                }
            }
            Ok(Value::Array(out))
        }
        (Value::Array(proto), scalar) if !scalar.is_array() && !scalar.is_table() => match proto.first() {
            Some(elem) => coerce(elem, scalar).map(|x| Value::Array(vec![x])),
            None => Ok(Value::Array(vec![scalar])),
        },
        // Keys that take "auto" or a value (`model.num_classes`,
        // `model.mask_on`) are strings in the defaults.
        (Value::String(_), Value::Integer(i)) => Ok(Value::String(i.to_string())),
        (Value::String(_), Value::Boolean(b)) => Ok(Value::String(b.to_string())),
        (Value::String(_), Value::Float(f)) => Ok(Value::String(f.to_string())),
        (e, v) if std::mem::discriminant(e) == std::mem::discriminant(&v) => Ok(v),
        (_, v) => Err(v),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::Table(_) => "a table",
    }
}

fn expected_name(v: &Value) -> String {
    match v {
        Value::Array(items) => match items.first() {
            Some(e) => format!("a list of {}s", type_name(e).trim_start_matches("a ").trim_start_matches("an ")),
            None => "a list".to_string(),
        },
        other => type_name(other).to_string(),
    }
}

fn wrong_type(origin: &str, key: &str, expected: &Value, got: &Value) -> ConfigError {
    let shown = match got {
        Value::Array(_) if matches!(expected, Value::Array(_)) => "a list with an element of another type".to_string(),
        Value::Table(_) | Value::Array(_) => type_name(got).to_string(),
        other => format!("{} ({})", type_name(other), other),
    };
    ConfigError::WrongType {
        origin: origin.to_string(),
        key: key.to_string(),
        expected: expected_name(expected),
        got: shown,
    }
}

/// Up to three of the valid `keys` closest to `key`: by edit distance of the whole
/// path, and any key whose last component matches (a key put in the wrong
/// section).
fn closest_keys(key: &str, keys: &[String]) -> Vec<String> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let mut scored: Vec<(usize, String)> = keys
        .iter()
        .map(|k| {
            let k_leaf = k.rsplit('.').next().unwrap_or(k).to_string();
            let d = if k_leaf == leaf {
                0
            } else {
                strsim::levenshtein(key, k).min(strsim::levenshtein(leaf, &k_leaf) + 1)
            };
            (d, k.clone())
        })
        .collect();
    scored.sort();
    let limit = (key.len() / 3).max(3);
    scored.into_iter().filter(|(d, _)| *d <= limit).take(3).map(|(_, k)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typo_and_wrong_section() {
        let keys = crate::config::Config::keys();
        assert_eq!(closest_keys("solver.base_lrr", &keys)[0], "solver.base_lr");
        assert_eq!(closest_keys("rpn.base_lr", &keys)[0], "solver.base_lr");
        assert!(closest_keys("zzzzzzzzzzzzzzzzzzzzzz.qqqqqqqqqqq", &keys).is_empty());
    }

    #[test]
    fn override_values_parse_as_toml_or_bare_strings() {
        assert_eq!(parse_override("a.b=0.5").unwrap().1, Value::Float(0.5));
        assert_eq!(parse_override("a.b=[1, 2]").unwrap().1, Value::Array(vec![Value::Integer(1), Value::Integer(2)]));
        assert_eq!(parse_override("a.b=fp16").unwrap().1, Value::String("fp16".into()));
        assert_eq!(parse_override("a.b=/data/x y.json").unwrap().1, Value::String("/data/x y.json".into()));
        assert!(parse_override("a.b").is_err());
        assert!(parse_override("a..b=1").is_err());
        assert!(parse_override("=1").is_err());
    }
}
