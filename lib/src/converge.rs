//! One run, as the pipeline it is: model → compile → observe → plan → apply → report, with
//! the record and the conntrack cleanup as named steps.
//!
//! The orchestration lives here and nowhere else: which backends a run reads and writes (an
//! instance may move between them, see [`crate::backends`]), compiling beside the host reads
//! (skipping the firewall read when the record's read cache proves it, and planning a change
//! from what the cache says was last written, reading after all when that plan needs it), and
//! following the live flows a committed change made stale ([`crate::conntrack`]). Each stage
//! stays a call.

use std::collections::HashMap;

use crate::apply::{self, ApplyError};
use crate::backends::{self, WithBackends};
use crate::checks;
use crate::compile::{self, Desired};
use crate::conntrack;
use crate::findings::Severity;
use crate::firewall::Firewall;
use crate::model::{self, Config, Params, RunMode};
use crate::net::Family;
use crate::observe::{self, Known, Observed, Prelude, Scope};
use crate::ownership::ReadCache;
use crate::phases;
use crate::plan::{self, Plan};
use crate::record_store::Host;
use crate::report::{self, Report, StateView};
use crate::system::SystemError;
use crate::tools::IptablesTool;
use crate::tools::NftDump;

/// Converges the host to `config` (in check mode: reports what that would change).
pub(crate) fn run(config: &Config, mode: RunMode, sys: &mut dyn Host) -> Report {
    // The record says which backend holds the instance: another one than the params ask for
    // is read too and emptied in the same run.
    let prelude = match phases::timed("prelude", || observe::prelude(sys, &config.instance)) {
        Ok(p) => p,
        Err(e) => return read_failed(&e),
    };
    if config.backend.is_nftables() {
        if let Some(refusal) = backends::nftables_unsupported(config, sys) {
            return Report::failure(refusal);
        }
    }
    backends::with_backends(config, prelude, sys, Converge { config, mode })
}

/// The run once its backends are picked.
struct Converge<'a> {
    config: &'a Config,
    mode: RunMode,
}

impl WithBackends for Converge<'_> {
    type Out = Report;
    fn with<F: Firewall>(self, firewall: &F, sys: &mut dyn Host, prelude: Prelude) -> Report {
        converge(firewall, self.config, self.mode, sys, prelude)
    }
}

/// The run's answer when the host could not be read: nothing was changed.
fn read_failed(e: &SystemError) -> Report {
    Report::failure(format!("reading the current state failed: {e}"))
}

fn converge<F: Firewall>(
    firewall: &F,
    config: &Config,
    mode: RunMode,
    sys: &mut dyn Host,
    prelude: Prelude,
) -> Report {
    let (desired, mut observed) = match compile_and_observe(firewall, config, sys, prelude.clone())
    {
        Ok(both) => both,
        Err(e) => return read_failed(&e),
    };
    let protocol = config.route_protocol;
    let mut plan = phases::timed("plan", || {
        plan::plan(firewall, &config.instance, protocol, &desired, &observed)
    });
    // Planned from the record, the edit needs what only a read has: read, and plan again.
    if plan.firewall.needs_read {
        let (keys, scope) = what_to_read(config);
        let read = phases::timed("read", || {
            observe::observe(
                firewall,
                sys,
                prelude,
                Known::Nothing,
                protocol,
                &keys,
                scope,
            )
        });
        observed = match read {
            Ok(observed) => observed,
            Err(e) => return read_failed(&e),
        };
        plan = phases::timed("plan", || {
            plan::plan(firewall, &config.instance, protocol, &desired, &observed)
        });
    }
    if let Some(refusal) = refuse_missing_interfaces(config, &observed) {
        return refusal;
    }
    let warnings = warnings(firewall, config, mode, &desired, &observed, &plan);
    let view = StateView {
        firewall,
        instance: &config.instance,
        protocol,
        desired: &desired,
        observed: &observed,
    };
    let mut report = phases::timed("report", || {
        report::planned(&view, &plan, warnings, mode.diff)
    });
    // A plan with nothing to change may still refresh the record (its read cache, a pruned
    // address): housekeeping, not a change.
    if plan.is_empty() && (plan.record.is_none() || mode.check) {
        free_aside((desired, observed));
        return report;
    }
    if mode.check {
        report.msg = format!("check mode, nothing applied: {}", report.msg);
        free_aside((desired, observed));
        return report;
    }
    let run = apply::Run {
        firewall,
        instance: &config.instance,
        protocol,
        before: &observed,
    };
    match phases::timed("write", || apply::apply(&run, &plan, sys)) {
        Err(e) => failed(&mut report, config, &e),
        Ok(()) => phases::timed("flows", || {
            follow_live_flows(firewall, config, &plan, &observed, sys, &mut report)
        }),
    }
    free_aside((desired, observed));
    report
}

