//! portfwd: declarative NAT port forwarding for Linux.
//!
//! One straight pipeline ([`converge`]); each stage reads only what earlier stages produced:
//!
//! ```text
//! params ─► model ─► compile ──────────────► Desired ─┐
//!  (input, validate)  (firewall backend, routing,      │
//!                      sysctls)                        ├─► plan ─► Plan::steps ─► apply ─► report
//! host ──► observe (firewall reads, ip -j, sysctls, ─► Observed ┘   (the one      (System,  (result,
//!           record, stored params)                                   order)        rollback) diff)
//! ```
//!
//! The modules are layered, and an arrow only points down (`docs/ARCHITECTURE.md` has the
//! table, `tests/architecture.rs` holds the code to it): the vocabulary ([`net`], [`tools`],
//! [`ownership`], [`model`], [`findings`]), the host boundary ([`system`]), the backends
//! ([`firewall`], pure), the stages, and this file on top.
//!
//! The engine holds no process-global state and prints nothing; the binary in `module/`
//! takes the run lock, calls [`run`] and prints the [`report::Report`].

#![warn(unreachable_pub)]

mod apply;
mod backends;
mod checks;
mod compile;
mod conntrack;
mod converge;
mod doctor;
mod error;
mod findings;
mod firewall;
mod foreign;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod inventory;
mod model;
mod net;
mod observe;
mod ownership;
pub mod phases;
mod plan;
#[cfg(test)]
mod proptests;
mod record_store;
mod report;
mod routing;
mod show;
mod system;
#[cfg(test)]
mod testing;
mod tools;
pub mod trace;

// The public API: what the binary (and the tests that drive it) need, nothing more.
pub use doctor::Diagnosis;
pub use error::Error;
pub use findings::{Finding, Severity};
pub use model::Proto;
pub use model::{
    default_route_protocol, schema, valid_instance, Backend, Config, Params, Problem, RunMode,
    INSTANCE_RULE,
};
pub use net::Cidr;
pub use report::{line_diff, Changes, Diff, Report};
pub use show::{list, name_backends, show, trace_entries, Listed};
pub use system::{default_state_dir, has_net_admin, RealSystem, RunLock, SystemError, NEEDS_ROOT};

/// Converges the host to `config` (or, in check mode, reports what that would change).
pub fn run(config: &Config, mode: RunMode, sys: &mut RealSystem) -> Report {
    converge::run(config, mode, sys)
}

/// What keeps `config`'s forwards from working on this host (it changes nothing).
/// With `probe`, it connects to every TCP backend (sends traffic).
pub fn doctor(config: &Config, probe: bool, sys: &mut RealSystem) -> Result<Diagnosis, Error> {
    doctor::run(config, probe, sys)
}

