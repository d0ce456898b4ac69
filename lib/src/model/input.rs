//! The input as it arrives: an Ansible args file or CLI JSON. Top-level `_ansible_*` keys set
//! the run mode and are otherwise ignored; the rest is deserialized and validated whole.

use serde_json::Value;

use super::config::{Config, RunMode};
use super::params::Params;
use super::validate::Problem;
use super::Invalid;

impl Config {
    /// Parses and validates params JSON. Top-level `_ansible_*` keys are read for the run mode
    /// and otherwise ignored, including ones unknown today.
    pub fn from_json(input: &str) -> Result<(Config, Params, RunMode), Invalid> {
        let mut value: Value = serde_json::from_str(input)
            .map_err(|e| Invalid(vec![Problem::whole(not_json(input, &e))]))?;
        let what = match &value {
            Value::Object(_) => None,
            Value::Array(_) => {
                Some("a list (one run takes one instance's params: apply each instance on its own)")
            }
            Value::String(_) => Some("a string"),
            Value::Number(_) => Some("a number"),
            Value::Bool(_) => Some("a boolean"),
            Value::Null => Some("null"),
        };
        if let Some(what) = what {
            return Err(Invalid(vec![Problem::whole(format!(
                "params must be one JSON object, not {what}"
            ))]));
        }
        let Value::Object(map) = &mut value else {
            return Err(Invalid(vec![Problem::whole(
                "params must be one JSON object",
            )]));
        };
        let flag = |map: &serde_json::Map<String, Value>, key: &str| {
            matches!(map.get(key), Some(Value::Bool(true)))
        };
        let mode = RunMode {
            check: flag(map, "_ansible_check_mode"),
            diff: flag(map, "_ansible_diff"),
        };
        map.retain(|k, _| !k.starts_with("_ansible_"));
        let params: Params = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let path = if path == "." { String::new() } else { path };
            Invalid(vec![Problem {
                path,
                value: None,
                reason: with_suggestion(inner.to_string()),
            }])
        })?;
        let config = params.validate()?;
        Ok((config, params, mode))
    }
}

/// Why the input is not JSON; text that does not even start like JSON is most likely YAML.
fn not_json(input: &str, e: &serde_json::Error) -> String {
    let start = input.trim_start().chars().next();
    if matches!(start, Some('{' | '[' | '"') | None) {
        format!("params must be one JSON object, and this is not valid JSON: {e}")
    } else {
        format!("params must be one JSON object; this is not JSON (YAML? give the params as JSON, e.g. converted with `yq -o json`): {e}")
    }
}

/// serde's "unknown field `listen_prot`, expected one of `name`, ..." (or "unknown variant"),
/// with the closest expected name when one is near: "; did you mean `listen_port`?".
fn with_suggestion(reason: String) -> String {
    if !reason.starts_with("unknown field") && !reason.starts_with("unknown variant") {
        return reason;
    }
    let mut names = reason.split('`').skip(1).step_by(2);
    let Some(unknown) = names.next() else {
        return reason;
    };
    let near = names
        .map(|n| (strsim::damerau_levenshtein(unknown, n), n))
        .filter(|(d, n)| *d <= (n.len() / 3).max(1))
        .min();
    match near {
        Some((_, name)) => format!("{reason}; did you mean `{name}`?"),
        None => reason,
    }
}
