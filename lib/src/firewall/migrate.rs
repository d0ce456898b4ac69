//! Moving an instance between backends: a run with `backend: nftables` on an instance whose
//! record says iptables holds it (or the other way round) also reads the old backend's
//! objects of the instance and removes them, in the same run, after the new ones are in place.
//! A failure anywhere rolls both back, because both are one [`Firewall`] to the engine.

use super::{Entries, EntryChanges, Firewall, FirewallPlan};
use crate::findings::Finding;
use crate::foreign::ForeignNat;
use crate::model::Config;
use crate::net::Family;
use crate::ownership::{FirewallRead, Record};
use crate::tools::{Backend, Flavour, Read};

/// The backend the params ask for (`new`) and the one that may still hold the instance
/// (`old`), read and emptied only while `from_old` is set. `old` may itself be a `Moving` of
/// two candidates (another iptables flavour and nftables); such an inner one reads its `new`
/// only while `from_new` is set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Moving<N, O> {
    pub new: N,
    pub old: O,
    pub from_old: bool,
    pub from_new: bool,
}

impl<N: Default, O: Default> Default for Moving<N, O> {
    fn default() -> Self {
        Moving {
            new: N::default(),
            old: O::default(),
            from_old: false,
            from_new: true,
        }
    }
}

/// Entries that left the old backend for the new one count as updated; an entry held by
/// both (a lost record) is named once.
fn merge(new: &mut EntryChanges, old: EntryChanges) {
    use std::collections::HashSet;
    let added: HashSet<String> = new.added.iter().cloned().collect();
    let mut named: HashSet<String> = new
        .added
        .iter()
        .chain(&new.updated)
        .chain(&new.removed)
        .cloned()
        .collect();
    let mut moved = HashSet::new();
    for name in old.removed {
        if added.contains(&name) {
            moved.insert(name);
        } else if named.insert(name.clone()) {
            new.removed.push(name);
        }
    }
    if !moved.is_empty() {
        new.added.retain(|n| !moved.contains(n));
        new.updated.extend(moved);
        new.updated.sort();
    }
    for name in old.added {
        if named.insert(name.clone()) {
            new.added.push(name);
        }
    }
    for name in old.updated {
        if named.insert(name.clone()) {
            new.updated.push(name);
        }
    }
}

impl<N: Firewall, O: Firewall> Firewall for Moving<N, O> {
    type Desired = (N::Desired, O::Desired);
    type Observed = (N::Observed, Option<O::Observed>);

    fn name(&self) -> Backend {
        self.new.name()
    }

    fn holds_anything(&self, want: &Self::Desired) -> bool {
        self.new.holds_anything(&want.0)
    }

    fn held_by(&self, state: &Self::Desired) -> Option<Backend> {
        self.new
            .held_by(&state.0)
            .or_else(|| self.old.held_by(&state.1))
    }

    fn compile(&self, config: &Config) -> Self::Desired {
        (self.new.compile(config), O::Desired::default())
    }

    fn recompile(
        &self,
        base: &Self::Desired,
        config: &Config,
        changed: &std::collections::BTreeSet<String>,
    ) -> Self::Desired {
        (
            self.new.recompile(&base.0, config, changed),
            O::Desired::default(),
        )
    }

    fn reads(&self) -> Vec<Read> {
        let mut reads = if self.from_new {
            self.new.reads()
        } else {
            Vec::new()
        };
        if self.from_old {
            reads.extend(self.old.reads());
        }
        reads
    }

    fn observe(
        &self,
        instance: &str,
        mut outputs: Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) -> Self::Observed {
        let new_reads = if self.from_new {
            self.new.reads().len()
        } else {
            0
        };
        let split = new_reads.min(outputs.len());
        let old_outputs = outputs.split_off(split);
        let new = if self.from_new {
            self.new.observe(instance, outputs, warnings)
        } else {
            N::Observed::default()
        };
        let old = self
            .from_old
            .then(|| self.old.observe(instance, old_outputs, warnings));
        (new, old)
    }

    /// The cache stands for the new backend's objects only; the old backend, when it is
    /// looked at, is read in every run ([`Firewall::cache_reads`]).
    fn digest(&self, want: &Self::Desired) -> Option<u32> {
        self.new.digest(&want.0)
    }

    fn assume(&self, want: &Self::Desired, read: &FirewallRead) -> Self::Observed {
        let old = self.from_old.then(O::Observed::default);
        (self.new.assume(&want.0, read), old)
    }

    fn readable(&self, observed: &Self::Observed) -> bool {
        self.new.readable(&observed.0) && observed.1.as_ref().is_none_or(|o| self.old.readable(o))
    }

    fn plans_from_record(&self) -> bool {
        self.new.plans_from_record()
    }

    /// The cache stands for the new backend only: the old one, when it may hold the
    /// instance, is read (`absent` looks everywhere, and a cache says nothing about it).
    fn cache_reads(&self) -> Vec<Read> {
        if self.from_old {
            self.old.reads()
        } else {
            Vec::new()
        }
    }

