//! transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=None,
//! separators=None, sort_keys=False)`, every option honoured, so that templates which print tool
//! schemas (`tools | tojson(indent=4)`, `tojson(ensure_ascii=False)`) render the bytes Python
//! writes: its separators, its string escapes and its float spelling (`1e+16`, `1e-05`).

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::ErrorKind;
use serde_json::{Number, Value};

type JResult<T> = std::result::Result<T, minijinja::Error>;

fn invalid(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

struct Style {
    ensure_ascii: bool,
    /// Python's `indent`: `None` writes one line; a string (or that many spaces) per level.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

pub(super) fn tojson(value: JValue, kwargs: Kwargs) -> JResult<JValue> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<JValue>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => {
                let n = i64::try_from(v.clone())
                    .map_err(|_| invalid(format!("tojson: indent {v} is not an integer")))?;
                " ".repeat(usize::try_from(n).unwrap_or(0).min(64))
            }
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<JValue>>("separators")? {
        Some(v) if !v.is_none() => {
            let pair: Vec<String> = v
                .try_iter()?
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid("tojson: separators must be two strings"))?;
            match <[String; 2]>::try_from(pair) {
                Ok([a, b]) => (a, b),
                Err(_) => return Err(invalid("tojson: separators must be two strings")),
            }
        }
        // Python's defaults: no space after ',' once lines are indented.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(&value).map_err(|e| invalid(e.to_string()))?;
    let style = Style {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write(&v, &style, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

fn newline(style: &Style, depth: usize, out: &mut String) {
    if let Some(unit) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(unit);
        }
    }
}

fn write(v: &Value, style: &Style, depth: usize, out: &mut String) {
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, depth + 1, out);
                write(item, style, depth + 1, out);
            }
            newline(style, depth, out);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, depth + 1, out);
                write_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write(item, style, depth + 1, out);
            }
            newline(style, depth, out);
            out.push('}');
        }
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
        Value::String(s) => write_str(s, style.ensure_ascii, out),
        Value::Number(n) => write_number(n, out),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Null => out.push_str("null"),
    }
}

/// Python's string escapes: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other controls as
/// `\u00XX`; with `ensure_ascii` everything outside printable ASCII as `\uXXXX` (surrogate
/// pairs above the BMP).
fn write_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Integers as they are; floats as Python's `repr` spells them: the shortest digits that read
/// back, in positional form for exponents -4..16 (with a `.0` when whole), else `d.ddde+XX`.
fn write_number(n: &Number, out: &mut String) {
    let Some(f) = n.as_f64().filter(|_| n.is_f64()) else {
        out.push_str(&n.to_string());
        return;
    };
    if !f.is_finite() {
        // JSON numbers are finite; Python would write NaN/Infinity, which no template needs.
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
        return;
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.25e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    out.push_str(sign);
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!(
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        ));
    } else if exp < 0 {
        out.push_str("0.");
        out.push_str(&"0".repeat((-exp - 1) as usize));
        out.push_str(&digits);
    } else {
        let point = exp as usize + 1;
        if digits.len() <= point {
            out.push_str(&digits);
            out.push_str(&"0".repeat(point - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dumps(v: Value, ensure_ascii: bool, indent: Option<&str>, sort_keys: bool) -> String {
        let style = Style {
            ensure_ascii,
            indent: indent.map(str::to_string),
            item_sep: if indent.is_some() { "," } else { ", " }.to_string(),
            key_sep: ": ".to_string(),
            sort_keys,
        };
        let mut out = String::new();
        write(&v, &style, 0, &mut out);
        out
    }

    /// Expected strings are what CPython 3.11's json.dumps printed for the same values.
    #[test]
    fn matches_python_json_dumps() {
        let v = json!({"b": [1, "é\n\"\u{1}\u{7f}"], "a": {}, "c": [], "d": null, "e": true});
        assert_eq!(
            dumps(v.clone(), false, None, false),
            "{\"b\": [1, \"é\\n\\\"\\u0001\u{7f}\"], \"a\": {}, \"c\": [], \"d\": null, \"e\": true}"
        );
        assert_eq!(
            dumps(json!(["é🎉\u{7f}"]), true, None, false),
            "[\"\\u00e9\\ud83c\\udf89\\u007f\"]"
        );
        assert_eq!(
            dumps(json!({"b": 1, "a": [2]}), false, Some("  "), true),
            "{\n  \"a\": [\n    2\n  ],\n  \"b\": 1\n}"
        );
        let floats = json!([1.0, 0.5, 1e16, 1e15, 1.5e-5, 0.0001, -2.5e-7, 123.456, 1e100, 0.0]);
        assert_eq!(
            dumps(floats, false, None, false),
            "[1.0, 0.5, 1e+16, 1000000000000000.0, 1.5e-05, 0.0001, -2.5e-07, 123.456, 1e+100, 0.0]"
        );
    }
}
