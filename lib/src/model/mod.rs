//! The first stage: the user's params in, a validated [`Config`] out.
//!
//! [`input`] takes the args file or CLI JSON apart (run mode from `_ansible_*` keys),
//! [`earlier`] rebuilds an earlier run's config from this one's (for the read cache),
//! [`params`] holds the wire types and the schema, [`validate`] checks everything at once and
//! names each bad field and value, and [`config`] holds the typed result the rest of the
//! pipeline reads.

pub(crate) mod config;
pub(crate) mod earlier;
pub(crate) mod input;
pub(crate) mod params;
pub(crate) mod spelling;
pub(crate) mod validate;

#[cfg(test)]
mod tests;

pub use crate::ownership::{valid_instance, INSTANCE_RULE};
pub use config::*;
pub use params::*;
pub use validate::{default_route_protocol, Problem};

/// Bad params: every problem, each naming its field and value.
#[derive(Debug, thiserror::Error)]
#[error("invalid params: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Invalid(pub Vec<Problem>);
