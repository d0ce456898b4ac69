//! The iptables backend (both flavours: the tools as installed, `-nft` or `-legacy`, chosen
//! by the [`crate::system::System`] that runs them).
//!
//! Every rule of an instance lives in its own chains `PFWD-<instance>-{PRE,OUT,POST,FWD,IN}`
//! and their per-port sub-chains, reached by one jump from each built-in chain. One
//! `iptables-save` per family is read; one `iptables-restore --noflush` per changed table is
//! written.
//!
//! [`rules`] holds the shapes, [`compile`] makes them from a config, [`save`] parses dumps,
//! [`observe`] finds the instance's chains in them, [`plan`] diffs and renders, [`decompile`]
//! reads entries back.

pub(crate) mod compile;
pub(crate) mod decompile;
pub(crate) mod observe;
pub(crate) mod plan;
pub(crate) mod rules;
pub(crate) mod save;

use super::{Entries, Firewall, FirewallPlan};
use crate::findings::{Finding, Severity};
use crate::foreign::ForeignNat;
use crate::model::Config;
use crate::net::Family;
use crate::ownership::{FirewallRead, Record, StableHash};
use crate::tools::{Backend, Flavour, IptablesTool, Read};
use observe::IptablesObserved;
use rules::OwnedRules;

/// What the read cache keeps of other software's rules.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ForeignFacts {
    #[serde(default)]
    mark_users: Vec<String>,
    #[serde(default)]
    foreign_nat: Vec<ForeignNat>,
    #[serde(default)]
    forward_drop: Vec<Family>,
}

/// The iptables backend: the tools it runs (one flavour's, or as installed), and the flavour
/// they are known to drive (as installed when it could not be told), which the record names.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Iptables {
    pub tool: IptablesTool,
    pub flavour: IptablesTool,
}

impl Iptables {
    /// Runs `tool`, known to drive `flavour`.
    pub(crate) fn new(tool: IptablesTool, flavour: IptablesTool) -> Iptables {
        Iptables { tool, flavour }
    }
}

impl Firewall for Iptables {
    type Desired = OwnedRules;
    type Observed = IptablesObserved;

    fn name(&self) -> Backend {
        self.flavour.backend()
    }

    fn holds_anything(&self, want: &OwnedRules) -> bool {
        !want.chains.is_empty()
    }

    fn compile(&self, config: &Config) -> OwnedRules {
        compile::compile_rules(config)
    }

    fn recompile(
        &self,
        base: &OwnedRules,
        config: &Config,
        changed: &std::collections::BTreeSet<String>,
    ) -> OwnedRules {
        compile::recompile_rules(base, config, changed)
    }

    fn reads(&self) -> Vec<Read> {
        vec![
            Read::Save(self.tool, Family::V4),
            Read::Save(self.tool, Family::V6),
            Read::SaveTool(self.tool, Family::V4),
        ]
    }

    fn observe(
        &self,
        instance: &str,
        outputs: Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) -> IptablesObserved {
        let mut observed = IptablesObserved::default();
        // xtables-nft-multi or xtables-legacy-multi (iptables-nft before 1.8.8 does not say
        // `(nf_tables)` in its dump).
        let tool_is_nft = outputs
            .get(2)
            .is_some_and(|(path, _)| observe::tool_flavour(path) == Some(Flavour::NfTables));
        for (family, output) in [Family::V4, Family::V6].into_iter().zip(&outputs) {
            let dump = observe::Dump {
                output,
                tool_is_nft,
            };
            observe::observe_family(family, dump, instance, &mut observed, warnings);
        }
        observed
    }

    fn digest(&self, want: &OwnedRules) -> Option<u32> {
        // Every rule's comment hashes its chain and arguments; chain names and jump positions
        // complete the picture.
        if want.chains.is_empty() {
            return None;
        }
        let mut hash = StableHash::new();
        for ((family, hook), chain) in want.chains.iter() {
            hash = hash
                .part(family.label().as_bytes())
                .part(hook.builtin().as_bytes());
            for jump in &chain.jumps {
                hash = hash
                    .part(&jump.position.to_le_bytes())
                    .part(jump.rule.render().as_bytes());
            }
            for rule in &chain.rules {
                hash = hash.part(rule.comment().unwrap_or_default().as_bytes());
            }
            for (name, rules) in &chain.subchains {
                hash = hash.part(name.as_bytes());
                for rule in rules.iter() {
                    hash = hash.part(rule.comment().unwrap_or_default().as_bytes());
                }
            }
        }
        Some(hash.finish())
    }

