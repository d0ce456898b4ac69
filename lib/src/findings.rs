//! What a check found, as plain data: the backends report their own pitfalls in these terms
//! and the checks stage, doctor and the report only read them.

use crate::model::Forward;

/// How bad a finding is: an error means a forward does not work as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

/// One pitfall found on the host: a run shows its `msg` as a warning; `portfwd doctor` shows
/// all of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Stable id (`forward_hook_drop`, `reply_bypass`, ...).
    pub id: &'static str,
    pub severity: Severity,
    /// The entry it concerns (`forwards.web`), when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    pub msg: String,
    pub fix: String,
}

impl Finding {
    /// A finding about one forward (its entry is `forwards.NAME`).
    pub fn forward(
        id: &'static str,
        severity: Severity,
        forward: &Forward,
        msg: String,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            id,
            severity,
            entry: Some(format!("forwards.{}", forward.name)),
            msg,
            fix: fix.into(),
        }
    }
}
