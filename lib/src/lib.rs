//! portfwd: declarative NAT port forwarding for Linux.
//!
//! One straight pipeline; each stage reads only what earlier stages produced:
//!
//! ```text
//! params ─► model ─► compile ──────────────► Desired ─┐
//!  (input, validate)  (firewall backend, routing,      │
//!                      sysctls)                        ├─► plan ─► Plan::steps ─► apply ─► report
//! host ──► observe (firewall reads, ip -j, sysctls, ─► Observed ┘   (the one      (System,  (result,
//!           record, stored params)                                   order)        rollback) diff)
//! ```
//!
//! [`firewall`] is the seam to the packet-filter backend (iptables today): compile, observe
//! and plan call it for the firewall objects and do the rest themselves. [`ownership`] says
//! what is ours (the comment grammar, the record); [`system`] is the boundary to the host.
//! After a committed change [`conntrack`] deletes the flows the change made stale.
//!
//! The engine holds no process-global state and prints nothing; the binary in `module/`
//! takes the run lock, calls [`run`] and prints the [`report::Report`].

mod apply;
mod backends;
mod checks;
mod compile;
mod conntrack;
mod doctor;
mod firewall;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod inventory;
mod model;
mod net;
mod observe;
mod ownership;
mod plan;
#[cfg(test)]
mod proptests;
mod record_store;
mod report;
mod routing;
mod system;
#[cfg(test)]
mod testing;
pub mod trace;

// The public API: what the binary (and the tests that drive it) need, nothing more.
pub use checks::{Finding, Severity};
pub use doctor::Diagnosis;
pub use model::Proto;
pub use model::{
    default_route_protocol, schema, valid_instance, Backend, Config, Params, Problem, RunMode,
    INSTANCE_RULE,
};
pub use net::Cidr;
pub use report::{line_diff, Changes, Diff, Report};
pub use system::{default_state_dir, has_net_admin, RealSystem, RunLock, SystemError, NEEDS_ROOT};

use firewall::migrate::Moving;
use firewall::Firewall;
use report::decompile::params_from_state;
use report::StateView;
use system::System;

/// Errors before anything is applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad params: every problem, each naming its field and value.
    #[error("invalid params: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<model::Problem>),
    #[error(transparent)]
    System(#[from] SystemError),
    /// `show` (or `doctor` without params) of an instance this host has nothing of.
    #[error("no instance {instance:?} on this host: {}", if .existing.is_empty() { "there is none (portfwd list shows them)".to_string() } else { format!("the instances here are {} (portfwd list shows them)", .existing.join(", ")) })]
    NoSuchInstance {
        instance: String,
        existing: Vec<String>,
    },
}

/// Converges the host to `config` (or, in check mode, reports what that would change).
pub fn run(config: &Config, mode: RunMode, sys: &mut RealSystem) -> Report {
    run_on(config, mode, sys)
}

/// [`run`] against any host (the fake one in unit tests).
pub(crate) fn run_on(config: &Config, mode: RunMode, sys: &mut dyn System) -> Report {
    // The record says which backend holds the instance: another one than the params ask for
    // is read too and emptied in the same run (see [`backends`]).
    let prelude = match observe::prelude(sys, &config.instance) {
        Ok(p) => p,
        Err(e) => return Report::failure(format!("reading the current state failed: {e}")),
    };
    if config.backend.is_nftables() {
        if let Some(refusal) = backends::nftables_unsupported(config, sys) {
            return Report::failure(refusal);
        }
        let moving = backends::for_nftables(backends::Run::of(config), &prelude, sys);
        run_with(&moving, config, mode, sys, prelude)
    } else {
        let tool = system::IptablesTool::of(config.backend);
        let moving = backends::for_iptables(backends::Run::of(config), &prelude, tool, sys);
        run_with(&moving, config, mode, sys, prelude)
    }
}

