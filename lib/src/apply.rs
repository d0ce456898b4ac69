//! Executes a [`Plan`] as one transaction: every table, then every sysctl. If any step fails,
//! everything already written is put back to the snapshot taken before the first write.
//!
//! `iptables-restore --noflush` is atomic per table only, so rollback is ours: the snapshot is
//! the observed owned rules, and restoring it is just planning towards them.

use std::collections::BTreeMap;

use crate::model::Backend;
use crate::observe::{observe, Observed};
use crate::plan::{plan, Plan};
use crate::system::{restore_command, System, SystemError};

/// What went wrong during an apply, and whether the host was put back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{step} failed: {cause}; rolled back every change of this run")]
    RolledBack { step: String, cause: SystemError },
    #[error("{step} failed: {cause}; rollback ALSO failed, the host may be partially changed: {rollback}")]
    RollbackFailed {
        step: String,
        cause: SystemError,
        rollback: String,
    },
}

/// The commands a plan runs, shell-like, for the result's `commands` (also in check mode).
pub fn commands(plan: &Plan, backend: Backend) -> Vec<String> {
    let mut out = Vec::new();
    for table in &plan.tables {
        out.push(format!(
            "{} <<'EOF'",
            restore_command(backend, table.family)
        ));
        out.extend(table.payload().lines().map(str::to_string));
        out.push("EOF".to_string());
    }
    for change in &plan.sysctls {
        out.push(sysctl_command(&change.key, &change.to));
    }
    out
}

fn sysctl_command(key: &str, value: &str) -> String {
    format!("sysctl -w {}={value}", key.replace('/', "."))
}

/// Runs the plan. On failure restores the snapshot (`before`, observed at the start of the run).
pub fn apply(
    plan: &Plan,
    before: &Observed,
    instance: &str,
    sys: &mut dyn System,
) -> Result<(), ApplyError> {
    for (i, table) in plan.tables.iter().enumerate() {
        if let Err(cause) = sys.restore(table.family, &table.payload()) {
            let step = format!(
                "{} {} transaction",
                table.family.label(),
                table.table.name()
            );
            // Tables before this one committed; this one did not (restore is atomic per table).
            return Err(rollback(step, cause, i > 0, 0, plan, before, instance, sys));
        }
    }
    for (i, change) in plan.sysctls.iter().enumerate() {
        if let Err(cause) = sys.write_sysctl(&change.key, &change.to) {
            let step = sysctl_command(&change.key, &change.to);
            return Err(rollback(
                step,
                cause,
                !plan.tables.is_empty(),
                i,
                plan,
                before,
                instance,
                sys,
            ));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn rollback(
    step: String,
    cause: SystemError,
    tables_written: bool,
    sysctls_written: usize,
    plan: &Plan,
    before: &Observed,
    instance: &str,
    sys: &mut dyn System,
) -> ApplyError {
    let mut problems = Vec::new();
    for change in plan.sysctls[..sysctls_written].iter().rev() {
        if let Some(old) = &change.from {
            if let Err(e) = sys.write_sysctl(&change.key, old) {
                problems.push(e.to_string());
            }
        }
    }
    if tables_written {
        match observe(sys, instance, &[]) {
            Ok(now) => {
                let back = plan_back(instance, before, &now);
                for table in &back.tables {
                    if let Err(e) = sys.restore(table.family, &table.payload()) {
                        problems.push(e.to_string());
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        ApplyError::RolledBack { step, cause }
    } else {
        ApplyError::RollbackFailed {
            step,
            cause,
            rollback: problems.join("; "),
        }
    }
}

/// The plan that takes the host from `now` back to the owned rules of `before`.
fn plan_back(instance: &str, before: &Observed, now: &Observed) -> Plan {
    plan(instance, &before.owned, &BTreeMap::new(), now)
}
