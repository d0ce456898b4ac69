//! Reads the iptables state of an instance out of `iptables-save` dumps: its chains, its
//! sub-chains, the jumps into them, and the facts the plan needs about each table. Foreign
//! rules are never materialised beyond a text check.

use std::collections::{BTreeMap, HashMap};

use super::rules::{Hook, Jump, OwnedChain, OwnedRules, Rule, Subchains, Table};
use super::save::{RuleLine, TableDump};
use crate::foreign::ForeignNat;
use crate::model::Proto;
use crate::net::{Family, PortRange};
use crate::ownership::is_jump_comment;
use crate::tools::Flavour;

/// What the iptables backend found of an instance.
#[derive(Debug, Clone, Default)]
pub(crate) struct IptablesObserved {
    pub owned: OwnedRules,
    /// Rule count of each built-in chain that has or may get a jump (to place jumps).
    pub builtin_len: BTreeMap<(Family, Hook), usize>,
    /// The iptables flavour the dumps came from (`nf_tables` or `legacy`), when any table exists.
    pub flavour: Option<Flavour>,
    /// Facts about each table portfwd may write to.
    pub tables: BTreeMap<(Family, Table), TableFacts>,
    /// Dispatch sub-chains of the instance whose hook chain does not exist.
    pub stray_subchains: BTreeMap<(Family, Hook), Subchains>,
    /// Other software's rules that read or write conntrack marks (`table chain args`), to warn
    /// when one touches the instance's `conn_mark` bit.
    pub connmark_rules: Vec<String>,
    /// Families whose filter FORWARD chain has policy DROP (Docker sets it): forwards with
    /// `allow_forward: false` are dropped there.
    pub forward_drop: Vec<Family>,
    /// Other owners' DNAT/REDIRECT rules a connection meets before portfwd's jump.
    pub foreign_nat: Vec<ForeignNat>,
    /// iptables-nft said legacy tables exist beside its own.
    pub legacy_beside: bool,
    /// Not read but known: what portfwd last wrote, in the order it wrote it (see
    /// [`crate::firewall::Firewall::assume`]). Rule positions hold; the built-in chains'
    /// lengths and the tables' facts are unknown.
    pub assumed: bool,
}

/// One family's `iptables-save` output, and whether the tool is the nf_tables one.
pub(crate) struct Dump<'a> {
    /// (stdout, stderr)
    pub output: &'a (String, String),
    pub tool_is_nft: bool,
}

/// The flavour a save tool (links resolved, see [`Read::SaveTool`]) names: `xtables-nft-multi`,
/// `iptables-nft-save` and `... (nf_tables)` are nf_tables; `xtables-legacy-multi`,
/// `iptables-legacy-save` and `... (legacy)` legacy; None otherwise.
///
/// [`Read::SaveTool`]: crate::system::Read::SaveTool
pub(crate) fn tool_flavour(path: &str) -> Option<Flavour> {
    if path.ends_with(" (nf_tables)") {
        return Some(Flavour::NfTables);
    }
    if path.ends_with(" (legacy)") {
        return Some(Flavour::Legacy);
    }
    let name = path.rsplit('/').next()?;
    if name.contains("-nft") {
        Some(Flavour::NfTables)
    } else if name.contains("-legacy") {
        Some(Flavour::Legacy)
    } else {
        None
    }
}

/// Parses one family's dump into `observed`; the stderr warning of iptables-nft about legacy
/// tables becomes a run warning.
pub(crate) fn observe_family(
    family: Family,
    dump: Dump,
    instance: &str,
    observed: &mut IptablesObserved,
    warnings: &mut Vec<String>,
) {
    let (stdout, stderr) = dump.output;
    let tool_is_nft = dump.tool_is_nft;
    if stderr.contains("iptables-legacy tables present") {
        observed.legacy_beside = true;
        warnings.push(format!(
            "{} rules also exist in iptables-legacy tables; portfwd manages the nf_tables ones (set backend: legacy to manage those instead)",
            family.label()
        ));
    }
    let mut dump = super::save::parse(stdout);
    // A dump without the `(nf_tables)` mark is legacy, or nf_tables before iptables 1.8.8.
    if dump.nf_tables == Some(false) && tool_is_nft {
        dump.nf_tables = Some(true);
    }
    if let (None, Some(nft)) = (observed.flavour, dump.nf_tables) {
        observed.flavour = Some(if nft {
            Flavour::NfTables
        } else {
            Flavour::Legacy
        });
    }
    extract_owned(&dump, family, instance, observed);
    extract_connmark_users(&dump, observed);
    observed
        .foreign_nat
        .extend(foreign_nat(&dump, family, instance));
    let drops = dump.table(Table::Filter.name()).is_some_and(|t| {
        t.chains
            .iter()
            .any(|c| c.name == "FORWARD" && c.policy == "DROP")
    });
    if drops {
        observed.forward_drop.push(family);
    }
}