fn run_with<F: Firewall>(
    firewall: &F,
    config: &Config,
    mode: RunMode,
    sys: &mut dyn System,
    prelude: observe::Prelude,
) -> Report {
    let managed = compile::sysctls(config);
    let keys = checks::sysctl_keys(config, &managed);
    let protocol = config.route_protocol;
    let scope = observe::Scope {
        // `absent` reads them too, to name what carries its protocol without a record.
        routing: !config.policy_routes.is_empty()
            || config.state == model::State::Absent
            || managed.contains_key(net::Family::V6.forwarding_sysctl()),
        addresses: checks::names_interfaces(config) || checks::needs_addresses(config),
        other_filters: checks::reads_other_filters(config),
    };
    // Compiling thousands of forwards and reading the host are independent: compile on a
    // thread of its own while the reads (an iptables-save of 10,000 rules takes ~0.1 s) run.
    // Only a read cache of the current nf_tables generation waits for the compiled objects:
    // if they are the cached ones, the firewall read is skipped.
    let (desired, observed) = std::thread::scope(|s| {
        let compiled = s.spawn(|| compile::compile(config, firewall));
        let join = |c: std::thread::ScopedJoinHandle<'_, compile::Desired<F>>| {
            c.join()
                .unwrap_or_else(|_| compile::compile(config, firewall))
        };
        let read = |sys: &mut dyn System, prelude, cached| {
            observe::observe(firewall, sys, prelude, cached, protocol, &keys, scope)
        };
        if prelude.cache_is_current() {
            let desired = join(compiled);
            let cached = prelude
                .usable_cache(desired.read_key)
                .map(|cache| (&desired.firewall, cache));
            let observed = read(sys, prelude, cached);
            (desired, observed)
        } else {
            let observed = read(sys, prelude, None);
            (join(compiled), observed)
        }
    });
    let observed = match observed {
        Ok(o) => o,
        Err(e) => return Report::failure(format!("reading the current state failed: {e}")),
    };
    // An address or route on a missing interface would fail halfway through the apply: refuse
    // it now, the same way in check mode.
    let missing: Vec<String> = checks::missing_interfaces(config, &observed)
        .into_iter()
        .filter(|f| f.severity == checks::Severity::Error)
        .map(|f| format!("{} ({})", f.msg, f.fix))
        .collect();
    if !missing.is_empty() {
        return Report::failure(format!(
            "invalid params for this host, nothing applied: {}",
            missing.join("; ")
        ));
    }
    let plan = plan::plan(firewall, &config.instance, protocol, &desired, &observed);
    let mut warnings = desired.warnings.clone();
    warnings.extend(observed.warnings.iter().cloned());
    warnings.extend(plan.warnings.iter().cloned());
    warnings.extend(checks::warnings(config, firewall, &observed));
    // What the host cannot show either way (a backend that must route replies back) is a
    // reminder for whoever reviews a change, not a warning on every converged run.
    if mode.check {
        warnings.extend(checks::reminders(config, &observed));
    }
    let view = StateView {
        firewall,
        instance: &config.instance,
        protocol,
        desired: &desired,
        observed: &observed,
    };
    let mut report = report::planned(&view, &plan, warnings, mode.diff);
    // A plan with nothing to change may still refresh the record (its read cache, a pruned
    // address): housekeeping, not a change.
    if plan.is_empty() && (plan.record.is_none() || mode.check) {
        return report;
    }
    if mode.check {
        report.msg = format!("check mode, nothing applied: {}", report.msg);
        return report;
    }
    let run = apply::Run {
        firewall,
        instance: &config.instance,
        protocol,
        before: &observed,
    };
    if let Err(e) = apply::apply(&run, &plan, sys) {
        report.failed = true;
        // Rolled back, the host is as it was: nothing changed. A failed rollback may have
        // left changes behind.
        report.changed = matches!(*e, apply::ApplyError::RollbackFailed { .. });
        report.msg = report::apply_failure(config, &e);
    } else {
        follow_live_flows(firewall, config, &plan, &observed, sys, &mut report);
    }
    report
}

