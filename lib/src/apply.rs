//! The fifth stage: runs a plan's [`Step`]s through [`System`], in the order
//! [`Plan::steps`] gives, as one transaction across iproute2, the firewall, sysctls, the record
//! and the stored params. If any step fails, everything already written is put back to the
//! state observed before the run.
//!
//! Neither `iptables-restore --noflush` (atomic per table only) nor `ip -batch` (stops half
//! way) is a transaction across steps, so rollback is ours: the sysctls written are put back
//! in reverse, and the rest is planned back to the snapshot from a fresh read
//! ([`reread_for_rollback`], the one place apply reads the host).

use crate::compile::Desired;
use crate::firewall::{Firewall, TableDrop, Tool};
use crate::observe::{self, Observed, Scope};
use crate::ownership::{holds_only_chains, Record};
use crate::plan::iproute::IpBatch;
use crate::plan::{Plan, Step};
use crate::record_store::Host;
use crate::routing::Routing;
use crate::system::SystemError;

/// What went wrong during an apply, and whether the host was put back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("{step} failed: {cause}; rolled back every change of this run")]
    RolledBack {
        step: String,
        cause: SystemError,
        /// The `ip -batch` line the system refused, when it says which.
        line: Option<String>,
    },
    #[error("{step} failed: {cause}; rollback ALSO failed, the host may be partially changed: {rollback}")]
    RollbackFailed {
        step: String,
        cause: SystemError,
        line: Option<String>,
        rollback: String,
    },
}

impl ApplyError {
    /// The `ip -batch` line the system refused (`route add default via ... table 100 ...`).
    pub(crate) fn failed_line(&self) -> Option<&str> {
        match self {
            ApplyError::RolledBack { line, .. } | ApplyError::RollbackFailed { line, .. } => {
                line.as_deref()
            }
        }
    }
}

/// The line of an `ip -batch` script its error names (`Command failed -:2`).
fn refused_line(step: &Step, cause: &SystemError) -> Option<String> {
    let Step::IpBatch(batch) = step else {
        return None;
    };
    let text = cause.to_string();
    let (_, after) = text.rsplit_once("Command failed -:")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    let n: usize = digits.parse().ok()?;
    batch.lines.get(n.checked_sub(1)?).cloned()
}

/// The run as the engine knows it: the backend, whose objects, and the snapshot to go back to.
pub(crate) struct Run<'a, F: Firewall> {
    pub firewall: &'a F,
    pub instance: &'a str,
    pub protocol: u8,
    pub before: &'a Observed<F>,
}

/// Runs the plan. On failure restores the state observed before the run (the error is boxed:
/// it is rare and large).
pub(crate) fn apply<F: Firewall>(
    run: &Run<F>,
    plan: &Plan,
    sys: &mut dyn Host,
) -> Result<(), Box<ApplyError>> {
    let steps = plan.steps();
    for (done, step) in steps.iter().enumerate() {
        if let Err(cause) = execute(step, run, sys) {
            let failure = Failure {
                step: describe(step),
                line: refused_line(step, &cause),
                cause,
            };
            return Err(Box::new(rollback(run, &steps[..=done], failure, sys)));
        }
    }
    Ok(())
}

/// Runs one step.
fn execute<F: Firewall>(step: &Step, run: &Run<F>, sys: &mut dyn Host) -> Result<(), SystemError> {
    let instance = run.instance;
    match step {
        Step::RecordAhead(record) => sys.write_record(instance, record),
        Step::Record(record) => {
            let record = proven(record, run.firewall.shaped_table().as_deref(), sys)?;
            sys.write_record(instance, &record)
        }
        Step::IpBatch(batch) => sys.ip_batch(batch.family, &script(batch)),
        Step::Transaction(t) => match t.tool {
            Tool::IptablesRestore(tool, family) => sys.restore(tool, family, &t.payload),
            Tool::Nft => sys.nft_apply(&t.payload),
        },
        Step::DropTable(drop) => drop_if_only_chains(drop, sys),
        Step::SysctlWrite(change) => sys.write_sysctl(&change.key, &change.to),
        Step::Store(stored) => sys.write_stored(instance, stored.as_deref()),
    }
}

/// The final record, its read cache kept only if the generation is the one the plan
/// expects after this run's commits: any other writer since the run's read moved it further.
/// A cache without the table's shape gets it from a dump at that generation.
fn proven(
    record: &Record,
    dumped_table: Option<&str>,
    sys: &mut dyn Host,
) -> Result<Record, SystemError> {
    let Some(cache) = &record.read_cache else {
        return Ok(record.clone());
    };
    let generation = cache.read.generation;
    if sys.nft_generation()? != Some(generation) {
        return Ok(Record {
            read_cache: None,
            ..record.clone()
        });
    }
    let mut record = record.clone();
    if let (Some(table), Some(cache)) = (dumped_table, record.read_cache.as_mut()) {
        if cache.read.shape.is_none() {
            cache.read.shape = sys
                .nft_dump(table, None)?
                .filter(|dump| dump.generation == generation)
                .map(|dump| dump.shape);
        }
    }
    Ok(record)
}

/// Deletes the table only if nft itself shows nothing in it but chains without rules: sets,
/// maps or rules iptables-save cannot show (or that another tool added since the plan was
/// made) keep it.
fn drop_if_only_chains(drop: &TableDrop, sys: &mut dyn Host) -> Result<(), SystemError> {
    let listing = sys.list_nft_table(drop.family, drop.table)?;
    if holds_only_chains(&listing) {
        sys.delete_table(drop.family, drop.table)
    } else {
        Ok(())
    }
}

