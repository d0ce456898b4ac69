//! Plans the rule edit: per owned chain it deletes what should go, keeps the longest run of
//! rules already in the right order, and inserts the rest at their place. It never
//! re-declares an owned chain (`:CHAIN - [0:0]` under `--noflush` flushes it), so untouched
//! rules keep their counters and the connections through them survive.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::observe::IptablesObserved;
use super::rules::{Hook, Jump, OwnedChain, OwnedRules, Rule, Subchains, Table};
use crate::firewall::{EntryChanges, FirewallPlan, TableDrop, Tool, Transaction};
use crate::net::Family;
use crate::ownership::{parse_comment, table_key, Record, KIND_FORWARD, KIND_MASQUERADE};
use crate::tools::IptablesTool;

/// The rule edit of one run: one transaction per table that changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RulesPlan {
    pub tables: Vec<TablePlan>,
    pub forwards: EntryChanges,
    pub masquerade: EntryChanges,
    /// Owned objects put right that no entry change explains (edited, stray, out of order).
    pub repaired: Vec<String>,
}

impl RulesPlan {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// The whole iptables part of the plan: the rule edits as `iptables-restore` payloads, and
/// the tables portfwd created that are now empty. Tables the edit creates are recorded, so
/// `absent` leaves iptables-save as it was (nf_tables only: legacy tables cannot be deleted).
pub(crate) fn plan(
    tool: IptablesTool,
    instance: &str,
    want: &OwnedRules,
    have: &IptablesObserved,
    record: &mut Record,
) -> FirewallPlan {
    if have.assumed && !plannable_from_record(want, &have.owned) {
        return FirewallPlan {
            needs_read: true,
            ..FirewallPlan::default()
        };
    }
    let rules = plan_rules(instance, want, have);
    // Planned from the record, every table it writes holds the instance's chains already
    // (see `plannable_from_record`): none is created (and `have.tables` is not known).
    for t in rules.tables.iter().filter(|_| !have.assumed) {
        if !have.tables.contains_key(&(t.family, t.table)) {
            record.tables.insert(table_key(t.family, t.table.name()));
        }
    }
    let wanted: BTreeSet<(Family, Table)> =
        want.chains.keys().map(|(f, h)| (*f, h.table())).collect();
    let mut drops = Vec::new();
    for (&(family, table), facts) in &have.tables {
        let key = table_key(family, table.name());
        if !wanted.contains(&(family, table))
            && facts.only_ours
            && facts.nf_tables
            && record.tables.contains(&key)
        {
            drops.push(TableDrop {
                family,
                table: table.name(),
            });
            record.tables.remove(&key);
        }
    }
    FirewallPlan {
        transactions: rules
            .tables
            .iter()
            .map(|t| Transaction {
                tool: Tool::IptablesRestore(tool, t.family),
                table: t.table.name().to_string(),
                payload: t.payload(),
            })
            .collect(),
        drops,
        forwards: rules.forwards,
        masquerade: rules.masquerade,
        repaired: rules.repaired,
        needs_read: false,
    }
}

/// Can the edit from what portfwd last wrote (`have`, assumed) to `want` go without a read?
/// Only when it stays inside the instance's chains: the same hooks with the same jumps, so
/// no jump is placed among other software's rules (that needs the built-in chain as it is)
/// and no table is created or left empty (that needs the table's facts).
fn plannable_from_record(want: &OwnedRules, have: &OwnedRules) -> bool {
    want.chains.len() == have.chains.len()
        && want
            .chains
            .iter()
            .zip(have.chains.iter())
            .all(|((wk, w), (hk, h))| wk == hk && w.jumps == h.jumps)
}

/// The edit lines for one table of one family (without `*table` / `COMMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TablePlan {
    pub family: Family,
    pub table: Table,
    pub lines: Vec<String>,
}

