//! The fourth stage: a pure function of (desired, observed) that yields the minimal edit as a
//! [`Plan`], and [`Plan::steps`], the one place that sets the order the steps run in.
//!
//! The firewall backend plans its own objects ([`crate::firewall::Firewall::plan`]);
//! [`iproute`] plans addresses, rules and routes, [`sysctl`] the sysctl writes, [`record`] the
//! record of created objects.

pub(crate) mod iproute;
pub(crate) mod record;
pub(crate) mod sysctl;

use crate::compile::Desired;
use crate::firewall::{EntryChanges, Firewall, FirewallPlan, TableDrop, Tool, Transaction};
use crate::observe::Observed;
use crate::ownership::{ReadCache, Record};
use iproute::{plan_routing, IpBatch, RoutingPlan};

/// Everything a run would change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub firewall: FirewallPlan,
    pub sysctls: Vec<SysctlChange>,
    pub routing: RoutingPlan,
    /// The record written before the first change, so a run killed half way still owns what
    /// it made (None when it would not change).
    pub record_ahead: Option<Record>,
    /// The record of created objects to write at the end, when it changes.
    pub record: Option<Record>,
    /// `Some(new content)` when the stored params file changes (`Some(None)`: remove it).
    pub store: Option<Option<String>>,
    pub warnings: Vec<String>,
}

/// A sysctl write, with the value it replaces (for rollback and the diff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SysctlChange {
    pub key: String,
    pub from: Option<String>,
    pub to: String,
}

/// One write to the host, as [`crate::apply`] runs it through [`crate::system::System`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The record of what this run may create, written before creating it.
    RecordAhead(Record),
    /// `ip -4|-6 -batch -`.
    IpBatch(IpBatch),
    /// One atomic firewall transaction.
    Transaction(Transaction),
    /// Delete a table portfwd created and emptied.
    DropTable(TableDrop),
    SysctlWrite(SysctlChange),
    /// The final record of created objects.
    Record(Record),
    /// Store (`Some`) or remove (`None`) the params for `portfwd restore`.
    Store(Option<String>),
}

impl Plan {
    /// True when the host would not change (a pruned address record alone is housekeeping).
    pub(crate) fn is_empty(&self) -> bool {
        self.firewall.transactions.is_empty()
            && self.firewall.drops.is_empty()
            && self.sysctls.is_empty()
            && self.routing.adds.is_empty()
            && self.routing.dels.is_empty()
            && self.store.is_none()
    }

    pub(crate) fn forwards(&self) -> &EntryChanges {
        &self.firewall.forwards
    }

    pub(crate) fn masquerade(&self) -> &EntryChanges {
        &self.firewall.masquerade
    }

    /// The steps in the order they run: make before break. The record ahead; iproute2
    /// additions (addresses and routes the forwards may need); the firewall transactions;
    /// emptied tables dropped; sysctls (forwarding on only once the rules are in place);
    /// iproute2 removals; the final record; the stored params.
    pub(crate) fn steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        steps.extend(self.record_ahead.clone().map(Step::RecordAhead));
        steps.extend(self.routing.adds.iter().cloned().map(Step::IpBatch));
        steps.extend(
            self.firewall
                .transactions
                .iter()
                .cloned()
                .map(Step::Transaction),
        );
        steps.extend(self.firewall.drops.iter().copied().map(Step::DropTable));
        steps.extend(self.sysctls.iter().cloned().map(Step::SysctlWrite));
        steps.extend(self.routing.dels.iter().cloned().map(Step::IpBatch));
        steps.extend(self.record.clone().map(Step::Record));
        steps.extend(self.store.clone().map(Step::Store));
        steps
    }
}

/// How many nf_tables generations the firewall transactions move on: one per `nft -f` and
/// per iptables-nft restore. None when the count cannot be known: a legacy restore (it moves
/// none, and the generation then proves nothing) or a table drop (done only if the table
/// turns out empty).
fn commits(plan: &FirewallPlan) -> Option<u32> {
    let counted = plan.drops.is_empty()
        && plan.transactions.iter().all(|t| {
            !matches!(
                t.tool,
                Tool::IptablesRestore(crate::tools::IptablesTool::Legacy, _)
            )
        });
    counted.then(|| u32::try_from(plan.transactions.len()).unwrap_or(u32::MAX))
}

/// Diffs the desired state against what was observed.
pub(crate) fn plan<F: Firewall>(
    firewall: &F,
    instance: &str,
    protocol: u8,
    desired: &Desired<F>,
    observed: &Observed<F>,
) -> Plan {
    let mut record = observed.record.clone();
    let mut warnings = Vec::new();
    // A cache of the desired digest means the plan would be empty: 50,000 forwards are not
    // compared with themselves.
    let firewall_plan = if observed.firewall_is_desired {
        FirewallPlan::default()
    } else {
        firewall.plan(instance, &desired.firewall, &observed.firewall, &mut record)
    };
    // The read cache says the firewall holds exactly the desired objects at a generation:
    // the one read, plus one per commit of this run. The apply checks that generation after
    // its commits ([`crate::apply`]): another writer in between voids the cache.
    record.read_cache = observed
        .firewall_read
        .clone()
        .zip(commits(&firewall_plan))
        .and_then(|(mut read, commits)| {
            read.generation = read.generation.wrapping_add(commits);
            // The table's shape, as a read or a dump proved it, holds while the run writes
            // nothing; after a commit the apply dumps it anew.
            if commits > 0 {
                read.shape = None;
            }
            Some(ReadCache {
                digest: desired.read_key?,
                read,
                params: Some(desired.source.clone()),
            })
        });
    // The record names the backend (and the iptables flavour) while it holds something; a
    // record without one is from before the choice, when iptables as installed held it.
    record.backend = firewall.held_by(&desired.firewall);
    let sysctls = sysctl::plan_sysctls(&desired.sysctls, observed, &mut record, &mut warnings);
    let (have, taken) = record::taken_back(&desired.routing, observed, protocol);
    warnings.extend(taken);
    let routing = plan_routing(&desired.routing, &have, protocol);
    warnings.extend(routing.warnings.iter().cloned());
    record::plan_routing_record(
        &desired.routing,
        &have,
        &observed.record,
        &routing,
        &mut record,
    );
    let mut plan = Plan {
        firewall: firewall_plan,
        sysctls,
        routing,
        warnings,
        ..Plan::default()
    };
    if record != observed.record {
        plan.record_ahead = record::ahead(&observed.record, &record);
        plan.record = Some(record);
    }
    if desired.stored != observed.stored {
        plan.store = Some(desired.stored.clone());
    }
    plan
}
