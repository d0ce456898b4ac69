//! The input as it arrives: an Ansible args file or CLI JSON. Top-level `_ansible_*` keys set
//! the run mode and are otherwise ignored; the rest is deserialized and validated whole.

use std::collections::BTreeMap;

use serde::de::value::MapDeserializer;
use serde::Deserialize as _;
use serde_json::value::RawValue;

use super::config::{Config, RunMode};
use super::params::Params;
use super::validate::Problem;
use super::Invalid;

impl Config {
    /// Parses and validates params JSON. Top-level `_ansible_*` keys are read for the run mode
    /// and otherwise ignored, including ones unknown today.
    ///
    /// The top level is split into raw values and each is deserialized straight from its
    /// text: a tree of `serde_json::Value`s first took a third of the memory of a run with
    /// 50,000 forwards.
    pub fn from_json(input: &str) -> Result<(Config, Params, RunMode), Invalid> {
        let mut map: BTreeMap<String, &RawValue> =
            serde_json::from_str(input).map_err(|e| not_an_object(input, &e))?;
        let flag = |key: &str| map.get(key).is_some_and(|v| v.get().trim() == "true");
        let mode = RunMode {
            check: flag("_ansible_check_mode"),
            diff: flag("_ansible_diff"),
        };
        map.retain(|k, _| !k.starts_with("_ansible_"));
        // Without the path first: tracking it costs a tenth of a no-op run at 50,000
        // forwards. Only input that fails is deserialized again, for the path to name.
        let fields = MapDeserializer::<_, serde_json::Error>::new(map.clone().into_iter());
        let params: Params = match Params::deserialize(fields) {
            Ok(params) => params,
            Err(_) => return Err(deserialize_error(map)),
        };
        let config = params.validate()?;
        Ok((config, params, mode))
    }
}

/// The deserialization error of input that failed, with the path of the field at fault.
fn deserialize_error(map: BTreeMap<String, &RawValue>) -> Invalid {
    let fields = MapDeserializer::<_, serde_json::Error>::new(map.into_iter());
    match serde_path_to_error::deserialize::<_, Params>(fields) {
        Ok(_) => Invalid(vec![Problem {
            path: String::new(),
            value: None,
            reason: "the params could not be read".into(),
        }]),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let path = if path == "." { String::new() } else { path };
            Invalid(vec![Problem {
                path,
                value: None,
                reason: with_suggestion(without_position(&inner)),
            }])
        }
    }
}

/// The error without serde_json's " at line L column C": that position is inside one
/// top-level value's text, not the input's; the path names the place instead.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(bare) if e.line() > 0 => bare.to_string(),
        _ => text,
    }
}

/// Why the input is not one JSON object: another JSON value, or not JSON at all.
fn not_an_object(input: &str, e: &serde_json::Error) -> Invalid {
    let reason = match serde_json::from_str::<&RawValue>(input) {
        Err(e) => not_json(input, &e),
        Ok(value) => {
            let what = match value.get().trim_start().as_bytes().first() {
                Some(b'[') => {
                    "a list (one run takes one instance's params: apply each instance on its own)"
                }
                Some(b'"') => "a string",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                Some(b'{') => return Invalid(vec![Problem::whole(not_json(input, e))]),
                _ => "a number",
            };
            format!("params must be one JSON object, not {what}")
        }
    };
    Invalid(vec![Problem::whole(reason)])
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
