//! Booleans and integers as Ansible hands them over. A binary module receives `-e` extra vars
//! and INI inventory values as strings (`"yes"`, `"True"`, `"4321"`); Ansible's own argument
//! spec accepts exactly these spellings for `bool` and `int`, so portfwd does too, and keeps
//! refusing everything else.

use schemars::{json_schema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The strings Ansible's `boolean()` takes as true (compared after lower-casing and trimming).
const TRUE_WORDS: [&str; 6] = ["y", "yes", "on", "1", "true", "t"];
/// The strings it takes as false.
const FALSE_WORDS: [&str; 6] = ["n", "no", "off", "0", "false", "f"];

/// A boolean from `true`/`false`, `1`/`0`, or one of Ansible's words in any case.
pub(crate) fn boolean_of(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Some(true),
            Some(0.0) => Some(false),
            _ => None,
        },
        Value::String(s) => {
            let word = s.trim().to_ascii_lowercase();
            if TRUE_WORDS.contains(&word.as_str()) {
                Some(true)
            } else if FALSE_WORDS.contains(&word.as_str()) {
                Some(false)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// An integer from a JSON number or a decimal string (`"4321"`, `" +7 "`), as Ansible's `int`.
pub(crate) fn integer_of(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64)),
        Value::String(s) => {
            let t = s.trim();
            let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
            if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            t.parse().ok()
        }
        _ => None,
    }
}

fn refused(value: &Value, expected: &str) -> String {
    format!("invalid value {value} (expected {expected})")
}

/// `deserialize_with` for a `bool` field.
pub(crate) fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let value = Value::deserialize(d)?;
    boolean_of(&value).ok_or_else(|| {
        serde::de::Error::custom(refused(
            &value,
            "a boolean: true/false, yes/no, on/off or 1/0",
        ))
    })
}

/// `deserialize_with` for an optional `u8` field.
pub(crate) fn de_opt_u8<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let value = Value::deserialize(d)?;
    if value.is_null() {
        return Ok(None);
    }
    integer_of(&value)
        .and_then(|n| u8::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(refused(&value, "an integer 0-255")))
}

/// The schema of a boolean that may arrive spelled as a string.
pub(crate) fn bool_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-ansible-type": "bool",
        "description": "a boolean; the strings yes/no, on/off, true/false, y/n, t/f, 1/0 (any case) are taken as Ansible takes them",
        "anyOf": [
            {"type": "boolean"},
            {"type": "integer", "enum": [0, 1]},
            {"type": "string", "pattern": "^\\s*([yY]([eE][sS])?|[nN][oO]?|[oO][nN]|[oO][fF][fF]|[tT]([rR][uU][eE])?|[fF]([aA][lL][sS][eE])?|[01])\\s*$"}
        ]
    })
}

/// The schema of a small integer that may arrive as a decimal string.
pub(crate) fn u8_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-ansible-type": "int",
        "description": "protocol number 5-255, as a number or a decimal string",
        "anyOf": [
            {"type": "integer", "minimum": 5, "maximum": 255},
            {"type": "string", "pattern": "^\\s*\\+?[0-9]{1,3}\\s*$"}
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ansible_boolean_spellings_are_taken_and_others_refused() {
        for t in [
            json!(true),
            json!("yes"),
            json!("True"),
            json!("ON"),
            json!("1"),
            json!(1),
            json!(" y "),
        ] {
            assert_eq!(boolean_of(&t), Some(true), "{t}");
        }
        for f in [
            json!(false),
            json!("no"),
            json!("FALSE"),
            json!("off"),
            json!("0"),
            json!(0),
            json!("F"),
        ] {
            assert_eq!(boolean_of(&f), Some(false), "{f}");
        }
        for bad in [
            json!("maybe"),
            json!("2"),
            json!(2),
            json!(""),
            json!(null),
            json!([true]),
            json!("yess"),
        ] {
            assert_eq!(boolean_of(&bad), None, "{bad}");
        }
    }

    #[test]
    fn decimal_strings_are_integers_and_nothing_else_is() {
        assert_eq!(integer_of(&json!("4321")), Some(4321));
        assert_eq!(integer_of(&json!(" +7 ")), Some(7));
        assert_eq!(integer_of(&json!(9.0)), Some(9));
        for bad in [
            json!("0x10"),
            json!("1e3"),
            json!("12a"),
            json!(""),
            json!(9.5),
            json!(true),
        ] {
            assert_eq!(integer_of(&bad), None, "{bad}");
        }
    }
}
