//! The native nftables backend (`backend: nftables`): the instance owns one table,
//! `inet portfwd-<instance>`, and writes nothing outside it.
//!
//! Reads: `nft -j list table inet portfwd-<instance>` only (other software's rules are never
//! listed for the plan); after another writer's commit, a netlink dump of that table instead
//! when its shape is the one recorded ([`dumped`]). Writes: one `nft -f -` script per run, one transaction for both
//! families. Dispatch is by map lookup, so a new connection costs the same with one forward
//! or thousands.
//!
//! portfwd's table never drops a packet it does not own: an accept here would not undo a drop
//! in another table at the same hook (iptables' `filter FORWARD` with policy DROP on a Docker
//! host, a firewalld zone). `allow_forward` therefore marks the forwarded flows with
//! `conn_mark`, which the other firewall can accept with one rule, and the run warns
//! (`forward_hook_drop`) naming the table, the chain and that rule.
//!
//! [`table`] holds the shapes, [`compile`] builds them, [`observe`] reads them back from nft's
//! JSON, [`plan`] diffs and writes the script, [`decompile`] reads entries back.

pub(crate) mod compile;
pub(crate) mod decompile;
mod dumped;
pub(crate) mod observe;
pub(crate) mod plan;
pub(crate) mod pool;
pub(crate) mod table;

use super::{Entries, Firewall, FirewallPlan, Tool, Transaction};
use crate::findings::Finding;
use crate::foreign::ForeignNat;
use crate::model::Config;
use crate::net::Family;
use crate::ownership::{FirewallRead, Record, StableHash};
use crate::tools::{Backend, Flavour, Read};
use observe::NftObserved;
use table::{table_name, Table, FAMILY};

/// The nftables backend of one instance (its table's name).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Nftables {
    table: String,
}

impl Nftables {
    pub(crate) fn new(instance: &str) -> Nftables {
        Nftables {
            table: table_name(instance),
        }
    }

    /// `inet portfwd-<instance>`.
    pub(crate) fn table(&self) -> String {
        format!("{FAMILY} {}", self.table)
    }
}

/// The plan for a table nft could not list: nothing is known of its content, so nothing is
/// rewritten, except flags (nft 0.9.8 cuts its JSON off at a dormant table's flags): clearing
/// them is safe and lets the next run read the table.
fn unreadable_plan(table: &str, have: &NftObserved) -> FirewallPlan {
    if !have.flagged {
        return FirewallPlan::default();
    }
    FirewallPlan {
        transactions: vec![Transaction {
            tool: Tool::Nft,
            table: table.to_string(),
            payload: format!("add table {table}\n"),
        }],
        repaired: vec![format!(
            "table {table} flags (nft could not list the flagged table; the next run reads it)"
        )],
        ..FirewallPlan::default()
    }
}

impl Firewall for Nftables {
    type Desired = Table;
    type Observed = NftObserved;

    fn name(&self) -> Backend {
        Backend::Nftables
    }

    fn holds_anything(&self, want: &Table) -> bool {
        !want.is_empty()
    }

    fn compile(&self, config: &Config) -> Table {
        compile::compile_table(config)
    }

    fn recompile(
        &self,
        base: &Table,
        config: &Config,
        changed: &std::collections::BTreeSet<String>,
    ) -> Table {
        compile::recompile_table(base, config, changed)
    }

    fn reads(&self) -> Vec<Read> {
        vec![Read::NftTable(self.table.clone())]
    }

    fn observe(
        &self,
        _instance: &str,
        outputs: Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) -> NftObserved {
        let output = outputs.first().map(|(out, _)| out.as_str()).unwrap_or("");
        match observe::parse(output) {
            Ok(observed) => observed,
            Err(e) => {
                warnings.push(format!(
                    "could not read table {}: {e}; it is left as it is",
                    self.table()
                ));
                NftObserved {
                    unreadable: true,
                    exists: true,
                    flagged: observe::flags_seen(output),
                    ..NftObserved::default()
                }
            }
        }
    }

    fn digest(&self, want: &Table) -> Option<u32> {
        if want.is_empty() {
            return None;
        }
        // Every object's comment hashes where it is and what it says.
        let mut hash = StableHash::new().part(self.table.as_bytes());
        for (name, rules) in want.chains.iter() {
            hash = hash.part(name.as_bytes());
            for rule in rules {
                hash = hash.part(rule.comment.as_bytes());
            }
        }
        for (name, elements) in want.maps.iter() {
            hash = hash.part(name.as_bytes());
            for comment in elements.keys() {
                hash = hash.part(comment.as_bytes());
            }
        }
        Some(hash.finish())
    }

    fn assume(&self, want: &Table, _read: &FirewallRead) -> NftObserved {
        NftObserved::as_written(want.clone())
    }

    /// Only a base chain's rule needs a handle; the rest goes by name and key.
    fn plans_from_record(&self) -> bool {
        true
    }

    fn dumped_table(&self) -> Option<String> {
        Some(self.table.clone())
    }

    fn observe_dump(&self, last: &Table, dump: &crate::tools::NftDump) -> Option<NftObserved> {
        dumped::observed(last, dump)
    }

    fn readable(&self, observed: &NftObserved) -> bool {
        !observed.unreadable
    }

    fn snapshot(&self, observed: &NftObserved) -> Table {
        observed.table.clone()
    }

    fn plan(
        &self,
        instance: &str,
        want: &Table,
        have: &NftObserved,
        _record: &mut Record,
    ) -> FirewallPlan {
        if have.unreadable {
            return unreadable_plan(&self.table(), have);
        }
        let edit = plan::plan_table(instance, &self.table, want, have);
        let transactions = if edit.script.is_empty() {
            Vec::new()
        } else {
            vec![Transaction {
                tool: Tool::Nft,
                table: self.table(),
                payload: edit.script,
            }]
        };
        FirewallPlan {
            transactions,
            drops: Vec::new(),
            forwards: edit.forwards,
            masquerade: edit.masquerade,
            repaired: edit.repaired,
            needs_read: edit.needs_read,
        }
    }