impl TablePlan {
    /// The complete `iptables-restore` input.
    pub(crate) fn payload(&self) -> String {
        let mut text = format!("*{}\n", self.table.name());
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// The rule edit of every table, and the entries it changes.
pub(crate) fn plan_rules(
    instance: &str,
    desired: &OwnedRules,
    observed: &IptablesObserved,
) -> RulesPlan {
    let mut by_table: BTreeMap<(Family, Table), Vec<String>> = BTreeMap::new();
    let mut repaired = Vec::new();
    let hooks: BTreeSet<(Family, Hook)> = desired
        .chains
        .keys()
        .chain(observed.owned.chains.keys())
        .chain(observed.stray_subchains.keys())
        .copied()
        .collect();
    for (family, hook) in hooks {
        let lines = by_table.entry((family, hook.table())).or_default();
        let builtin_len = observed
            .builtin_len
            .get(&(family, hook))
            .copied()
            .unwrap_or(0);
        let have = observed.owned.chains.get(&(family, hook));
        let have_subs = have
            .map(|c| &c.subchains)
            .or_else(|| observed.stray_subchains.get(&(family, hook)));
        let mut fixed = Vec::new();
        chain_edit(
            instance,
            hook,
            desired.chains.get(&(family, hook)),
            (have, have_subs),
            builtin_len,
            lines,
            &mut fixed,
        );
        repaired.extend(fixed.into_iter().map(|f| format!("{} {f}", family.label())));
    }
    let tables: Vec<TablePlan> = by_table
        .into_iter()
        .filter(|(_, lines)| !lines.is_empty())
        .map(|((family, table), lines)| TablePlan {
            family,
            table,
            lines,
        })
        .collect();
    // No table edit means every owned rule is already there: no entry changed.
    let changes = |kind: &str| {
        if tables.is_empty() {
            EntryChanges::default()
        } else {
            entry_changes(instance, kind, desired, &observed.owned)
        }
    };
    RulesPlan {
        forwards: changes(KIND_FORWARD),
        masquerade: changes(KIND_MASQUERADE),
        tables,
        repaired,
    }
}

/// The observed chain (if it exists) and the observed sub-chains (the chain's, or strays).
type HaveChain<'a> = (Option<&'a OwnedChain>, Option<&'a Subchains>);

fn chain_edit(
    instance: &str,
    hook: Hook,
    desired: Option<&OwnedChain>,
    observed: HaveChain,
    builtin_len: usize,
    lines: &mut Vec<String>,
    repaired: &mut Vec<String>,
) {
    let chain = hook.chain(instance);
    let builtin = hook.builtin();
    let (observed, have_subs) = observed;
    let no_subchains = BTreeMap::new();
    let want_subs = desired.map_or(&no_subchains, |c| &c.subchains);
    let have_subs = have_subs.unwrap_or(&no_subchains);
    // Sub-chains first made and filled, so the chain's dispatch rules can jump to them;
    // unwanted ones emptied and dropped last, once nothing jumps to them.
    for (name, rules) in want_subs {
        match have_subs.get(name) {
            None => {
                lines.push(format!("-N {name}"));
                for rule in rules.iter() {
                    lines.push(format!("-A {name} {}", rule.render()));
                }
            }
            // Shared with the desired objects, or equal as written, the chain needs nothing
            // (most of 50,000 forwards' chains).
            Some(have) if std::sync::Arc::ptr_eq(have, rules) || have == rules => {}
            Some(have) => rule_edit(name, rules, have, lines, repaired),
        }
    }
    let drop_subs = |lines: &mut Vec<String>| {
        for name in have_subs.keys().filter(|n| !want_subs.contains_key(*n)) {
            lines.push(format!("-F {name}"));
            lines.push(format!("-X {name}"));
        }
    };
    match (desired, observed) {
        (None, None) => drop_subs(lines),
        (None, Some(have)) => {
            for jump in &have.jumps {
                lines.push(format!("-D {builtin} {}", jump.rule.render()));
            }
            lines.push(format!("-F {chain}"));
            lines.push(format!("-X {chain}"));
            drop_subs(lines);
        }
        (Some(want), None) => {
            lines.push(format!("-N {chain}"));
            for rule in &want.rules {
                lines.push(format!("-A {chain} {}", rule.render()));
            }
            insert_jumps(builtin, &want.jumps, builtin_len, lines);
            drop_subs(lines);
        }
        (Some(want), Some(have)) => {
            if want.rules != have.rules {
                rule_edit(&chain, &want.rules, &have.rules, lines, repaired);
            }
            drop_subs(lines);
            // A jump is kept only while it says what portfwd writes (an edited one, say with
            // `-i eth9` added under the jump comment, is deleted and written again).
            let mut kept = 0;
            for jump in &have.jumps {
                let good = kept < want.jumps.len() && want.jumps[kept].rule.same_body(&jump.rule);
                if good {
                    kept += 1;
                    continue;
                }
                let why = if want.jumps.iter().any(|w| w.rule.same_body(&jump.rule)) {
                    "duplicated"
                } else {
                    "edited"
                };
                repaired.push(format!("{builtin} jump to {chain} {why}"));
                lines.push(format!("-D {builtin} {}", jump.rule.render()));
            }
            if kept < want.jumps.len() && kept == have.jumps.len() {
                repaired.push(format!("{builtin} jump to {chain} missing"));
            }
            let remaining = builtin_len.saturating_sub(have.jumps.len() - kept);
            insert_jumps(builtin, &want.jumps[kept..], remaining, lines);
        }
    }
}

/// Inserts jumps at their positions, clamped to the chain's end.
fn insert_jumps(builtin: &str, jumps: &[Jump], mut len: usize, lines: &mut Vec<String>) {
    for jump in jumps {
        let position = jump.position.clamp(1, len + 1);
        lines.push(format!("-I {builtin} {position} {}", jump.rule.render()));
        len += 1;
    }
}

/// Deletes (highest position first) every observed rule that is unwanted, duplicated, out of
/// order or edited in place (its comment is ours but its body is not what portfwd writes),
/// then inserts the missing ones where they belong. What it puts right that no entry change
/// explains goes into `repaired`.
fn rule_edit(
    chain: &str,
    want: &[Rule],
    have: &[Rule],
    lines: &mut Vec<String>,
    repaired: &mut Vec<String>,
) {
    let wanted: HashMap<String, usize> =
        want.iter().enumerate().map(|(i, r)| (r.key(), i)).collect();
    let mut seen = BTreeSet::new();
    // (observed position, desired index) of rules worth keeping, in observed order.
    let mut candidates: Vec<(usize, usize)> = Vec::new();
    for (pos, r) in have.iter().enumerate() {
        let key = r.key();
        match wanted.get(&key) {
            Some(&idx) if !want[idx].same_body(r) => {
                repaired.push(format!("{chain} rule {} ({key}) edited", pos + 1));
            }
            Some(&idx) => {
                if seen.insert(idx) {
                    candidates.push((pos, idx));
                } else {
                    repaired.push(format!("{chain} rule {} ({key}) duplicated", pos + 1));
                }
            }
            None if r.comment().is_none() => {
                repaired.push(format!("{chain} rule {} not written by portfwd", pos + 1));
            }
            None => {}
        }
    }
    let kept: BTreeSet<usize> =
        longest_increasing(&candidates.iter().map(|c| c.1).collect::<Vec<_>>())
            .into_iter()
            .map(|i| candidates[i].0)
            .collect();
    if kept.len() < candidates.len() {
        repaired.push(format!("{chain} rule order"));
    }
    for pos in (0..have.len()).rev() {
        if !kept.contains(&pos) {
            lines.push(format!("-D {chain} {}", pos + 1));
        }
    }
    let present: BTreeSet<usize> = kept
        .iter()
        .filter_map(|pos| wanted.get(&have[*pos].key()).copied())
        .collect();
    let mut len = kept.len();
    for (idx, rule) in want.iter().enumerate() {
        if present.contains(&idx) {
            continue;
        }
        if idx >= len {
            lines.push(format!("-A {chain} {}", rule.render()));
        } else {
            lines.push(format!("-I {chain} {} {}", idx + 1, rule.render()));
        }
        len += 1;
    }
}

/// Indices of one longest strictly increasing subsequence (patience sorting, O(n log n)).
fn longest_increasing(values: &[usize]) -> Vec<usize> {
    let mut tails: Vec<usize> = Vec::new();
    let mut parent = vec![None; values.len()];
    for (i, v) in values.iter().enumerate() {
        let at = tails.partition_point(|&t| values[t] < *v);
        parent[i] = at.checked_sub(1).map(|p| tails[p]);
        if at == tails.len() {
            tails.push(i);
        } else {
            tails[at] = i;
        }
    }
    let mut out = Vec::with_capacity(tails.len());
    let mut cursor = tails.last().copied();
    while let Some(i) = cursor {
        out.push(i);
        cursor = parent[i];
    }
    out.reverse();
    out
}

fn entry_changes(
    instance: &str,
    kind: &str,
    desired: &OwnedRules,
    observed: &OwnedRules,
) -> EntryChanges {
    let owner = |rule: &Rule| -> Option<String> {
        let tag = rule.comment().and_then(|c| parse_comment(c, instance))?;
        (tag.kind == kind).then(|| tag.name.to_string())
    };
    // Only chains that differ can hold a changed entry's rules: their rule keys, compared.
    let mut touched: HashSet<String> = HashSet::new();
    let no_rules: &[Rule] = &[];
    let mut compare = |want: &[Rule], have: &[Rule]| {
        if std::ptr::eq(want, have) || want == have {
            return;
        }
        let keys = |rules: &[Rule]| -> HashSet<String> { rules.iter().map(Rule::key).collect() };
        let (w, h) = (keys(want), keys(have));
        for rule in want.iter().chain(have) {
            if !(w.contains(&rule.key()) && h.contains(&rule.key())) {
                touched.extend(owner(rule));
            }
        }
    };
    let hooks: BTreeSet<&(Family, Hook)> = desired
        .chains
        .keys()
        .chain(observed.chains.keys())
        .collect();
    for hook in hooks {
        let (want, have) = (desired.chains.get(hook), observed.chains.get(hook));
        compare(
            want.map_or(no_rules, |c| &c.rules),
            have.map_or(no_rules, |c| &c.rules),
        );
        let subs: BTreeSet<&String> = want
            .iter()
            .chain(have.iter())
            .flat_map(|c| c.subchains.keys())
            .collect();
        for sub in subs {
            let w = want.and_then(|c| c.subchains.get(sub));
            let h = have.and_then(|c| c.subchains.get(sub));
            compare(
                w.map_or(no_rules, |r| r.as_slice()),
                h.map_or(no_rules, |r| r.as_slice()),
            );
        }
    }
    let mut changes = EntryChanges::default();
    if touched.is_empty() {
        return changes;
    }
    // The touched entries' names in first-seen order: only they are kept, and no other
    // name is copied (every rule's name, twice, was most of planning a change of one forward
    // among 50,000).
    fn names<'r>(
        rules: &'r OwnedRules,
        instance: &str,
        kind: &str,
        touched: &HashSet<String>,
    ) -> (Vec<&'r str>, HashSet<&'r str>) {
        let (mut order, mut seen) = (Vec::new(), HashSet::new());
        for chain in rules.chains.values() {
            for rule in chain.all_rules() {
                let name = rule
                    .comment()
                    .and_then(|c| parse_comment(c, instance))
                    .filter(|tag| tag.kind == kind && touched.contains(tag.name))
                    .map(|tag| tag.name);
                if let Some(name) = name.filter(|n| seen.insert(*n)) {
                    order.push(name);
                }
            }
        }
        (order, seen)
    }
    let (want_order, want) = names(desired, instance, kind, &touched);
    let (have_order, have) = names(observed, instance, kind, &touched);
    for name in want_order {
        if have.contains(name) {
            changes.updated.push(name.to_string());
        } else {
            changes.added.push(name.to_string());
        }
    }
    for name in have_order.into_iter().filter(|n| !want.contains(n)) {
        changes.removed.push(name.to_string());
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::iptables::compile::compile_rules;
    use crate::model::Config;
    use rstest::rstest;

    fn rules(keys: &[&str]) -> OwnedChain {
        OwnedChain {
            rules: keys
                .iter()
                .map(|k| Rule::new(["-m", "comment", "--comment", k, "-j", "ACCEPT"]))
                .collect(),
            jumps: vec![Jump {
                position: 1,
                rule: Rule::new(["-j", "PFWD-t-FWD"]),
            }],
            subchains: BTreeMap::new(),
        }
    }

    fn edit(want: &[&str], have: &[&str]) -> Vec<String> {
        let mut lines = Vec::new();
        rule_edit(
            "C",
            &rules(want).rules,
            &rules(have).rules,
            &mut lines,
            &mut Vec::new(),
        );
        lines
            .iter()
            .map(|l| {
                l.replace(" -m comment --comment", "")
                    .replace(" -j ACCEPT", "")
            })
            .collect()
    }

    #[rstest]
    #[case(&["a", "b", "c"], &["a", "b", "c"], &[])]
    #[case(&["a", "b", "c"], &["a", "c"], &["-I C 2 b"])]
    #[case(&["a", "b", "c"], &["a", "b"], &["-A C c"])]
    #[case(&["a", "c"], &["a", "b", "c"], &["-D C 2"])]
    #[case(&["a", "x", "c"], &["a", "b", "c"], &["-D C 2", "-I C 2 x"])]
    #[case(&["a", "b", "c"], &["c", "a", "b"], &["-D C 1", "-A C c"])]
    #[case(&["a", "b"], &["a", "a", "b", "junk"], &["-D C 4", "-D C 2"])]
    #[case(&["a", "b"], &[], &["-A C a", "-A C b"])]
    #[case(&[], &["a", "b"], &["-D C 2", "-D C 1"])]
    fn minimal_rule_edits(#[case] want: &[&str], #[case] have: &[&str], #[case] expected: &[&str]) {
        assert_eq!(edit(want, have), expected);
    }

    /// Sub-chains left behind without their chain (a crash, a hand edit) are ours by name:
    /// reused when wanted, removed when not, never left to make a later `-N` fail.
    #[test]
    fn stray_subchains_are_reused_or_removed() {
        let want = desired(&FIFTY(usize::MAX));
        let mut observed = IptablesObserved::default();
        let kept = "PFWD-portfwd-PRE-T39".to_string();
        let stray_rules = want.chains[&(Family::V4, Hook::Prerouting)].subchains[&kept].clone();
        observed.stray_subchains.insert(
            (Family::V4, Hook::Prerouting),
            BTreeMap::from([
                (kept.clone(), stray_rules),
                ("PFWD-portfwd-PRE-U7".into(), Vec::new().into()),
            ]),
        );
        let p = plan_rules("portfwd", &want, &observed);
        let all: Vec<&String> = p.tables.iter().flat_map(|t| &t.lines).collect();
        assert!(
            !all.iter().any(|l| l.contains(&format!("-N {kept}"))),
            "{all:#?}"
        );
        assert!(
            all.iter().any(|l| *l == "-X PFWD-portfwd-PRE-U7"),
            "{all:#?}"
        );
        assert!(all.iter().any(|l| *l == "-N PFWD-portfwd-PRE"), "{all:#?}");
    }

    #[test]
    fn longest_increasing_subsequence() {
        assert_eq!(longest_increasing(&[]), Vec::<usize>::new());
        assert_eq!(longest_increasing(&[2, 0, 1]), vec![1, 2]);
        assert_eq!(longest_increasing(&[0, 1, 2]), vec![0, 1, 2]);
    }

    fn desired(json: &str) -> OwnedRules {
        compile_rules(&Config::from_json(json).unwrap().0)
    }

    fn observed_from(rules: &OwnedRules) -> IptablesObserved {
        IptablesObserved {
            owned: rules.clone(),
            ..IptablesObserved::default()
        }
    }

    const FIFTY: fn(usize) -> String = |changed| {
        let forwards: Vec<String> = (0..50)
            .map(|i| {
                let backend = if i == changed { 99 } else { i };
                format!(
                    r#"{{"name":"f{i}","listen_port":{},"to":"10.0.1.{backend}:80"}}"#,
                    10000 + i
                )
            })
            .collect();
        format!(r#"{{"forwards":[{}]}}"#, forwards.join(","))
    };

    #[test]
    fn second_run_is_empty() {
        let want = desired(&FIFTY(usize::MAX));
        let p = plan_rules("portfwd", &want, &observed_from(&want));
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.forwards.count(), 0);
    }

    #[test]
    fn editing_one_of_fifty_touches_only_its_rules() {
        let before = desired(&FIFTY(usize::MAX));
        let after = desired(&FIFTY(7));
        let p = plan_rules("portfwd", &after, &observed_from(&before));
        assert_eq!(p.forwards.updated, vec!["f7"]);
        assert_eq!(p.forwards.added.len() + p.forwards.removed.len(), 0);
        let all: Vec<&String> = p.tables.iter().flat_map(|t| &t.lines).collect();
        // 4 rules of f7 (PRE, POST, 2 FWD marks) deleted and inserted again, nothing else.
        assert_eq!(all.len(), 8, "{all:#?}");
        assert!(
            all.iter()
                .all(|l| l.starts_with("-D ") || l.contains("portfwd:fwd:f7:")),
            "{all:#?}"
        );
        insta::assert_snapshot!(p.tables.iter().map(TablePlan::payload).collect::<String>());
    }

    #[test]
    fn first_apply_then_absent() {
        let want = desired(
            r#"{"forwards":[{"name":"web","listen_port":4321,"to":"172.100.102.101:1234"}]}"#,
        );
        let mut empty = IptablesObserved::default();
        empty.builtin_len.insert((Family::V4, Hook::Prerouting), 3);
        let first = plan_rules("portfwd", &want, &empty);
        assert_eq!(first.forwards.added, vec!["web"]);
        let removal = plan_rules("portfwd", &OwnedRules::default(), &observed_from(&want));
        assert_eq!(removal.forwards.removed, vec!["web"]);
        insta::assert_snapshot!([&first, &removal]
            .iter()
            .flat_map(|p| p.tables.iter().map(TablePlan::payload))
            .collect::<Vec<_>>()
            .join("----\n"));
    }

    #[test]
    fn missing_jump_is_restored_and_duplicates_removed() {
        let want =
            desired(r#"{"forwards":[{"name":"web","listen_port":4321,"to":"10.0.0.2:80"}]}"#);
        let mut have = want.clone();
        let pre = std::sync::Arc::make_mut(&mut have.chains)
            .get_mut(&(Family::V4, Hook::Prerouting))
            .unwrap();
        pre.jumps.clear();
        let fwd = std::sync::Arc::make_mut(&mut have.chains)
            .get_mut(&(Family::V4, Hook::Forward))
            .unwrap();
        let dup = Jump {
            position: 5,
            ..fwd.jumps[0].clone()
        };
        fwd.jumps.push(dup);
        let mut observed = observed_from(&have);
        observed
            .builtin_len
            .insert((Family::V4, Hook::Prerouting), 2);
        observed.builtin_len.insert((Family::V4, Hook::Forward), 9);
        let p = plan_rules("portfwd", &want, &observed);
        let lines: Vec<&String> = p.tables.iter().flat_map(|t| &t.lines).collect();
        assert_eq!(
            lines,
            vec![
                "-D FORWARD -m comment --comment portfwd:jump -j PFWD-portfwd-FWD",
                "-I PREROUTING 1 -m comment --comment portfwd:jump -j PFWD-portfwd-PRE",
            ]
        );
    }

    /// `iptables -t nat -R CHAIN N ... --to-destination OTHER` keeping portfwd's comment: the
    /// comment's hash is a label, so the body is compared and the rule written again.
    #[test]
    fn a_rule_edited_in_place_under_its_comment_is_repaired() {
        let want =
            desired(r#"{"forwards":[{"name":"web","listen_port":4321,"to":"10.0.0.2:80"}]}"#);
        let mut have = want.clone();
        let pre = std::sync::Arc::make_mut(&mut have.chains)
            .get_mut(&(Family::V4, Hook::Prerouting))
            .unwrap();
        let (sub, rules) = pre.subchains.iter_mut().next().unwrap();
        let sub = sub.clone();
        let text = rules[0].render().replace("10.0.0.2:80", "10.9.9.9:80");
        assert_ne!(text, rules[0].render());
        std::sync::Arc::make_mut(rules)[0] = Rule::from_text(&text);
        // And the jump, edited to match one interface only.
        let fwd = std::sync::Arc::make_mut(&mut have.chains)
            .get_mut(&(Family::V4, Hook::Forward))
            .unwrap();
        fwd.jumps[0].rule = Rule::from_text(&format!("-i eth9 {}", fwd.jumps[0].rule.render()));
        let mut observed = observed_from(&have);
        observed.builtin_len.insert((Family::V4, Hook::Forward), 1);
        let p = plan_rules("portfwd", &want, &observed);
        let lines: Vec<&String> = p.tables.iter().flat_map(|t| &t.lines).collect();
        assert!(lines.contains(&&format!("-D {sub} 1")), "{lines:#?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("-A {sub} ")) && l.contains("10.0.0.2:80")),
            "{lines:#?}"
        );
        assert!(
            lines.contains(
                &&"-D FORWARD -i eth9 -m comment --comment portfwd:jump -j PFWD-portfwd-FWD"
                    .to_string()
            ),
            "{lines:#?}"
        );
        assert!(
            lines.contains(
                &&"-I FORWARD 1 -m comment --comment portfwd:jump -j PFWD-portfwd-FWD".to_string()
            ),
            "{lines:#?}"
        );
        assert_eq!(p.forwards.count(), 0, "the entry itself did not change");
        assert_eq!(p.repaired.len(), 2, "{:?}", p.repaired);
        assert!(
            p.repaired[0].starts_with("ipv4 FORWARD jump to PFWD-portfwd-FWD edited"),
            "{:?}",
            p.repaired
        );
        assert!(
            p.repaired[1].contains(&format!("{sub} rule 1 (portfwd:fwd:web:")),
            "{:?}",
            p.repaired
        );
        // Written back as compiled, the next plan is empty.
        assert!(plan_rules("portfwd", &want, &observed_from(&want))
            .repaired
            .is_empty());
    }
}