    /// Only nf_tables reads are cached.
    fn assume(&self, want: &OwnedRules, read: &FirewallRead) -> IptablesObserved {
        let facts: ForeignFacts = serde_json::from_value(read.facts.clone()).unwrap_or_default();
        IptablesObserved {
            owned: want.clone(),
            flavour: Some(Flavour::NfTables),
            connmark_rules: facts.mark_users,
            foreign_nat: facts.foreign_nat,
            forward_drop: facts.forward_drop,
            assumed: true,
            ..IptablesObserved::default()
        }
    }

    /// With iptables-nft: every restore moves the generation, and what portfwd wrote is in
    /// the order it compiled it, so rule positions in its own chains are known without a
    /// read. Legacy tables have no generation to prove that nobody else wrote.
    fn plans_from_record(&self) -> bool {
        self.flavour == IptablesTool::Nft && self.tool != IptablesTool::Legacy
    }

    fn snapshot(&self, observed: &IptablesObserved) -> OwnedRules {
        observed.owned.clone()
    }

    fn plan(
        &self,
        instance: &str,
        want: &OwnedRules,
        have: &IptablesObserved,
        record: &mut Record,
    ) -> FirewallPlan {
        plan::plan(self.tool, instance, want, have, record)
    }

    fn decompile(&self, instance: &str, state: &OwnedRules) -> Entries {
        decompile::entries_from_rules(state, instance, None)
    }

    /// The other forwards' rules are never split into arguments.
    fn decompile_some(
        &self,
        instance: &str,
        state: &OwnedRules,
        names: &std::collections::HashSet<&str>,
    ) -> Entries {
        decompile::entries_from_rules(state, instance, Some(names))
    }

    /// iptables-nft's `filter FORWARD`, where portfwd's jump and accepts live (a policy drop
    /// there is no problem: the accept comes first), and its `nat` chains (their rules are read
    /// from the dump, in order).
    fn owns_hook_chain(
        &self,
        observed: &IptablesObserved,
        family: &str,
        table: &str,
        chain: &str,
    ) -> bool {
        observed.flavour == Some(Flavour::NfTables)
            && matches!(family, "ip" | "ip6")
            && ((table == "filter" && chain == "FORWARD") || table == "nat")
    }

    fn findings(&self, observed: &IptablesObserved) -> Vec<Finding> {
        if !observed.legacy_beside {
            return Vec::new();
        }
        vec![Finding {
            id: "mixed_iptables_flavours",
            severity: Severity::Warning,
            entry: None,
            msg: "iptables-legacy tables exist beside the nf_tables ones: both filter every packet, and a drop in one is not undone by an accept in the other".into(),
            fix: "move the legacy rules to iptables-nft (iptables-legacy-save | iptables-nft-restore, then flush the legacy tables), or manage the legacy ones with backend: legacy".into(),
        }]
    }

    /// As the dumps say; before any table exists, the flavour the tools are known to drive
    /// (a first apply on a fresh host is then a read the cache can keep).
    fn flavour(&self, observed: &IptablesObserved) -> Option<Flavour> {
        observed.flavour.or(match self.flavour {
            IptablesTool::Nft => Some(Flavour::NfTables),
            IptablesTool::Legacy => Some(Flavour::Legacy),
            IptablesTool::Installed => None,
        })
    }

    fn mark_users<'a>(&self, observed: &'a IptablesObserved) -> &'a [String] {
        &observed.connmark_rules
    }

    fn forward_drop(&self, observed: &IptablesObserved, family: Family) -> Option<String> {
        let tool = if family == Family::V4 {
            "iptables"
        } else {
            "ip6tables"
        };
        observed
            .forward_drop
            .contains(&family)
            .then(|| format!("the {tool} filter FORWARD chain has policy DROP"))
    }

    fn foreign_nat<'a>(&self, observed: &'a IptablesObserved) -> &'a [ForeignNat] {
        &observed.foreign_nat
    }

    fn foreign_facts(&self, observed: &IptablesObserved) -> serde_json::Value {
        serde_json::to_value(ForeignFacts {
            mark_users: observed.connmark_rules.clone(),
            foreign_nat: observed.foreign_nat.clone(),
            forward_drop: observed.forward_drop.clone(),
        })
        .unwrap_or_default()
    }
}
