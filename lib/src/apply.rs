//! Executes a [`Plan`] as one transaction across iproute2, iptables, sysctls and the stored
//! params. If any step fails, everything already written is put back to the snapshot taken
//! before the first write.
//!
//! Neither `iptables-restore --noflush` (atomic per table only) nor `ip -batch` (stops half
//! way) is a transaction across steps, so rollback is ours: the snapshot is the observed state,
//! and restoring it is just planning towards it.

use crate::compile::Desired;
use crate::model::Backend;
use crate::net::Family;
use crate::observe::{observe, Observed, Scope};
use crate::ownership::Record;
use crate::plan::Plan;
use crate::routing::{IpBatch, Routing};
use crate::rules::Table;
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
    let heredoc =
        |out: &mut Vec<String>, command: String, body: &mut dyn Iterator<Item = String>| {
            out.push(format!("{command} <<'EOF'"));
            out.extend(body);
            out.push("EOF".to_string());
        };
    for batch in &plan.routing.adds {
        heredoc(
            &mut out,
            batch_command(batch),
            &mut batch.lines.iter().cloned(),
        );
    }
    for table in &plan.tables {
        heredoc(
            &mut out,
            restore_command(backend, table.family),
            &mut table.payload().lines().map(str::to_string),
        );
    }
    for (family, table) in &plan.drop_tables {
        out.push(drop_command(*family, *table));
    }
    for change in &plan.sysctls {
        out.push(sysctl_command(&change.key, &change.to));
    }
    for batch in &plan.routing.dels {
        heredoc(
            &mut out,
            batch_command(batch),
            &mut batch.lines.iter().cloned(),
        );
    }
    match &plan.store {
        Some(Some(_)) => out.push("# store params for `portfwd restore`".to_string()),
        Some(None) => out.push("# remove stored params".to_string()),
        None => {}
    }
    out
}

fn batch_command(batch: &IpBatch) -> String {
    format!(
        "ip {} -batch -",
        if batch.family == Family::V4 {
            "-4"
        } else {
            "-6"
        }
    )
}

fn drop_command(family: Family, table: Table) -> String {
    format!(
        "nft delete table {} {}",
        if family == Family::V4 { "ip" } else { "ip6" },
        table.name()
    )
}

fn sysctl_command(key: &str, value: &str) -> String {
    format!("sysctl -w {}={value}", key.replace('/', "."))
}

fn script(batch: &IpBatch) -> String {
    let mut text = batch.lines.join("\n");
    text.push('\n');
    text
}

/// How far execution got, so rollback undoes exactly that.
#[derive(Default)]
struct Progress {
    /// iproute2 or iptables may have changed (a failed `ip -batch` can stop half way).
    touched: bool,
    sysctls_written: usize,
}

/// Runs the plan. On failure restores `before` (observed at the start of the run).
pub fn apply(
    plan: &Plan,
    before: &Observed,
    instance: &str,
    protocol: u8,
    sys: &mut dyn System,
) -> Result<(), ApplyError> {
    let mut progress = Progress::default();
    match execute(plan, &before.record, instance, sys, &mut progress) {
        Ok(()) => Ok(()),
        Err((step, cause)) => Err(rollback(
            step, cause, &progress, plan, before, instance, protocol, sys,
        )),
    }
}