/// How a failed step is named in the message.
fn describe(step: &Step) -> String {
    match step {
        Step::RecordAhead(_) => "recording what this run creates".to_string(),
        Step::IpBatch(b) => format!("{} ({} lines)", batch_command(b), b.lines.len()),
        Step::Transaction(t) => t.describe(),
        Step::DropTable(d) => drop_command(d),
        Step::SysctlWrite(c) => sysctl_command(&c.key, &c.to),
        Step::Record(_) => "recording created objects".to_string(),
        Step::Store(_) => "storing params".to_string(),
    }
}

/// `ip -4 -batch -`
pub(crate) fn batch_command(batch: &IpBatch) -> String {
    format!("ip -{} -batch -", batch.family.ip_flag())
}

/// `nft delete table ip nat`
pub(crate) fn drop_command(drop: &TableDrop) -> String {
    format!(
        "nft delete table {} {}",
        drop.family.nft_family(),
        drop.table
    )
}

/// `sysctl -w net.ipv4.ip_forward=1`
pub(crate) fn sysctl_command(key: &str, value: &str) -> String {
    format!("sysctl -w {}={value}", key.replace('/', "."))
}

/// The `ip -batch` input.
pub(crate) fn script(batch: &IpBatch) -> String {
    let mut text = batch.lines.join("\n");
    text.push('\n');
    text
}

/// The step that failed: how it is named, why, and the line refused.
struct Failure {
    step: String,
    cause: SystemError,
    line: Option<String>,
}

/// Puts back what `done` (the steps run, the failed one last) changed.
fn rollback<F: Firewall>(
    run: &Run<F>,
    done: &[Step],
    failure: Failure,
    sys: &mut dyn Host,
) -> ApplyError {
    let Failure { step, cause, line } = failure;
    let mut problems = Vec::new();
    // A sysctl write that failed changed nothing (one value is written or not): only those
    // written before it are put back (a read-only /proc/sys would fail the write back too).
    let written = done
        .split_last()
        .map_or(&[][..], |(last, earlier)| match last {
            Step::SysctlWrite(_) => earlier,
            _ => done,
        });
    for s in written.iter().rev() {
        if let Step::SysctlWrite(change) = s {
            if let Some(old) = &change.from {
                if let Err(e) = sys.write_sysctl(&change.key, old) {
                    problems.push(e.to_string());
                }
            }
        }
    }
    // An `ip -batch` or a table drop may stop half way; a failed firewall transaction
    // changed nothing.
    let (last, earlier) = done
        .split_last()
        .map_or((None, &[][..]), |(l, e)| (Some(l), e));
    let touched = earlier.iter().any(|s| {
        matches!(
            s,
            Step::IpBatch(_) | Step::Transaction(_) | Step::DropTable(_)
        )
    }) || matches!(last, Some(Step::IpBatch(_) | Step::DropTable(_)));
    if touched {
        if let Err(e) = plan_back(run, done, sys) {
            problems.push(e);
        }
    }
    // The record written ahead names what this run was about to create: put back, or it
    // would claim objects that never came (or someone else's, created later).
    let record_written = done
        .iter()
        .any(|s| matches!(s, Step::RecordAhead(_) | Step::Record(_)));
    if record_written {
        if let Err(e) = sys.write_record(run.instance, &run.before.record) {
            problems.push(e.to_string());
        }
    }
    if problems.is_empty() {
        ApplyError::RolledBack { step, cause, line }
    } else {
        ApplyError::RollbackFailed {
            step,
            cause,
            line,
            rollback: problems.join("; "),
        }
    }
}

/// Plans from the host as it is now back to the snapshot, and runs that plan's iproute2
/// and firewall steps.
fn plan_back<F: Firewall>(run: &Run<F>, done: &[Step], sys: &mut dyn Host) -> Result<(), String> {
    let now = reread_for_rollback(run, done, sys).map_err(|e| e.to_string())?;
    let back = crate::plan::plan(
        run.firewall,
        run.instance,
        run.protocol,
        &snapshot_as_desired(run.firewall, run.before),
        &now,
    );
    let mut problems = Vec::new();
    for step in back.steps() {
        if matches!(
            step,
            Step::IpBatch(_) | Step::Transaction(_) | Step::DropTable(_)
        ) {
            if let Err(e) = execute(&step, run, sys) {
                problems.push(e.to_string());
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The host after a failed step. What this run created is not in the on-disk record yet
/// when the failure came before the final record: it is owned here, so planning back removes
/// it.
fn reread_for_rollback<F: Firewall>(
    run: &Run<F>,
    done: &[Step],
    sys: &mut dyn Host,
) -> Result<Observed<F>, SystemError> {
    let prelude = observe::prelude(sys, run.instance)?;
    let mut now = observe::observe(
        run.firewall,
        sys,
        prelude,
        observe::Known::Nothing,
        run.protocol,
        &[],
        Scope::ALL,
    )?;
    for step in done {
        if let Step::RecordAhead(record) = step {
            now.routing
                .recorded
                .extend(record.addresses.iter().cloned());
            now.record.tables.extend(record.tables.iter().cloned());
        }
    }
    Ok(now)
}

/// The desired state that puts the host back as it was observed.
fn snapshot_as_desired<F: Firewall>(firewall: &F, before: &Observed<F>) -> Desired<F> {
    Desired {
        firewall: firewall.snapshot(&before.firewall),
        routing: Routing {
            addresses: before.routing.owned_addresses(),
            rules: before.routing.owned.rules.clone(),
            routes: before.routing.owned.routes.clone(),
        },
        stored: before.stored.clone(),
        ..Desired::default()
    }
}