/// After a committed change, deletes the conntrack entries it made stale (see [`conntrack`]).
fn follow_live_flows<F: Firewall>(
    firewall: &F,
    config: &Config,
    plan: &plan::Plan,
    observed: &observe::Observed<F>,
    sys: &mut dyn System,
    report: &mut Report,
) {
    let changed = plan.forwards();
    if changed.count() == 0 {
        return;
    }
    let entries = firewall.decompile(&config.instance, &firewall.snapshot(&observed.firewall));
    let old_params = Params {
        instance: config.instance.clone(),
        forwards: entries.forwards,
        ..Params::default()
    };
    // The owned rules decompile to valid params; if they ever did not, no old forward is
    // known and only new forwards' flows are considered.
    let old: Vec<model::Forward> = old_params
        .validate()
        .map(|c| c.forwards)
        .unwrap_or_default();
    let new: &[model::Forward] = if config.state == model::State::Absent {
        &[]
    } else {
        &config.forwards
    };
    // By name, so a change of thousands of forwards (a new conn_mark) stays linear.
    let by_name = |list: &'_ [model::Forward]| -> std::collections::HashMap<String, usize> {
        list.iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect()
    };
    let (old_index, new_index) = (by_name(&old), by_name(new));
    let changes: Vec<conntrack::ForwardChange> = changed
        .added
        .iter()
        .chain(&changed.updated)
        .chain(&changed.removed)
        .map(|name| conntrack::ForwardChange {
            old: old_index.get(name).map(|&i| &old[i]),
            new: new_index.get(name).map(|&i| &new[i]),
        })
        .collect();
    // TCP forwards without reset_connections have no flow to reset: nothing to read.
    if changes.iter().all(|c| c.tables().is_empty()) {
        return;
    }
    // A plain forwarder's run did not read the addresses; a change that resets flows does.
    let local: Vec<std::net::IpAddr> = if observed.addresses_read {
        observed.routing.present.iter().map(|a| a.addr).collect()
    } else {
        match sys.ip_json(&["addr", "show"]) {
            Ok(text) => observe::iproute::parse_addresses(&text)
                .into_iter()
                .map(|a| a.addr)
                .collect(),
            Err(e) => {
                report.warnings.push(format!(
                    "reading addresses for the conntrack reset failed: {e}"
                ));
                Vec::new()
            }
        }
    };
    let reset = conntrack::reset(&changes, &local, sys);
    if let Some(summary) = reset.summary() {
        report.msg = format!("{}; {summary}", report.msg);
    }
    report.commands.extend(reset.commands);
    report.warnings.extend(reset.warnings);
}

/// What keeps `config`'s forwards from working on this host (it changes nothing).
/// With `probe`, it connects to every TCP backend (sends traffic).
pub fn doctor(config: &Config, probe: bool, sys: &mut RealSystem) -> Result<Diagnosis, Error> {
    // The backends a run would read, so what another backend or flavour still holds is
    // reported (`not_applied`) as the run would move it.
    let prelude = observe::prelude(sys, &config.instance)?;
    if config.backend.is_nftables() {
        let moving = backends::for_nftables(backends::Run::of(config), &prelude, sys);
        doctor::diagnose(&moving, config, probe, sys)
    } else {
        let tool = system::IptablesTool::of(config.backend);
        let moving = backends::for_iptables(backends::Run::of(config), &prelude, tool, sys);
        doctor::diagnose(&moving, config, probe, sys)
    }
}

/// Does `iptables-save` here drive iptables-legacy (whose rules nftables tracing cannot see)?
pub fn iptables_is_legacy(sys: &mut RealSystem) -> bool {
    backends::resolve(sys, system::IptablesTool::Installed) == system::IptablesTool::Legacy
}

