//! portfwd: declarative NAT port forwarding for Linux.
//!
//! One straight pipeline:
//! params ─► [`model`] (validate) ─► [`compile`] (desired rules) ─┐
//! host ───► [`observe`] (iptables-save, sysctls) ────────────────┴─► [`plan`] ─► [`apply`] ─► [`report`]
//!
//! The engine holds no process-global state and prints nothing; the binary in `module/`
//! takes the run lock, calls [`run`] and prints the [`report::Report`].

pub mod apply;
pub mod compile;
pub mod model;
pub mod net;
pub mod observe;
pub mod plan;
pub mod report;
pub mod rules;
pub mod system;

use std::net::IpAddr;

use model::{Action, Config, Params, RunMode};
use observe::params_view::params_from_rules;
use report::{state_text, Diff, Report};
use system::{System, SystemError};

/// Errors before anything is applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad params: every problem, each naming its field and value.
    #[error("invalid params: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    System(#[from] SystemError),
}

/// Converges the host to `config` (or, in check mode, reports what that would change).
pub fn run(config: &Config, mode: RunMode, sys: &mut dyn System) -> Report {
    let desired = compile::compile(config);
    let keys = sysctl_keys(config, &desired);
    let observed = match observe::observe(sys, &config.instance, &keys) {
        Ok(o) => o,
        Err(e) => return Report::failure(format!("reading the current state failed: {e}")),
    };
    let plan = plan::plan(
        &config.instance,
        &desired.rules,
        &desired.sysctls,
        &observed,
    );
    let mut warnings = desired.warnings.clone();
    warnings.extend(observed.warnings.iter().cloned());
    warnings.extend(plan.warnings.iter().cloned());
    warnings.extend(localnet_warnings(config, &observed));
    let diff = mode.diff.then(|| {
        let current: Vec<(String, String)> = desired
            .sysctls
            .keys()
            .filter_map(|k| Some((k.clone(), observed.sysctls.get(k)?.clone()?)))
            .collect();
        let wanted: Vec<(String, String)> = desired
            .sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Diff {
            before: state_text(
                &params_from_rules(&observed.owned, &config.instance),
                &current,
            ),
            after: state_text(
                &params_from_rules(&desired.rules, &config.instance),
                &wanted,
            ),
        }
    });
    let mut report = Report {
        changed: !plan.is_empty(),
        failed: false,
        msg: report::summary(&plan),
        diff,
        commands: apply::commands(&plan, config.backend),
        warnings,
        forwards: (&plan.forwards).into(),
        masquerade: (&plan.masquerade).into(),
    };
    if plan.is_empty() {
        report.msg = "no changes".to_string();
    } else if mode.check {
        report.msg = format!("check mode, nothing applied: {}", report.msg);
    } else if let Err(e) = apply::apply(&plan, &observed, &config.instance, sys) {
        report.failed = true;
        report.msg = e.to_string();
    }
    report
}

/// The instance's current managed state as params; applying them is a no-op.
pub fn show(instance: &str, sys: &mut dyn System) -> Result<Params, Error> {
    let observed = observe::observe(sys, instance, &[])?;
    Ok(params_from_rules(&observed.owned, instance))
}

/// Sysctls the run reads: the ones it manages, and `route_localnet` where DNAT targets loopback.
fn sysctl_keys(config: &Config, desired: &compile::Desired) -> Vec<String> {
    let mut keys: Vec<String> = desired.sysctls.keys().cloned().collect();
    for f in loopback_forwards(config) {
        keys.push("net/ipv4/conf/all/route_localnet".to_string());
        if let Some(i) = f.in_interface.as_ref().filter(|i| !i.ends_with('+')) {
            keys.push(format!("net/ipv4/conf/{i}/route_localnet"));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

fn loopback_forwards(config: &Config) -> impl Iterator<Item = &model::Forward> {
    config
        .forwards
        .iter()
        .filter(|f| matches!(f.action, Action::Dnat { addr: IpAddr::V4(a), .. } if a.is_loopback()))
}

fn localnet_warnings(config: &Config, observed: &observe::Observed) -> Vec<String> {
    let on = |key: String| observed.sysctls.get(&key).and_then(|v| v.as_deref()) == Some("1");
    loopback_forwards(config)
        .filter(|f| {
            !on("net/ipv4/conf/all/route_localnet".into())
                && !f.in_interface.as_ref().is_some_and(|i| on(format!("net/ipv4/conf/{i}/route_localnet")))
        })
        .map(|f| format!("forward {:?}: DNAT to a loopback address only works for connections from other hosts when route_localnet=1 on the ingress interface (sysctl net.ipv4.conf.all.route_localnet)", f.name))
        .collect()
}
