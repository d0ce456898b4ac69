//! portfwd-lab: client/proxy/backend topologies in network namespaces, the real `portfwd`
//! binary applied inside them, and traffic that proves what the backend saw.

pub mod netns;
pub mod portfwd;
pub mod shims;
pub mod topology;
pub mod traffic;

pub use netns::{addr, link, LabError, Netns};
pub use portfwd::{Portfwd, RunResult};
pub use traffic::{probe, Proto, Server, TcpSession};