/// The forwards an instance has installed, to label its rules in a trace.
pub fn trace_entries(instance: &str, sys: &mut RealSystem) -> Result<trace::Entries, Error> {
    let config = show(instance, None, sys)?.validate()?;
    Ok(config
        .forwards
        .iter()
        .map(|f| {
            (
                instance.to_string(),
                f.name.clone(),
                f.protos.clone(),
                f.listen_port,
            )
        })
        .collect())
}

/// One instance as `portfwd list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub instance: String,
    /// The backend holding its entries, as the params name it (`iptables` when it holds none).
    pub backend: Backend,
    pub forwards: usize,
    pub masquerade: usize,
    pub addresses: usize,
    pub policy_routes: usize,
    /// Its params are stored for `portfwd restore`.
    pub persist: bool,
    /// Applying its stored params (or, without stored params, its installed state as params,
    /// which finds drift of portfwd's own objects) would change nothing. None when that could
    /// not be found out (see `msg`).
    pub converged: Option<bool>,
    /// `stored params` or `installed state`.
    pub compared_with: &'static str,
    /// What applying would change, or why it could not be found out.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub msg: String,
}

/// Every instance on this host (see [`inventory`]), sorted by name. It changes nothing.
pub fn list(sys: &mut RealSystem) -> Result<Vec<Listed>, Error> {
    let names = instances(sys)?;
    let mut out = Vec::new();
    for instance in names {
        let stored = sys.read_stored(&instance)?;
        let stored_config = stored
            .as_deref()
            .map(|text| Config::from_json(text).map(|(config, _, _)| config));
        let protocol = match &stored_config {
            Some(Ok(config)) => Some(config.route_protocol),
            _ => None,
        };
        let shown = show(&instance, protocol, sys)?;
        let (compared_with, against) = match stored_config {
            Some(parsed) => ("stored params", parsed),
            None => ("installed state", shown.validate()),
        };
        let (converged, msg) = match against {
            Err(e) => (None, e.to_string()),
            Ok(config) => {
                let mut host = sys.with_backend(config.backend());
                let report = run(
                    &config,
                    RunMode {
                        check: true,
                        diff: false,
                    },
                    &mut host,
                );
                match (report.failed, report.changed) {
                    (true, _) => (None, report.msg),
                    (false, true) => (Some(false), report.msg),
                    (false, false) => (Some(true), String::new()),
                }
            }
        };
        out.push(Listed {
            backend: shown.backend,
            forwards: shown.forwards.len(),
            masquerade: shown.masquerade.len(),
            addresses: shown.addresses.len(),
            policy_routes: shown.policy_routes.len(),
            persist: stored.is_some(),
            converged,
            compared_with,
            msg,
            instance,
        });
    }
    Ok(out)
}

/// The names of every instance on this host: stored, recorded, or named in the firewall.
fn instances(sys: &mut RealSystem) -> Result<std::collections::BTreeSet<String>, Error> {
    let mut known = Vec::new();
    for name in sys.stored_instances()? {
        if sys.stored_namespace(&name)?.1 {
            known.push(name);
        }
    }
    known.extend(sys.recorded_instances()?);
    Ok(inventory::names(sys, known))
}

/// The instance's current managed state as params; applying them is a no-op.
/// The backend is the one the record names, else the one `sys` was made for. An instance the
/// host has nothing of (no entry, no record, no stored params, no object named for it) is an
/// error naming the instances there are.
pub fn show(instance: &str, protocol: Option<u8>, sys: &mut RealSystem) -> Result<Params, Error> {
    let nftables = sys.backend().is_nftables();
    let params = show_on(instance, protocol, nftables, sys)?;
    let holds_nothing = params.forwards.is_empty()
        && params.masquerade.is_empty()
        && params.addresses.is_empty()
        && params.policy_routes.is_empty();
    if holds_nothing {
        let existing = instances(sys)?;
        if !existing.contains(instance) {
            return Err(Error::NoSuchInstance {
                instance: instance.to_string(),
                existing: existing.into_iter().collect(),
            });
        }
    }
    Ok(params)
}