/// Does `iptables-save` here drive iptables-legacy (whose rules nftables tracing cannot see)?
pub fn iptables_is_legacy(sys: &mut RealSystem) -> bool {
    backends::resolve(sys, tools::IptablesTool::Installed) == tools::IptablesTool::Legacy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::iptables::Iptables;
    use crate::net::Family;
    use crate::testing::{dump_of, FakeHost};

    const PARAMS: &str = r#"{"forwards":[{"name":"web","listen_port":4321,"to":"10.0.2.2:1234"},{"name":"v6","listen_port":80,"to":"[fd00:2::2]:80"}]}"#;

    fn config(json: &str) -> Config {
        Config::from_json(json).unwrap().0
    }

    /// A fake host that already holds what `json` compiles to.
    fn converged(json: &str) -> FakeHost {
        let c = config(json);
        let desired = compile::compile(&c, &Iptables::default());
        let mut sys = FakeHost::default();
        for family in [Family::V4, Family::V6] {
            sys.set_dump(family, &dump_of(&desired.firewall, &c.instance, family));
        }
        for (k, v) in &desired.sysctls {
            sys.state.sysctls.insert(k.clone(), v.clone());
        }
        // As portfwd leaves it: the record names the flavour holding the instance.
        sys.state.record.backend = Some(Backend::IptablesNft);
        sys
    }

    /// `show` decompiles rules spread over per-port sub-chains and shared chains; compiling its
    /// output must give back every chain exactly, in order, or applying it would change the host.
    #[test]
    fn show_of_a_converged_host_compiles_to_the_same_rules() {
        let json = r#"{"forwards":[
            {"name":"r","listen_port":80,"redirect_to_port":8080},
            {"name":"wide","proto":"both","listen_port":"200-700","to":"10.0.2.9"},
            {"name":"late","listen_port":5000,"to":"10.0.2.3:80","local":true},
            {"name":"d","listen_port":81,"to":"10.0.2.2:80"},
            {"name":"v6","listen_port":80,"to":"[fd00:2::2]:80"}],
            "masquerade":[{"name":"lan","source":"192.168.0.0/24"}]}"#;
        let mut sys = converged(json);
        let shown = show::show_on("portfwd", None, false, &mut sys).unwrap();
        let again = compile::compile(&shown.validate().unwrap(), &Iptables::default());
        assert_eq!(
            again.firewall,
            compile::compile(&config(json), &Iptables::default()).firewall
        );
    }

    #[test]
    fn converged_host_gets_no_write_at_all() {
        let mut sys = converged(PARAMS);
        let report = converge::run(&config(PARAMS), RunMode::default(), &mut sys);
        assert!(!report.changed && !report.failed, "{report:?}");
        assert!(report.commands.is_empty());
        assert_eq!(sys.writes(), Vec::<&String>::new());
    }

    /// A kernel older than the nftables backend's maps is refused before anything is read
    /// or written, and the message says what works instead; removal is never refused.
    #[test]
    fn the_nftables_backend_is_refused_on_an_older_kernel() {
        let nft = r#"{"backend":"nftables","forwards":[{"name":"web","listen_port":4321,"to":"10.0.2.2:1234"}]}"#;
        for (release, refused) in [
            ("4.18.0-553.el8_10.x86_64", true),
            ("5.4.0-216-generic", true),
            ("5.10.0-32-amd64", false),
            ("6.1.0-40-amd64", false),
        ] {
            let mut sys = FakeHost::new();
            sys.state
                .sysctls
                .insert("kernel/osrelease".into(), release.into());
            let report = converge::run(&config(nft), RunMode::default(), &mut sys);
            assert_eq!(report.failed, refused, "{release}: {report:?}");
            if refused {
                assert!(
                    report.msg.contains(release) && report.msg.contains("use backend: iptables"),
                    "{}",
                    report.msg
                );
                assert_eq!(sys.writes(), Vec::<&String>::new(), "{release}");
            }
            let absent = config(r#"{"backend":"nftables","state":"absent"}"#);
            let report = converge::run(&absent, RunMode::default(), &mut sys);
            assert!(!report.failed, "{release}: {report:?}");
        }
    }

    #[test]
    fn check_mode_reads_but_never_writes() {
        // Forwarding off in both families.
        let mut sys = FakeHost::new();
        let report = converge::run(
            &config(PARAMS),
            RunMode {
                check: true,
                diff: true,
            },
            &mut sys,
        );
        assert!(report.changed && !report.failed, "{report:?}");
        assert!(
            report.msg.starts_with("check mode, nothing applied"),
            "{}",
            report.msg
        );
        assert_eq!(sys.writes(), Vec::<&String>::new());
        assert!(report
            .diff
            .is_some_and(|d| d.after.contains("forwards.web")));
    }

    #[test]
    fn apply_writes_one_transaction_per_table_then_sysctls() {
        let mut sys = FakeHost::new();
        let v6 = Family::V6.forwarding_sysctl().to_string();
        sys.state.sysctls.insert(v6, "1".into());
        let report = converge::run(&config(PARAMS), RunMode::default(), &mut sys);
        assert!(report.changed && !report.failed, "{report:?}");
        let writes = sys.writes();
        assert!(
            writes[0].starts_with("write-record"),
            "the record is written ahead: {writes:#?}"
        );
        let kinds: Vec<String> = writes
            .iter()
            .filter(|w| !w.starts_with("write-"))
            .map(|w| w.split(" *").next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "restore ipv4",
                "restore ipv4",
                "restore ipv6",
                "restore ipv6",
                "sysctl net/ipv4/ip_forward=1"
            ],
            "{kinds:#?}"
        );
    }

    #[test]
    fn a_failed_step_is_reported_as_rolled_back() {
        let mut sys = FakeHost {
            fail: Some("restore ipv6".into()),
            ..FakeHost::default()
        };
        sys.state
            .sysctls
            .insert("net/ipv4/ip_forward".into(), "1".into());
        sys.state
            .sysctls
            .insert("net/ipv6/conf/all/forwarding".into(), "1".into());
        let report = converge::run(&config(PARAMS), RunMode::default(), &mut sys);
        assert!(report.failed, "{report:?}");
        assert!(
            report.msg.starts_with("ipv6 filter transaction failed")
                && report.msg.contains("rolled back every change"),
            "{}",
            report.msg
        );
        assert!(
            !sys.writes().iter().any(|w| w.starts_with("sysctl")),
            "nothing after the failure"
        );
    }

    #[test]
    fn legacy_tables_warning_on_stderr_is_reported_and_not_parsed() {
        let mut sys = converged(PARAMS);
        sys.save_stderr.insert(
            Family::V4,
            "# Warning: iptables-legacy tables present, use iptables-legacy-save to see them\n"
                .into(),
        );
        let report = converge::run(&config(PARAMS), RunMode::default(), &mut sys);
        assert!(!report.changed, "{report:?}");
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("iptables-legacy tables")),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn foreign_rules_that_look_like_ours_are_never_touched() {
        let mut sys = converged(PARAMS);
        let dump = sys.dump(Family::V4).replace(
            "COMMIT\n*nat",
            "-A INPUT -m comment --comment \"portfwd:fwd:web:deadbeef\" -j ACCEPT\nCOMMIT\n*nat",
        );
        sys.set_dump(Family::V4, &dump);
        let report = converge::run(
            &config(r#"{"state":"absent"}"#),
            RunMode::default(),
            &mut sys,
        );
        assert!(report.changed, "{report:?}");
        let writes = sys.writes();
        assert!(
            writes
                .iter()
                .all(|w| !w.contains("deadbeef") && !w.contains("-D INPUT")),
            "{writes:#?}"
        );
    }
}
