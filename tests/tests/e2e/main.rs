//! The end-to-end tests, one binary: real network namespaces, real iptables (both flavours),
//! iproute2, conntrack, ansible-playbook and salt-call, and real traffic. Each module is one
//! suite; run one with `cargo test -p portfwd-e2e --test e2e routing::`.

mod common;

mod ansible;
mod cache;
mod conntrack;
mod converge;
mod defects;
mod doctor;
mod drift;
mod fleet;
mod foreign;
mod forward;
mod lab;
mod nftables;
mod operator;
mod ownership;
mod packaging;
mod pools;
mod records;
mod routing;
mod salt;
mod trace;
