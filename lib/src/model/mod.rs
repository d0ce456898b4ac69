//! The first stage: the user's params in, a validated [`Config`] out.
//!
//! [`input`] takes the args file or CLI JSON apart (run mode from `_ansible_*` keys),
//! [`params`] holds the wire types and the schema, [`validate`] checks everything at once and
//! names each bad field and value, and [`config`] holds the typed result the rest of the
//! pipeline reads.

pub mod config;
pub mod input;
pub mod params;
pub mod spelling;
pub mod validate;

#[cfg(test)]
mod tests;

pub use config::*;
pub use params::*;
pub use validate::{default_route_protocol, valid_instance, Problem, INSTANCE_RULE};