    /// Only while nothing else may hold the instance (the old backend would need its read).
    fn dumped_table(&self) -> Option<String> {
        if self.from_old {
            None
        } else {
            self.new.dumped_table()
        }
    }

    fn shaped_table(&self) -> Option<String> {
        self.new.shaped_table()
    }

    fn observe_dump(
        &self,
        last: &Self::Desired,
        dump: &crate::tools::NftDump,
    ) -> Option<Self::Observed> {
        if self.from_old {
            return None;
        }
        Some((self.new.observe_dump(&last.0, dump)?, None))
    }

    fn assume_reading(
        &self,
        instance: &str,
        want: &Self::Desired,
        read: &FirewallRead,
        outputs: Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) -> Self::Observed {
        let old = self
            .from_old
            .then(|| self.old.observe(instance, outputs, warnings));
        (self.new.assume(&want.0, read), old)
    }

    fn snapshot(&self, observed: &Self::Observed) -> Self::Desired {
        (
            self.new.snapshot(&observed.0),
            observed
                .1
                .as_ref()
                .map(|o| self.old.snapshot(o))
                .unwrap_or_default(),
        )
    }

    /// The new backend's transactions first (make before break), then the old one's.
    fn plan(
        &self,
        instance: &str,
        want: &Self::Desired,
        have: &Self::Observed,
        record: &mut Record,
    ) -> FirewallPlan {
        let mut plan = self.new.plan(instance, &want.0, &have.0, record);
        if let Some(old_have) = &have.1 {
            let old = self.old.plan(instance, &want.1, old_have, record);
            plan.transactions.extend(old.transactions);
            plan.drops.extend(old.drops);
            merge(&mut plan.forwards, old.forwards);
            merge(&mut plan.masquerade, old.masquerade);
            plan.needs_read |= old.needs_read;
        }
        plan
    }

    /// The new backend's entries, then the old one's that it does not hold yet.
    fn decompile(&self, instance: &str, state: &Self::Desired) -> Entries {
        let new = self.new.decompile(instance, &state.0);
        merged(new, self.old.decompile(instance, &state.1))
    }

    fn decompile_some(
        &self,
        instance: &str,
        state: &Self::Desired,
        names: &std::collections::HashSet<&str>,
    ) -> Entries {
        let new = self.new.decompile_some(instance, &state.0, names);
        merged(new, self.old.decompile_some(instance, &state.1, names))
    }

    fn owns_hook_chain(
        &self,
        observed: &Self::Observed,
        family: &str,
        table: &str,
        chain: &str,
    ) -> bool {
        // The old backend's chains are on their way out: not a way in for the new one.
        self.new.owns_hook_chain(&observed.0, family, table, chain)
    }

    fn findings(&self, observed: &Self::Observed) -> Vec<Finding> {
        self.new.findings(&observed.0)
    }

    fn flavour(&self, observed: &Self::Observed) -> Option<Flavour> {
        self.new.flavour(&observed.0)
    }

    fn mark_users<'a>(&self, observed: &'a Self::Observed) -> &'a [String] {
        self.new.mark_users(&observed.0)
    }

    fn forward_drop(&self, observed: &Self::Observed, family: Family) -> Option<String> {
        self.new.forward_drop(&observed.0, family)
    }

    fn foreign_nat<'a>(&self, observed: &'a Self::Observed) -> &'a [ForeignNat] {
        self.new.foreign_nat(&observed.0)
    }

    fn foreign_facts(&self, observed: &Self::Observed) -> serde_json::Value {
        self.new.foreign_facts(&observed.0)
    }
}

/// `entries`, then the entries of `old` of other names (by name, not a scan per entry:
/// 50,000 forwards move too).
fn merged(mut entries: Entries, old: Entries) -> Entries {
    let forwards: std::collections::HashSet<String> =
        entries.forwards.iter().map(|f| f.name.clone()).collect();
    let masquerade: std::collections::HashSet<String> =
        entries.masquerade.iter().map(|m| m.name.clone()).collect();
    entries.forwards.extend(
        old.forwards
            .into_iter()
            .filter(|f| !forwards.contains(&f.name)),
    );
    entries.masquerade.extend(
        old.masquerade
            .into_iter()
            .filter(|m| !masquerade.contains(&m.name)),
    );
    entries.conn_mark = entries.conn_mark.or(old.conn_mark);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(added: &[&str], updated: &[&str], removed: &[&str]) -> EntryChanges {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        EntryChanges {
            added: v(added),
            updated: v(updated),
            removed: v(removed),
        }
    }

    #[test]
    fn an_entry_held_by_both_backends_is_named_once() {
        let mut new = changes(&[], &[], &["web"]);
        merge(&mut new, changes(&[], &[], &["web", "db"]));
        assert_eq!(new, changes(&[], &[], &["web", "db"]));
        let mut moving = changes(&["web"], &[], &[]);
        merge(&mut moving, changes(&[], &[], &["web"]));
        assert_eq!(moving, changes(&[], &["web"], &[]));
    }
}
