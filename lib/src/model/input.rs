//! The input as it arrives: an Ansible args file or CLI JSON. Top-level `_ansible_*` keys set
//! the run mode and are otherwise ignored; the rest is deserialized and validated whole.

use serde_json::Value;

use super::config::{Config, RunMode};
use super::params::Params;
use super::validate::Problem;
use crate::Error;

impl Config {
    /// Parses and validates params JSON. Top-level `_ansible_*` keys are read for the run mode
    /// and otherwise ignored, including ones unknown today.
    pub fn from_json(input: &str) -> Result<(Config, Params, RunMode), Error> {
        let mut value: Value = serde_json::from_str(input).map_err(|e| {
            Error::Invalid(vec![Problem::whole(format!(
                "params are not valid JSON: {e}"
            ))])
        })?;
        let Value::Object(map) = &mut value else {
            return Err(Error::Invalid(vec![Problem::whole(
                "params must be a JSON object",
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
            Error::Invalid(vec![Problem {
                path,
                value: None,
                reason: inner.to_string(),
            }])
        })?;
        let config = params.validate()?;
        Ok((config, params, mode))
    }
}