    fn decompile(&self, instance: &str, state: &Table) -> Entries {
        decompile::entries_from_table(state, instance)
    }

    fn decompile_some(
        &self,
        instance: &str,
        state: &Table,
        names: &std::collections::HashSet<&str>,
    ) -> Entries {
        let part = decompile::part_of(state, instance, names);
        let mut entries = decompile::entries_from_table(part.as_ref().unwrap_or(state), instance);
        entries.forwards.retain(|f| names.contains(f.name.as_str()));
        entries
    }

    fn owns_hook_chain(&self, _: &NftObserved, family: &str, table: &str, _: &str) -> bool {
        family == FAMILY && table == self.table
    }

    fn findings(&self, _: &NftObserved) -> Vec<Finding> {
        Vec::new()
    }

    fn flavour(&self, _: &NftObserved) -> Option<Flavour> {
        Some(Flavour::Nftables)
    }

    /// Other software's rules are not read by this backend.
    fn mark_users<'a>(&self, _: &'a NftObserved) -> &'a [String] {
        &[]
    }

    /// The table never drops what it does not own.
    fn forward_drop(&self, _: &NftObserved, _: Family) -> Option<String> {
        None
    }

    /// Other tables' NAT chains are checked by the engine (`nft -j list chains`).
    fn foreign_nat<'a>(&self, _: &'a NftObserved) -> &'a [ForeignNat] {
        &[]
    }

    fn foreign_facts(&self, _: &NftObserved) -> serde_json::Value {
        serde_json::Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// `decompile_some` of `names` gives what the whole table gives for them.
    fn assert_some_as_whole(nft: &Nftables, table: &Table, names: &HashSet<&str>) {
        let json = |f: &crate::model::ForwardParams| serde_json::to_string(f).unwrap();
        let whole = nft.decompile("gw", table);
        let some = nft.decompile_some("gw", table, names);
        let expected: Vec<String> = whole
            .forwards
            .iter()
            .filter(|f| names.contains(f.name.as_str()))
            .map(json)
            .collect();
        let got: Vec<String> = some.forwards.iter().map(json).collect();
        assert_eq!(got, expected, "{names:?}");
        assert_eq!(some.conn_mark, whole.conn_mark);
    }

    /// Any subset of the forwards decompiles from their part of the table as from the whole
    /// table: plain ones (elements only), chained ones, local, SNAT to an address, IPv6.
    #[test]
    fn some_forwards_decompile_as_from_the_whole_table() {
        let (config, _, _) =
            crate::model::Config::from_json(include_str!("testdata/params.json")).unwrap();
        let nft = Nftables::new("gw");
        let table = nft.compile(&config);
        let whole = nft.decompile("gw", &table);
        let all: Vec<&str> = whole.forwards.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(all.len(), config.forwards.len());
        for mask in 0..(1u32 << all.len()) {
            let names: HashSet<&str> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            assert_some_as_whole(&nft, &table, &names);
        }
    }

    /// Among many forwards a few are decompiled from their part of the table; nearly all of
    /// them, from the whole table: either way as the whole table gives them.
    #[test]
    fn few_forwards_among_many_come_from_their_part() {
        let nft = Nftables::new("gw");
        let table = nft.compile(&crate::testing::plain_forwards(200));
        let whole = nft.decompile("gw", &table);
        assert_eq!(whole.forwards.len(), 200);
        let few: HashSet<&str> = ["f0", "f7", "f199"].into();
        let all: HashSet<&str> = whole.forwards.iter().map(|f| f.name.as_str()).collect();
        for (names, by_part) in [(few, true), (all, false)] {
            assert_eq!(
                decompile::part_of(&table, "gw", &names).is_some(),
                by_part,
                "{} names",
                names.len()
            );
            assert_some_as_whole(&nft, &table, &names);
        }
    }

    /// What nft 0.9.8 printed for a dormant table of two forwards (cut off at the flags).
    const CUT_OFF: &str = "{\"nftables\": [{\"metainfo\": {\"version\": \"0.9.8\", \"release_name\": \"E.D.S.\", \"json_schema_version\": 1}}, {\"table\": {\"family\": \"inet\", \"name\": \"portfwd-portfwd\", \"handle\": 11, \"flags\": \n";

    #[test]
    fn a_flagged_table_nft_cannot_list_gets_its_flags_cleared_and_no_read_cache() {
        let nft = Nftables::new("portfwd");
        let mut warnings = Vec::new();
        let have = nft.observe(
            "portfwd",
            vec![(CUT_OFF.to_string(), String::new())],
            &mut warnings,
        );
        assert!(have.unreadable && have.flagged, "{have:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(!nft.readable(&have));
        let plan = nft.plan("portfwd", &Table::default(), &have, &mut Record::default());
        assert_eq!(plan.transactions.len(), 1);
        assert_eq!(
            plan.transactions[0].payload,
            "add table inet portfwd-portfwd\n"
        );
        assert_eq!(plan.repaired.len(), 1, "{:?}", plan.repaired);
        // Unparseable without flags: nothing is touched.
        let cut = CUT_OFF.replace("\"flags\": \n", "\"han");
        let have = nft.observe("portfwd", vec![(cut, String::new())], &mut warnings);
        assert!(have.unreadable && !have.flagged);
        let plan = nft.plan("portfwd", &Table::default(), &have, &mut Record::default());
        assert!(plan.transactions.is_empty() && plan.repaired.is_empty());
    }
}
