//! The engine's one error type for what stops before anything is applied; a run's own
//! failures are reported in its [`crate::report::Report`] instead.

use crate::model;
use crate::system::SystemError;

/// Errors before anything is applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad params: every problem, each naming its field and value.
    #[error(transparent)]
    Invalid(#[from] model::Invalid),
    #[error(transparent)]
    System(#[from] SystemError),
    /// `show` (or `doctor` without params) of an instance this host has nothing of.
    #[error("no instance {instance:?} on this host: {}", if .existing.is_empty() { "there is none (portfwd list shows them)".to_string() } else { format!("the instances here are {} (portfwd list shows them)", .existing.join(", ")) })]
    NoSuchInstance {
        instance: String,
        existing: Vec<String>,
    },
}