fn execute(
    plan: &Plan,
    recorded: &Record,
    instance: &str,
    sys: &mut dyn System,
    progress: &mut Progress,
) -> Result<(), (String, SystemError)> {
    let batch_step = |b: &IpBatch| format!("{} ({} lines)", batch_command(b), b.lines.len());
    // Write-ahead: record what this run may create before creating it, so a run killed half
    // way still owns what it made; the final record below drops what was not kept.
    if let Some(record) = &plan.record {
        let mut ahead = recorded.clone();
        ahead.addresses.extend(record.addresses.iter().cloned());
        ahead.tables.extend(record.tables.iter().cloned());
        ahead.rules.extend(record.rules.iter().cloned());
        ahead.routes.extend(record.routes.iter().cloned());
        if &ahead != recorded {
            sys.write_record(instance, &ahead)
                .map_err(|e| ("recording what this run creates".to_string(), e))?;
        }
    }
    for batch in &plan.routing.adds {
        progress.touched = true;
        sys.ip_batch(batch.family, &script(batch))
            .map_err(|e| (batch_step(batch), e))?;
    }
    for table in &plan.tables {
        sys.restore(table.family, &table.payload()).map_err(|e| {
            (
                format!(
                    "{} {} transaction",
                    table.family.label(),
                    table.table.name()
                ),
                e,
            )
        })?;
        progress.touched = true;
    }
    for (family, table) in &plan.drop_tables {
        progress.touched = true;
        sys.delete_table(*family, table.name())
            .map_err(|e| (drop_command(*family, *table), e))?;
    }
    for change in &plan.sysctls {
        sys.write_sysctl(&change.key, &change.to)
            .map_err(|e| (sysctl_command(&change.key, &change.to), e))?;
        progress.sysctls_written += 1;
    }
    for batch in &plan.routing.dels {
        progress.touched = true;
        sys.ip_batch(batch.family, &script(batch))
            .map_err(|e| (batch_step(batch), e))?;
    }
    if let Some(record) = &plan.record {
        sys.write_record(instance, record)
            .map_err(|e| ("recording created objects".to_string(), e))?;
    }
    if let Some(stored) = &plan.store {
        sys.write_stored(instance, stored.as_deref())
            .map_err(|e| ("storing params".to_string(), e))?;
    }
    Ok(())
}

/// The desired state that puts the host back as it was observed.
fn snapshot_as_desired(before: &Observed) -> Desired {
    Desired {
        rules: before.owned.clone(),
        routing: Routing {
            addresses: before.routing.owned_addresses(),
            rules: before.routing.owned.rules.clone(),
            routes: before.routing.owned.routes.clone(),
        },
        stored: before.stored.clone(),
        ..Desired::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn rollback(
    step: String,
    cause: SystemError,
    progress: &Progress,
    plan: &Plan,
    before: &Observed,
    instance: &str,
    protocol: u8,
    sys: &mut dyn System,
) -> ApplyError {
    let mut problems = Vec::new();
    for change in plan.sysctls[..progress.sysctls_written].iter().rev() {
        if let Some(old) = &change.from {
            if let Err(e) = sys.write_sysctl(&change.key, old) {
                problems.push(e.to_string());
            }
        }
    }
    if progress.touched {
        match observe(sys, instance, protocol, &[], Scope::ALL) {
            Ok(mut now) => {
                // Addresses this run added are not in the on-disk record yet: own them here so
                // planning back removes them.
                if let Some(record) = &plan.record {
                    now.routing
                        .recorded
                        .extend(record.addresses.iter().cloned());
                    now.record.tables.extend(record.tables.iter().cloned());
                }
                let back =
                    crate::plan::plan(instance, protocol, &snapshot_as_desired(before), &now);
                let mut steps: Vec<Result<(), SystemError>> = Vec::new();
                for batch in &back.routing.adds {
                    steps.push(sys.ip_batch(batch.family, &script(batch)));
                }
                for table in &back.tables {
                    steps.push(sys.restore(table.family, &table.payload()));
                }
                for (family, table) in &back.drop_tables {
                    steps.push(sys.delete_table(*family, table.name()));
                }
                for batch in &back.routing.dels {
                    steps.push(sys.ip_batch(batch.family, &script(batch)));
                }
                if plan.record.is_some() {
                    steps.push(sys.write_record(instance, &before.record));
                }
                problems.extend(
                    steps
                        .into_iter()
                        .filter_map(Result::err)
                        .map(|e| e.to_string()),
                );
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
