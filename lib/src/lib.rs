//! portfwd: declarative NAT port forwarding for Linux.
//!
//! One straight pipeline:
//! params ─► [`model`] (validate) ─► [`compile`] (desired rules) ─┐
//! host ───► [`observe`] (iptables-save, sysctls) ────────────────┴─► [`plan`] ─► [`apply`] ─► [`report`]
//!
//! The engine holds no process-global state and prints nothing; the binary in `module/`
//! takes the run lock, calls [`run`] and prints the [`report::Report`].

pub mod apply;
pub mod checks;
pub mod compile;
pub mod model;
pub mod net;
pub mod observe;
pub mod plan;
pub mod report;
pub mod routing;
pub mod rules;
pub mod system;

use model::{Config, Params, RunMode};
use observe::params_view::params_from_state;
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
    let keys = checks::sysctl_keys(config, &desired);
    let protocol = config.route_protocol;
    let observed = match observe::observe(sys, &config.instance, protocol, &keys) {
        Ok(o) => o,
        Err(e) => return Report::failure(format!("reading the current state failed: {e}")),
    };
    let plan = plan::plan(&config.instance, protocol, &desired, &observed);
    let mut warnings = desired.warnings.clone();
    warnings.extend(observed.warnings.iter().cloned());
    warnings.extend(plan.warnings.iter().cloned());
    warnings.extend(checks::warnings(config, &observed));
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
        let before = params_from_state(
            &observed.owned,
            &observed.routing.owned,
            &config.instance,
            protocol,
            observed.stored.is_some(),
        );
        let after = params_from_state(
            &desired.rules,
            &desired.routing,
            &config.instance,
            protocol,
            desired.stored.is_some(),
        );
        Diff {
            before: state_text(&before, &current),
            after: state_text(&after, &wanted),
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
    } else if let Err(e) = apply::apply(&plan, &observed, &config.instance, protocol, sys) {
        report.failed = true;
        report.msg = e.to_string();
    }
    report
}

/// The instance's current managed state as params; applying them is a no-op.
pub fn show(instance: &str, protocol: Option<u8>, sys: &mut dyn System) -> Result<Params, Error> {
    let protocol = protocol.unwrap_or_else(|| model::default_route_protocol(instance));
    let observed = observe::observe(sys, instance, protocol, &[])?;
    Ok(params_from_state(
        &observed.owned,
        &observed.routing.owned,
        instance,
        protocol,
        observed.stored.is_some(),
    ))
}