/// Frees a run's objects on a thread of its own: freeing 50,000 forwards' compiled and
/// observed objects took a tenth of a no-op run, and the report need not wait for it (a
/// process that exits first just skips it).
fn free_aside<T: Send + 'static>(objects: T) {
    // On a failed spawn the closure, and the objects with it, are dropped right here.
    let _ = std::thread::Builder::new()
        .name("free".into())
        .spawn(move || drop(objects));
}

/// Compiles on a thread of its own while the host is read: compiling thousands of forwards
/// and reading the host are independent (an iptables-save of 10,000 rules takes ~0.1 s).
/// Only a read cache of the current nf_tables generation waits for the compiled objects: if
/// they are the cached ones, the firewall read is skipped.
fn compile_and_observe<F: Firewall>(
    firewall: &F,
    config: &Config,
    sys: &mut dyn Host,
    prelude: Prelude,
) -> Result<(Desired<F>, Observed<F>), SystemError> {
    let (keys, scope) = what_to_read(config);
    let protocol = config.route_protocol;
    let (desired, observed) = std::thread::scope(|s| {
        let compiled = s.spawn(|| phases::timed("compile", || compile::compile(config, firewall)));
        let join = |c: std::thread::ScopedJoinHandle<'_, Desired<F>>| {
            c.join()
                .unwrap_or_else(|_| compile::compile(config, firewall))
        };
        let read = |sys: &mut dyn Host, prelude, cached| {
            phases::timed("read", || {
                observe::observe(firewall, sys, prelude, cached, protocol, &keys, scope)
            })
        };
        if prelude.cache_is_current() {
            let desired = join(compiled);
            let usable = prelude.usable_cache(desired.read_key);
            let as_desired = usable.is_some();
            let last = match usable {
                Some(_) => None,
                None => phases::timed("earlier", || {
                    last_written(firewall, config, &desired.firewall, &prelude)
                }),
            };
            let known = match (&last, usable) {
                (Some((old, cache)), _) => Known::Cached(old, cache.clone()),
                (None, Some(cache)) => Known::Cached(&desired.firewall, cache),
                (None, None) => Known::Nothing,
            };
            let observed = read(sys, prelude, known).map(|mut o| {
                o.firewall_is_desired = as_desired;
                o
            });
            (desired, observed)
        } else if let Some(dump) = dump_of_recorded_shape(firewall, &prelude, sys) {
            // Dumped while compiling; read as what was last written once that is known.
            let desired = join(compiled);
            let known = phases::timed("earlier", || {
                dumped(
                    firewall,
                    config,
                    &desired.firewall,
                    desired.read_key,
                    &prelude,
                    &dump,
                )
            });
            let observed = read(sys, prelude, known);
            (desired, observed)
        } else {
            let observed = read(sys, prelude, Known::Nothing);
            (join(compiled), observed)
        }
    });
    Ok((desired, observed?))
}

/// Another writer has committed since the read cache was made (so the generation proves
/// nothing), but the cache recorded the shape of the table it held: a netlink dump of the
/// table with that shape, elements included (none when the shape differs: the table is
/// listed).
fn dump_of_recorded_shape<F: Firewall>(
    firewall: &F,
    prelude: &Prelude,
    sys: &mut dyn Host,
) -> Option<NftDump> {
    let shape = prelude.record.read_cache.as_ref()?.read.shape?;
    let table = firewall.dumped_table()?;
    let dump = sys.nft_dump(&table, Some(shape)).ok().flatten()?;
    (dump.shape == shape).then_some(dump)
}

/// What a listing would find, read from a dump of the recorded shape: the cached objects
/// (this run's, when they are the cached digest; else rebuilt from the cached params, as
/// [`last_written`] does), their elements as dumped.
fn dumped<'a, F: Firewall>(
    firewall: &F,
    config: &Config,
    desired: &F::Desired,
    read_key: Option<u32>,
    prelude: &Prelude,
    dump: &NftDump,
) -> Known<'a, F> {
    let Some(cache) = prelude.record.read_cache.as_ref() else {
        return Known::Nothing;
    };
    let observed = if read_key == Some(cache.digest) {
        firewall.observe_dump(desired, dump)
    } else {
        last_written(firewall, config, desired, prelude)
            .and_then(|(last, _)| firewall.observe_dump(&last, dump))
    };
    match observed {
        Some(observed) => Known::Dumped(observed, dump.shape),
        None => Known::Nothing,
    }
}