/// The DNAT and REDIRECT rules of other owners in nat PREROUTING and OUTPUT before portfwd's
/// jump, and in the foreign chains those earlier rules jump to (transitively). Found on the
/// text (flags are single words in iptables-save output), so 10,000 foreign rules stay cheap.
/// Without a jump of portfwd's (another backend runs), every such rule counts.
pub(crate) fn foreign_nat(
    dump: &super::save::Dump,
    family: Family,
    instance: &str,
) -> Vec<ForeignNat> {
    let mut found = Vec::new();
    let Some(nat) = dump.table(Table::Nat.name()) else {
        return found;
    };
    let ours = format!("PFWD-{instance}-");
    let mut by_chain: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in &nat.rules {
        by_chain.entry(line.chain).or_default().push(line.text);
    }
    for (builtin, hook_chain, local) in [
        ("PREROUTING", Hook::Prerouting.chain(instance), false),
        ("OUTPUT", Hook::Output.chain(instance), true),
    ] {
        let rules = by_chain.get(builtin).cloned().unwrap_or_default();
        let ours_at = rules
            .iter()
            .position(|r| words(r).any(|w| w == hook_chain))
            .unwrap_or(rules.len());
        // Chains met before our jump: the built-in chain's earlier rules, and every foreign
        // chain they (or chains they reach) jump to.
        let mut queue: Vec<(&str, Vec<&str>)> = vec![(builtin, rules[..ours_at].to_vec())];
        let mut seen: Vec<&str> = vec![builtin];
        while let Some((chain, rules)) = queue.pop() {
            for rule in rules {
                let target = target_of(rule);
                match target {
                    Some("DNAT" | "REDIRECT") => found.push(ForeignNat {
                        family,
                        place: format!("nat {chain}"),
                        rule: rule.to_string(),
                        proto: flag(rule, "-p").and_then(|p| match p {
                            "tcp" => Some(Proto::Tcp),
                            "udp" => Some(Proto::Udp),
                            _ => None,
                        }),
                        ports: flag(rule, "--dport")
                            .or_else(|| flag(rule, "--dports"))
                            .and_then(PortRange::parse_iptables),
                        local,
                    }),
                    Some(next) if !next.starts_with(&ours) && !seen.contains(&next) => {
                        if let Some(next_rules) = by_chain.get(next) {
                            seen.push(next);
                            queue.push((next, next_rules.clone()));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    found
}

fn words(rule: &str) -> impl Iterator<Item = &str> {
    rule.split_whitespace()
}

/// The word after `name` (`-p tcp` → `tcp`); a negated match (`! --dport`) is no match.
fn flag<'a>(rule: &'a str, name: &str) -> Option<&'a str> {
    let all: Vec<&str> = words(rule).collect();
    let at = all.iter().position(|w| *w == name)?;
    if at > 0 && all[at - 1] == "!" {
        return None;
    }
    all.get(at + 1).copied()
}

/// `-j X` or `-g X`.
fn target_of(rule: &str) -> Option<&str> {
    flag(rule, "-j").or_else(|| flag(rule, "-g"))
}

/// What the plan needs to know about one iptables table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TableFacts {
    /// The dump is from nf_tables (whose tables can be deleted).
    pub nf_tables: bool,
    /// Nothing in it but built-in chains with policy ACCEPT, this instance's chains, and the
    /// jumps into them.
    pub only_ours: bool,
}

/// Pulls the instance's chains, and the jumps into them, out of a dump.
pub(crate) fn extract_owned(
    dump: &super::save::Dump,
    family: Family,
    instance: &str,
    observed: &mut IptablesObserved,
) {
    for table in [Table::Filter, Table::Nat] {
        if let Some(t) = dump.table(table.name()) {
            observed.tables.insert(
                (family, table),
                table_facts(t, table, dump.nf_tables == Some(true), instance),
            );
        }
    }
    // Each table's rules grouped by chain once: every hook, and every one of its sub-chains,
    // reads its own rules without scanning the whole table again.
    // (Lines only: foreign rules are never materialised.)
    let mut by_chain: BTreeMap<&str, HashMap<&str, Vec<&RuleLine>>> = BTreeMap::new();
    for table in [Table::Filter, Table::Nat] {
        if let Some(t) = dump.table(table.name()) {
            let chains = by_chain.entry(table.name()).or_default();
            for line in &t.rules {
                chains.entry(line.chain).or_default().push(line);
            }
        }
    }
    let rules_of = |lines: Option<&Vec<&RuleLine>>| -> Vec<Rule> {
        lines.map_or_else(Vec::new, |l| l.iter().map(|r| r.rule()).collect())
    };
    for hook in Hook::ALL {
        let Some(table) = dump.table(hook.table().name()) else {
            continue;
        };
        let Some(chains) = by_chain.get(hook.table().name()) else {
            continue;
        };
        let chain_name = hook.chain(instance);
        let builtin = rules_of(chains.get(hook.builtin()));
        observed.builtin_len.insert((family, hook), builtin.len());
        let prefix = format!("{chain_name}-");
        let subchains: Subchains = table
            .chains
            .iter()
            .filter(|c| c.name.starts_with(&prefix))
            .map(|c| {
                let rules = rules_of(chains.get(c.name));
                (c.name.to_string(), std::sync::Arc::new(rules))
            })
            .collect();
        if !table.has_chain(&chain_name) {
            // Sub-chains whose chain is gone (a crash, a hand edit) are still ours by name:
            // reused or removed, never left to block a later `-N`.
            if !subchains.is_empty() {
                observed.stray_subchains.insert((family, hook), subchains);
            }
            continue;
        }
        let jumps = builtin
            .iter()
            .enumerate()
            .filter(|(_, r)| is_our_jump(r, &chain_name, instance))
            .map(|(i, r)| Jump {
                position: i + 1,
                rule: r.clone(),
            })
            .collect();
        let rules = rules_of(chains.get(chain_name.as_str()));
        std::sync::Arc::make_mut(&mut observed.owned.chains).insert(
            (family, hook),
            OwnedChain {
                rules,
                jumps,
                subchains,
            },
        );
    }
}

/// Foreign rules using `-m connmark` or `-j CONNMARK` (checked on the text first: a host
/// with 10,000 rules has a handful of these). Another portfwd instance's chains are not
/// foreign: with the same bit it marks and accepts exactly what this one does.
fn extract_connmark_users(dump: &super::save::Dump, observed: &mut IptablesObserved) {
    for table in &dump.tables {
        for rule in &table.rules {
            if (rule.text.contains("connmark") || rule.text.contains("CONNMARK"))
                && crate::ownership::instance_of_chain(rule.chain).is_none()
            {
                observed
                    .connmark_rules
                    .push(format!("{} {} {}", table.name, rule.chain, rule.text));
            }
        }
    }
}

/// A jump portfwd made: into the instance's chain and carrying its jump comment. Someone
/// else's rule into our chain (say `-i eth9 -j PFWD-...`) is theirs and never touched.
fn is_our_jump(rule: &Rule, chain: &str, instance: &str) -> bool {
    (rule.option("-j") == Some(chain) || rule.option("-g") == Some(chain))
        && rule.comment().is_some_and(|c| is_jump_comment(c, instance))
}

fn table_facts(t: &TableDump, table: Table, nf_tables: bool, instance: &str) -> TableFacts {
    let ours: Vec<String> = Hook::ALL
        .iter()
        .filter(|h| h.table() == table)
        .map(|h| h.chain(instance))
        .collect();
    let builtin = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];
    // An owned chain, or one of its dispatch sub-chains (`<chain>-T12`).
    let owned = |name: &str| {
        ours.iter().any(|o| {
            name == o
                || name
                    .strip_prefix(o.as_str())
                    .is_some_and(|rest| rest.starts_with('-'))
        })
    };
    let chains_ok = t
        .chains
        .iter()
        .all(|c| owned(c.name) || (builtin.contains(&c.name) && c.policy == "ACCEPT"));
    // Checked on the text first: most foreign rules never mention our chains.
    let rules_ok = t.rules.iter().all(|r| {
        owned(r.chain)
            || (ours.iter().any(|o| r.text.contains(o.as_str()))
                && ours.iter().any(|o| is_our_jump(&r.rule(), o, instance)))
    });
    TableFacts {
        nf_tables,
        only_ours: chains_ok && rules_ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFT_DUMP: &str = include_str!("../../../tests/data/nft-docker-portfwd.save");

    #[test]
    fn extracts_only_the_instance_chains() {
        let dump = super::super::save::parse(NFT_DUMP);
        assert_eq!(dump.nf_tables, Some(true));
        let mut observed = IptablesObserved::default();
        extract_owned(&dump, Family::V4, "portfwd", &mut observed);
        insta::assert_debug_snapshot!(observed.owned);
        assert_eq!(observed.builtin_len[&(Family::V4, Hook::Prerouting)], 2);
        assert_eq!(observed.builtin_len[&(Family::V4, Hook::Forward)], 9);
        let mut other = IptablesObserved::default();
        extract_owned(&dump, Family::V4, "other", &mut other);
        assert_eq!(other.owned.rule_count(), 1);
    }

    #[test]
    fn parses_a_docker_host_faithfully() {
        insta::assert_debug_snapshot!(super::super::save::parse(NFT_DUMP));
    }

    #[test]
    fn legacy_dump_with_incompatible_table_line() {
        let text = "# Generated by iptables-save v1.8.9 on Sat Nov 21 23:01:53 2026\n*nat\n:PREROUTING ACCEPT [3:180]\n:PFWD-portfwd-PRE - [0:0]\n-A PREROUTING -m comment --comment portfwd:jump -j PFWD-portfwd-PRE\n-A PFWD-portfwd-PRE -p udp -m udp --dport 53 -m comment --comment \"portfwd:fwd:dns:0000abcd\" -j DNAT --to-destination 10.0.0.53\nCOMMIT\n# Table `mangle' is incompatible, use 'nft' tool.\n";
        let dump = super::super::save::parse(text);
        assert_eq!(dump.nf_tables, Some(false));
        let mut observed = IptablesObserved::default();
        extract_owned(&dump, Family::V4, "portfwd", &mut observed);
        let chain = &observed.owned.chains[&(Family::V4, Hook::Prerouting)];
        assert_eq!(chain.rules.len(), 1);
        assert_eq!(chain.jumps[0].position, 1);
        assert_eq!(chain.rules[0].comment(), Some("portfwd:fwd:dns:0000abcd"));
    }

    /// iptables-nft before 1.8.8 (Debian 11: 1.8.7) writes no `(nf_tables)` mark: which tool
    /// ran decides, or the tables portfwd created could never be dropped again.
    #[test]
    fn an_unmarked_dump_is_nf_tables_when_the_tool_is() {
        let output = (
            "# Generated by iptables-save v1.8.7 on Mon Nov 23 17:46:40 2026\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n".to_string(),
            String::new(),
        );
        for (path, flavour) in [
            ("/usr/sbin/xtables-nft-multi", "nf_tables"),
            ("/usr/sbin/xtables-legacy-multi", "legacy"),
            ("/sbin/xtables-multi", "legacy"),
            // A wrapper script: the flavour its --version named.
            ("/usr/local/sbin/iptables-save (nf_tables)", "nf_tables"),
            ("/usr/local/sbin/iptables-save (legacy)", "legacy"),
        ] {
            let mut observed = IptablesObserved::default();
            let dump = Dump {
                output: &output,
                tool_is_nft: tool_flavour(path) == Some(Flavour::NfTables),
            };
            observe_family(Family::V4, dump, "portfwd", &mut observed, &mut Vec::new());
            assert_eq!(observed.flavour.map(Flavour::name), Some(flavour), "{path}");
            assert_eq!(
                observed.tables[&(Family::V4, Table::Nat)].nf_tables,
                flavour == "nf_tables"
            );
        }
    }
}