/// [`show`] against any host.
fn show_on(
    instance: &str,
    protocol: Option<u8>,
    nftables: bool,
    sys: &mut dyn System,
) -> Result<Params, Error> {
    let prelude = observe::prelude(sys, instance)?;
    // Every backend and flavour is read: what is named for the instance is its own, record
    // or not (as for `absent`).
    let all = backends::Run {
        instance,
        absent: true,
    };
    let held_by = prelude.record.backend.as_deref();
    if held_by == Some("nftables") || (held_by.is_none() && nftables) {
        let all = backends::for_nftables(all, &prelude, sys);
        show_with(&all, instance, protocol, sys, prelude)
    } else {
        // The flavour the record names, with the tools as installed when they drive it.
        let tool = match held_by.and_then(system::IptablesTool::from_name) {
            Some(named) if named != backends::resolve(sys, system::IptablesTool::Installed) => {
                named
            }
            _ => system::IptablesTool::Installed,
        };
        let all = backends::for_iptables(all, &prelude, tool, sys);
        show_with(&all, instance, protocol, sys, prelude)
    }
}

fn show_with<N: Firewall, O: Firewall>(
    firewall: &Moving<N, O>,
    instance: &str,
    protocol: Option<u8>,
    sys: &mut dyn System,
    prelude: observe::Prelude,
) -> Result<Params, Error> {
    let protocol = protocol.unwrap_or_else(|| model::default_route_protocol(instance));
    let observed = observe::observe(
        firewall,
        sys,
        prelude,
        None,
        protocol,
        &[],
        observe::Scope::ALL,
    )?;
    let state = firewall.snapshot(&observed.firewall);
    // Without a record, policy routes the stored params declare are the instance's too.
    let (routing, _) = plan::record::taken_back(&routing::Routing::default(), &observed, protocol);
    let mut params = params_from_state(
        firewall.decompile(instance, &state),
        &routing.owned,
        instance,
        protocol,
        observed.stored.is_some(),
    );
    // The backend that holds the entries (the first that does), by the name the params use
    // for it; iptables as installed is the default.
    let installed = backends::resolve(sys, system::IptablesTool::Installed);
    params.backend = match firewall.held_by(&state) {
        Some("nftables") => Backend::Nftables,
        Some(name) => match system::IptablesTool::from_name(name) {
            Some(tool) if tool != installed && tool != system::IptablesTool::Installed => {
                match tool {
                    system::IptablesTool::Legacy => Backend::IptablesLegacy,
                    _ => Backend::IptablesNft,
                }
            }
            _ => Backend::Iptables,
        },
        None => Backend::Iptables,
    };
    Ok(params)
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
        sys.state.record.backend = Some("iptables-nft".into());
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
        let shown = show_on("portfwd", None, false, &mut sys).unwrap();
        let again = compile::compile(&shown.validate().unwrap(), &Iptables::default());
        assert_eq!(
            again.firewall,
            compile::compile(&config(json), &Iptables::default()).firewall
        );
    }

    #[test]
    fn converged_host_gets_no_write_at_all() {
        let mut sys = converged(PARAMS);
        let report = run_on(&config(PARAMS), RunMode::default(), &mut sys);
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
            let report = run_on(&config(nft), RunMode::default(), &mut sys);
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
            let report = run_on(&absent, RunMode::default(), &mut sys);
            assert!(!report.failed, "{release}: {report:?}");
        }
    }

    #[test]
    fn check_mode_reads_but_never_writes() {
        // Forwarding off in both families.
        let mut sys = FakeHost::new();
        let report = run_on(
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
        let report = run_on(&config(PARAMS), RunMode::default(), &mut sys);
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
        let report = run_on(&config(PARAMS), RunMode::default(), &mut sys);
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
        let report = run_on(&config(PARAMS), RunMode::default(), &mut sys);
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
        let report = run_on(
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