/// The sysctls and the parts of the host a run of `config` reads besides the firewall.
fn what_to_read(config: &Config) -> (Vec<String>, Scope) {
    let managed = compile::sysctls(config);
    let keys = checks::sysctl_keys(config, &managed);
    let scope = Scope {
        // `absent` reads them too, to name what carries its protocol without a record.
        routing: !config.policy_routes.is_empty()
            || config.state == model::State::Absent
            || managed.contains_key(Family::V6.forwarding_sysctl()),
        addresses: checks::names_interfaces(config) || checks::needs_addresses(config),
        other_filters: checks::reads_other_filters(config),
        iptables_in_use: IptablesTool::of(config.backend),
    };
    (keys, scope)
}

/// What the firewall holds while the read cache is current but was made for other objects:
/// what the cached params compile to, when they compile to the cached digest (the same
/// portfwd, and the backend the params name). A change is then planned from it and writes
/// only the delta: no listing of thousands of forwards. When that edit needs what only a read
/// has (a rule handle; see [`crate::firewall::FirewallPlan::needs_read`]), the run reads after
/// all.
fn last_written<F: Firewall>(
    firewall: &F,
    config: &Config,
    desired: &F::Desired,
    prelude: &Prelude,
) -> Option<(F::Desired, ReadCache)> {
    if !firewall.plans_from_record() {
        return None;
    }
    let cache = prelude.record.read_cache.as_ref()?;
    let params = cache.params.as_deref()?;
    // Where only forwards differ, rebuilt from this run's config and objects: only the
    // changed forwards are parsed and compiled.
    let (objects, key) = match config.earlier(params) {
        Some((old, changed)) => compile::recompile_firewall(&old, firewall, desired, &changed),
        None => {
            let old = Config::from_json(params).ok()?.0;
            // The cached objects are the backend's the params name now (a move reads).
            if old.instance != config.instance || old.backend != config.backend {
                return None;
            }
            let compiled = compile::compile(&old, firewall);
            (compiled.firewall, compiled.read_key)
        }
    };
    (key == Some(cache.digest)).then(|| (objects, cache.clone()))
}

/// An address or route on a missing interface would fail halfway through the apply: refused
/// before anything is written, the same way in check mode.
fn refuse_missing_interfaces<F: Firewall>(
    config: &Config,
    observed: &Observed<F>,
) -> Option<Report> {
    let missing: Vec<String> = checks::missing_interfaces(config, observed)
        .into_iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| format!("{} ({})", f.msg, f.fix))
        .collect();
    (!missing.is_empty()).then(|| {
        Report::failure(format!(
            "invalid params for this host, nothing applied: {}",
            missing.join("; ")
        ))
    })
}

/// Every stage's warnings, then the checks of the host.
fn warnings<F: Firewall>(
    firewall: &F,
    config: &Config,
    mode: RunMode,
    desired: &Desired<F>,
    observed: &Observed<F>,
    plan: &Plan,
) -> Vec<String> {
    let mut warnings = desired.warnings.clone();
    warnings.extend(observed.warnings.iter().cloned());
    warnings.extend(plan.warnings.iter().cloned());
    warnings.extend(checks::warnings(config, firewall, observed));
    // What the host cannot show either way (a backend that must route replies back) is a
    // reminder for whoever reviews a change, not a warning on every converged run.
    if mode.check {
        warnings.extend(checks::reminders(config, observed));
    }
    warnings
}

/// A failed apply: rolled back, the host is as it was and nothing changed; a failed rollback
/// may have left changes behind.
fn failed(report: &mut Report, config: &Config, e: &ApplyError) {
    report.failed = true;
    report.changed = matches!(e, ApplyError::RollbackFailed { .. });
    report.msg = report::apply_failure(config, e);
}

/// After a committed change, deletes the conntrack entries it made stale (see [`conntrack`]).
fn follow_live_flows<F: Firewall>(
    firewall: &F,
    config: &Config,
    plan: &Plan,
    observed: &Observed<F>,
    sys: &mut dyn Host,
    report: &mut Report,
) {
    let changed = plan.forwards();
    if changed.count() == 0 {
        return;
    }
    // Only the changed forwards' old selves are needed: one change among thousands decompiles
    // and validates one forward.
    let names: std::collections::HashSet<&str> = changed
        .added
        .iter()
        .chain(&changed.updated)
        .chain(&changed.removed)
        .map(String::as_str)
        .collect();
    let state = firewall.snapshot(&observed.firewall);
    let entries = firewall.decompile_some(&config.instance, &state, &names);
    let old_params = Params {
        instance: config.instance.clone(),
        // What the backend supports is validated too (source-hash, persistence).
        backend: config.backend,
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
    let by_name = |list: &'_ [model::Forward]| -> HashMap<String, usize> {
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
