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

pub mod compile;
pub mod decompile;
pub mod observe;
pub mod plan;
pub mod rules;
pub mod save;

use super::{Entries, Firewall, FirewallPlan};
use crate::model::Config;
use crate::net::Family;
use crate::ownership::Record;
use crate::system::Read;
use observe::IptablesObserved;
use rules::OwnedRules;

/// The iptables backend.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Iptables;

impl Firewall for Iptables {
    type Desired = OwnedRules;
    type Observed = IptablesObserved;

    fn compile(&self, config: &Config) -> OwnedRules {
        compile::compile_rules(config)
    }

    fn reads(&self) -> Vec<Read> {
        vec![
            Read::Save(Family::V4),
            Read::Save(Family::V6),
            Read::SaveTool(Family::V4),
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
            .is_some_and(|(path, _)| observe::names_nft_tool(path));
        for (family, output) in [Family::V4, Family::V6].into_iter().zip(&outputs) {
            let dump = observe::Dump {
                output,
                tool_is_nft,
            };
            observe::observe_family(family, dump, instance, &mut observed, warnings);
        }
        observed
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
        plan::plan(instance, want, have, record)
    }

    fn decompile(&self, instance: &str, state: &OwnedRules) -> Entries {
        decompile::entries_from_rules(state, instance)
    }

    fn flavour(&self, observed: &IptablesObserved) -> Option<&'static str> {
        observed.flavour
    }

    fn mark_users<'a>(&self, observed: &'a IptablesObserved) -> &'a [String] {
        &observed.connmark_rules
    }
}
