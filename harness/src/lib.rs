//! portfwd-lab: client/proxy/backend topologies in network namespaces, the real `portfwd`
//! binary applied inside them, and traffic that proves what the backend saw.
//!
//! [`netns`] makes namespaces, [`traffic`] runs echo servers and probes inside them,
//! [`scenario`] reads the YAML scenarios, [`lab`] builds their topologies and [`runner`]
//! executes their steps. [`topology`] is the fixed three-node topology of the e2e tests.

pub mod lab;
pub mod netns;
pub mod portfwd;
pub mod runner;
pub mod scenario;
pub mod shims;
pub mod topology;
pub mod traffic;

pub use netns::{addr, link, LabError, Netns};
pub use portfwd::{Portfwd, RunResult};
pub use traffic::{probe, Proto, Server, TcpSession, UdpFlow};
