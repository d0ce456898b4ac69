//! The minimal edit of the instance's table as one `nft -f` script, one transaction for both
//! families: objects are matched by their comments, so an unchanged rule or element is never
//! touched (its counters and the connections it made stay) and a changed forward costs only
//! its own rules and elements. The table is created when missing and deleted when nothing is
//! wanted; nothing outside it is ever named.

use std::collections::{BTreeMap, BTreeSet};

use super::observe::{Hooked, MapDecl, NftObserved};
use super::table::{
    element_text, ident, rule_text, with_prefix, Base, Body, Elements, MapKind, Rule, Table, FAMILY,
};
use crate::firewall::EntryChanges;
use crate::ownership::{entry_prefix, parse_comment, KIND_FORWARD, KIND_MASQUERADE};
use imbl::ordmap::DiffItem;

/// The script and what it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TableEdit {
    /// One `nft -f -` script, a command per line, each adding or deleting one object (or a
    /// map's elements); empty: nothing to do.
    pub script: String,
    pub forwards: EntryChanges,
    pub masquerade: EntryChanges,
    /// Owned objects put right that no entry change explains.
    pub repaired: Vec<String>,
    /// The edit needs rule handles the observed state does not have (it was assumed, not
    /// read): the table must be read first.
    pub needs_read: bool,
}

/// The rules of a kept chain to delete (by position) and to add (with the position of the
/// rule each goes before, None: at the end). A desired rule already there, exactly as portfwd writes it and
/// in order, is kept; one edited by hand, out of order, or looking up a map that is declared
/// again is written again; anything else in the chain is deleted.
fn chain_edit<'r>(
    place: (&str, &str),
    want: &'r [Rule],
    have: &[Rule],
    redeclared: &BTreeSet<&str>,
    repaired: &mut Vec<String>,
) -> (Vec<usize>, Vec<(&'r Rule, Option<usize>)>) {
    let (instance, chain) = place;
    let wanted: BTreeMap<&str, &Rule> = want.iter().map(|r| (r.comment.as_str(), r)).collect();
    let looks_up_redeclared = |r: &Rule| matches!(&r.body, Body::Dispatch(kind) if redeclared.contains(kind.name().as_str()));
    let mut position: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, r) in have.iter().enumerate() {
        match wanted.get(r.comment.as_str()) {
            Some(w) if same_rule(w, r) && !looks_up_redeclared(r) => {
                if position.contains_key(r.comment.as_str()) {
                    repaired.push(format!("rule {} of chain {chain} duplicated", i + 1));
                } else {
                    position.insert(r.comment.as_str(), i);
                }
            }
            Some(_) if looks_up_redeclared(r) => {}
            Some(_) => repaired.push(format!(
                "rule {} of chain {chain} ({}) edited",
                i + 1,
                r.comment
            )),
            None if parse_comment(&r.comment, instance).is_none() => repaired.push(format!(
                "rule {} of chain {chain} not written by portfwd",
                i + 1
            )),
            None => {}
        }
    }
    let mut kept: Vec<Option<usize>> = Vec::with_capacity(want.len());
    let mut last: Option<usize> = None;
    let mut out_of_order = false;
    for rule in want {
        let found = position.get(rule.comment.as_str()).copied();
        let at = found.filter(|&i| last.is_none_or(|l| i > l));
        out_of_order |= found.is_some() && at.is_none();
        if at.is_some() {
            last = at;
        }
        kept.push(at);
    }
    if out_of_order {
        repaired.push(format!("rule order of chain {chain}"));
    }
    let keep: BTreeSet<usize> = kept.iter().flatten().copied().collect();
    let deletes = (0..have.len()).filter(|i| !keep.contains(i)).collect();
    let mut adds = Vec::new();
    for (i, rule) in want.iter().enumerate() {
        if kept[i].is_none() {
            // Before the next kept rule, so the order comes out right.
            let before = kept[i..].iter().flatten().next().copied();
            adds.push((rule, before));
        }
    }
    (deletes, adds)
}

/// Equal as nft sees them: nft lists a set's elements sorted, so sources and protocols are
/// compared as sets.
fn same_rule(want: &Rule, have: &Rule) -> bool {
    let sorted = |r: &Rule| {
        let mut r = r.clone();
        if let Body::Nat(n) = &mut r.body {
            n.sources.sort();
            n.protos.sort();
        }
        r
    };
    want == have || sorted(want) == sorted(have)
}

/// Where a key of two maps that differ there is: in both (with other values), only the
/// wanted, only the had.
enum Side<'a, V> {
    Both(&'a String, &'a V, &'a V),
    Want(&'a String, &'a V),
    Have(&'a String, &'a V),
}

/// The entries where two maps differ, in key order. Nodes the two trees share (the earlier
/// table is the desired one with a few forwards' elements edited) are skipped unvisited.
fn differences<'a, V: Clone + PartialEq>(
    want: &'a imbl::OrdMap<String, V>,
    have: &'a imbl::OrdMap<String, V>,
) -> impl Iterator<Item = Side<'a, V>> {
    have.diff(want).map(|item| match item {
        DiffItem::Add(k, w) => Side::Want(k, w),
        DiffItem::Update {
            old: (k, h),
            new: (_, w),
        } => Side::Both(k, w, h),
        DiffItem::Remove(k, h) => Side::Have(k, h),
    })
}

/// `map` or `set` when the map loses so many elements that flushing it and adding back the
/// `kept` costs less than deleting the `stale` (it is declared as portfwd declares it: it
/// was not redeclared). Only hashed maps: their elements carry no counters, and a key added
/// back in the transaction that flushed it is one lookup, not an interval's neighbours.
fn flush_instead(map: &str, stale: usize, kept: usize) -> Option<&'static str> {
    let kind = MapKind::from_name(map).filter(|k| !k.ranged)?;
    (stale > 64 && stale > kept.saturating_mul(4)).then(|| kind.object())
}

/// The declaration portfwd gives chain `name` (None: a regular chain).
fn declared_hook(name: &str) -> Option<Hooked> {
    Base::from_name(name).map(Hooked::of)
}

/// The edit from `have` to `want` for table `table`. Every attribute of every owned object
/// is compared with what portfwd writes, not only its comment: table flags, each chain's
/// type, hook, priority and policy, each map's declaration, each rule's whole body, each
/// element's key and verdict; what differs is written again and named in `repaired`.
pub(crate) fn plan_table(
    instance: &str,
    table: &str,
    want: &Table,
    have: &NftObserved,
) -> TableEdit {
    let mut s: Vec<String> = Vec::new();
    let mut repaired: Vec<String> = Vec::new();
    let mut needs_read = false;
    let changes = entry_changes(instance, want, &have.table);
    if want.is_empty() {
        if have.exists {
            s.push(format!("delete table {FAMILY} {table}"));
        }
        return finish(s, changes, repaired, false);
    }
    let t = table;
    if !have.exists {
        s.push(format!("add table {FAMILY} {t}"));
    } else if have.flagged {
        // `add table` without flags clears them (a dormant table forwards nothing).
        s.push(format!("add table {FAMILY} {t}"));
        repaired.push(format!("table {FAMILY} {t} flags (dormant)"));
    }
    // Chains whose declaration differs are deleted and declared again; so are maps (after
    // the dispatch rules that look them up).
    let redeclared_chains: BTreeSet<&str> = want
        .chains
        .keys()
        .filter(|name| {
            have.table.chains.contains_key(*name)
                && have.hook(name) != Some(declared_hook(name).as_ref())
        })
        .map(String::as_str)
        .collect();
    for name in &redeclared_chains {
        let found = have
            .hook(name)
            .flatten()
            .map_or("a regular chain".to_string(), ToString::to_string);
        repaired.push(format!("chain {name} ({found})"));
    }
    let redeclared_maps: BTreeSet<&str> = want
        .maps
        .keys()
        .filter(|name| {
            let declared = MapKind::from_name(name).map(MapDecl::of);
            have.map_decls
                .get(*name)
                .is_some_and(|d| Some(d) != declared.as_ref())
        })
        .map(String::as_str)
        .collect();
    for name in &redeclared_maps {
        repaired.push(format!("map {name} declaration"));
    }
    // Stale elements of kept maps: not wanted, or not what portfwd writes under that comment.
    let mut element_adds: Vec<(&String, Vec<String>)> = Vec::new();
    for (name, elements) in have.table.maps.iter() {
        let Some(wanted) = want.maps.get(name) else {
            continue;
        };
        if redeclared_maps.contains(name.as_str()) {
            continue;
        }
        let mut stale: Vec<String> = Vec::new();
        let mut new: Vec<String> = Vec::new();
        for side in differences(wanted, elements) {
            let (comment, element) = match side {
                Side::Both(comment, w, h) => {
                    repaired.push(format!("element {comment} of map {name} edited"));
                    new.extend(element_text(comment, w));
                    (comment, h)
                }
                Side::Want(comment, w) => {
                    new.extend(element_text(comment, w));
                    continue;
                }
                Side::Have(comment, h) => {
                    if parse_comment(comment, instance).is_none() {
                        repaired.push(format!("element of map {name} not written by portfwd"));
                    }
                    (comment, h)
                }
            };
            // Read: the key as nft listed it; assumed: as portfwd writes it.
            match have.keys.get(&(name.clone(), comment.clone())) {
                Some(key) => stale.push(key.clone()),
                None if have.assumed => stale.push(element.key()),
                None => {}
            }
        }
        if let Some(object) = flush_instead(name, stale.len(), wanted.len()) {
            // nft parses and the kernel deletes each stale element; a flush and the kept
            // ones again cost what is kept (50,000 forwards to 2: 0.9 s of deletes).
            s.push(format!("flush {object} {FAMILY} {t} {name}"));
            new = wanted
                .iter()
                .filter_map(|(c, e)| element_text(c, e))
                .collect();
        } else if !stale.is_empty() {
            s.push(format!(
                "delete element {FAMILY} {t} {name} {{ {} }}",
                stale.join(", ")
            ));
        }
        element_adds.push((name, new));
    }
    let mut adds: Vec<(String, &Rule, Option<u64>)> = Vec::new();
    for (name, rules) in have.table.chains.iter() {
        let Some(q) = ident(name) else { continue };
        let handles = have.handles.get(name).map_or(&[][..], Vec::as_slice);
        match want.chains.get(name) {
            None => {
                if !rules.is_empty() {
                    s.push(format!("flush chain {FAMILY} {t} {q}"));
                }
            }
            Some(_) if redeclared_chains.contains(name.as_str()) => {
                s.push(format!("flush chain {FAMILY} {t} {q}"));
                s.push(format!("delete chain {FAMILY} {t} {q}"));
            }
            // Not read, so as written: a forward's own chain is written again whole.
            Some(wanted) if have.assumed && Base::from_name(name).is_none() => {
                if wanted != rules {
                    s.push(format!("flush chain {FAMILY} {t} {q}"));
                    adds.extend(wanted.iter().map(|r| (name.clone(), r, None)));
                }
            }
            Some(wanted) => {
                let (deletes, missing) = chain_edit(
                    (instance, name),
                    wanted,
                    rules,
                    &redeclared_maps,
                    &mut repaired,
                );
                for i in deletes {
                    match handles.get(i) {
                        Some(handle) => {
                            s.push(format!("delete rule {FAMILY} {t} {q} handle {handle}"));
                        }
                        None => needs_read = true,
                    }
                }
                for (rule, before) in missing {
                    let at = before.map(|j| handles.get(j).copied());
                    needs_read |= at == Some(None);
                    adds.push((name.clone(), rule, at.flatten()));
                }
            }
        }
    }
    for name in have
        .table
        .maps
        .keys()
        .filter(|m| !want.maps.contains_key(*m) || redeclared_maps.contains(m.as_str()))
    {
        // As it is declared now: a set or a map.
        let object = match have.map_decls.get(name) {
            Some(decl) if decl.data.is_empty() => "set",
            _ => "map",
        };
        s.push(format!("delete {object} {FAMILY} {t} {name}"));
    }
    let new_chains =
        |c: &&String| !have.table.chains.contains_key(*c) || redeclared_chains.contains(c.as_str());
    for name in want.chains.keys().filter(new_chains) {
        let Some(q) = ident(name) else { continue };
        match Base::from_name(name) {
            Some(base) => s.push(format!(
                "add chain {FAMILY} {t} {q} {{ {} }}",
                base.declaration()
            )),
            None => s.push(format!("add chain {FAMILY} {t} {q}")),
        }
    }
    let new_maps =
        |m: &&String| !have.table.maps.contains_key(*m) || redeclared_maps.contains(m.as_str());
    for name in want.maps.keys().filter(new_maps) {
        let Some(kind) = MapKind::from_name(name) else {
            continue;
        };
        s.push(format!(
            "add {} {FAMILY} {t} {name} {{ {} }}",
            kind.object(),
            kind.declaration()
        ));
        let all: Vec<String> = want.maps[name]
            .iter()
            .filter_map(|(c, e)| element_text(c, e))
            .collect();
        element_adds.push((name, all));
    }
    for (name, rules) in want.chains.iter().filter(|(c, _)| new_chains(c)) {
        adds.extend(rules.iter().map(|r| (name.clone(), r, None)));
    }
    for (chain, rule, before) in adds {
        let (Some(q), Some(text)) = (ident(&chain), rule_text(rule)) else {
            continue;
        };
        match before {
            Some(handle) => s.push(format!(
                "insert rule {FAMILY} {t} {q} position {handle} {text}"
            )),
            None => s.push(format!("add rule {FAMILY} {t} {q} {text}")),
        }
    }
    element_adds.sort();
    for (name, new) in element_adds {
        if !new.is_empty() {
            s.push(format!(
                "add element {FAMILY} {t} {name} {{ {} }}",
                new.join(", ")
            ));
        }
    }
    for name in have
        .table
        .chains
        .keys()
        .filter(|c| !want.chains.contains_key(*c))
    {
        if let Some(q) = ident(name) {
            s.push(format!("delete chain {FAMILY} {t} {q}"));
        }
    }
    finish(s, changes, repaired, needs_read)
}

fn finish(
    lines: Vec<String>,
    (forwards, masquerade): (EntryChanges, EntryChanges),
    repaired: Vec<String>,
    needs_read: bool,
) -> TableEdit {
    TableEdit {
        script: lines.iter().map(|l| format!("{l}\n")).collect(),
        forwards,
        masquerade,
        repaired,
        needs_read,
    }
}

/// Entries whose objects differ, by kind: an entry differs exactly when one of its rules'
/// or elements is in one table and not the other. Each map's elements are walked in step,
/// both sorted by comment, and only chains that differ are looked into, so a change among
/// 50,000 forwards allocates for a handful of objects, not a set of every comment (which cost
/// such a change a fifth of its time, growing).
fn entry_changes<'a>(
    instance: &str,
    want: &'a Table,
    have: &'a Table,
) -> (EntryChanges, EntryChanges) {
    fn owner<'a>(comment: &'a str, instance: &str) -> Option<(&'a str, &'a str)> {
        let tag = parse_comment(comment, instance)?;
        Some((tag.kind, tag.name))
    }
    // Gathered, then sorted once: removing 50,000 forwards touches 150,000 objects.
    let mut touched: Vec<(&str, &str)> = Vec::new();
    let empty = Elements::new();
    let names: BTreeSet<&String> = want.maps.keys().chain(have.maps.keys()).collect();
    for name in names {
        let w = want.maps.get(name).unwrap_or(&empty);
        let h = have.maps.get(name).unwrap_or(&empty);
        for side in differences(w, h) {
            let odd = match side {
                Side::Both(..) => continue,
                Side::Want(c, _) | Side::Have(c, _) => c,
            };
            touched.extend(owner(odd, instance));
        }
    }
    let no_rules: Vec<Rule> = Vec::new();
    let chains: BTreeSet<&String> = want.chains.keys().chain(have.chains.keys()).collect();
    for name in chains {
        let w = want.chains.get(name).unwrap_or(&no_rules);
        let h = have.chains.get(name).unwrap_or(&no_rules);
        if w == h {
            continue;
        }
        let w: BTreeSet<&str> = w.iter().map(|r| r.comment.as_str()).collect();
        let h: BTreeSet<&str> = h.iter().map(|r| r.comment.as_str()).collect();
        touched.extend(
            w.symmetric_difference(&h)
                .filter_map(|c| owner(c, instance)),
        );
    }
    touched.sort_unstable();
    touched.dedup();
    let mut forwards = EntryChanges::default();
    let mut masquerade = EntryChanges::default();
    if touched.is_empty() {
        return (forwards, masquerade);
    }
    // Which of the touched entries each table holds at all: their elements looked up by
    // their comments' prefix while they are few (a scan of 150,000 comments cost a change
    // of one forward a tenth of its plan), the whole table scanned when they are many.
    let holds = |table: &Table| -> Vec<bool> {
        let mut held = vec![false; touched.len()];
        let mut mark = |comment: &str| {
            if let Some(i) = owner(comment, instance).and_then(|k| touched.binary_search(&k).ok()) {
                held[i] = true;
            }
        };
        for rule in table.chains.values().flatten() {
            mark(&rule.comment);
        }
        if !table.lookups_pay(touched.len()) {
            for comment in table.maps.values().flat_map(|e| e.keys()) {
                mark(comment);
            }
            return held;
        }
        for (i, &(kind, name)) in touched.iter().enumerate() {
            let prefix = entry_prefix(instance, kind, name);
            held[i] |= table.maps.values().any(|elements| {
                with_prefix(elements, &prefix)
                    .any(|(comment, _)| owner(comment, instance) == Some((kind, name)))
            });
        }
        held
    };
    let (wanted, had) = (holds(want), holds(have));
    for (i, key) in touched.iter().enumerate() {
        let list = match key.0 {
            KIND_FORWARD => &mut forwards,
            KIND_MASQUERADE => &mut masquerade,
            _ => continue,
        };
        let name = key.1.to_string();
        match (wanted[i], had[i]) {
            (true, false) => list.added.push(name),
            (false, true) => list.removed.push(name),
            _ => list.updated.push(name),
        }
    }
    (forwards, masquerade)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::nftables::compile::compile_table;
    use crate::firewall::nftables::observe::parse;
    use crate::model::Config;
    use serde_json::json;

    const PARAMS: &str = include_str!("testdata/params.json");
    /// `nft -j list table inet portfwd-gw` after applying [`PARAMS`].
    const LISTING: &str = include_str!("testdata/list-table.json");

    fn table(json: &str) -> Table {
        let (config, _, _) = Config::from_json(json).expect("valid params");
        compile_table(&config)
    }

    #[test]
    fn the_table_as_it_is_needs_no_edit() {
        let edit = plan_table("gw", "portfwd-gw", &table(PARAMS), &parse(LISTING).unwrap());
        assert_eq!(edit.script, "");
        assert_eq!(edit.forwards, EntryChanges::default());
    }

    #[test]
    fn a_changed_backend_rewrites_only_that_forwards_rules() {
        let changed = PARAMS.replace("10.0.2.2:80", "10.0.2.3:80");
        let edit = plan_table(
            "gw",
            "portfwd-gw",
            &table(&changed),
            &parse(LISTING).unwrap(),
        );
        // A plain forward: its DNAT and SNAT elements, out and in again.
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(
            lines,
            [
                "delete element inet portfwd-gw post-tcp-port4-masq { 8080 . 10.0.2.2 . 80 }",
                "delete element inet portfwd-gw pre-port4-nat { tcp . 8080 }",
                "add element inet portfwd-gw post-tcp-port4-masq { 8080 . 10.0.2.3 . 80 comment \"gw:fwd:web:6436f716\" }",
                "add element inet portfwd-gw pre-port4-nat { tcp . 8080 comment \"gw:fwd:web:53bed73d\" : 10.0.2.3 . 80 }",
            ]
        );
        assert_eq!(edit.forwards.updated, ["web"]);
        // A forward with chains of its own: their rules.
        let changed = PARAMS.replace("\"192.168.0.2\"", "\"192.168.0.3\"");
        let edit = plan_table(
            "gw",
            "portfwd-gw",
            &table(&changed),
            &parse(LISTING).unwrap(),
        );
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        for chain in ["pre-db", "out-db", "post-db"] {
            let delete = format!("delete rule inet portfwd-gw {chain} handle ");
            let add = format!("add rule inet portfwd-gw {chain} ");
            assert!(lines.iter().any(|l| l.starts_with(&delete)), "{lines:#?}");
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&add) && l.contains("192.168.0.3")),
                "{lines:#?}"
            );
        }
        assert_eq!(edit.forwards.updated, ["db"]);
    }

    fn without(name: &str) -> TableEdit {
        let mut v: serde_json::Value = serde_json::from_str(PARAMS).unwrap();
        let list = v["forwards"].as_array_mut().unwrap();
        list.retain(|f| f["name"] != name);
        plan_table(
            "gw",
            "portfwd-gw",
            &table(&v.to_string()),
            &parse(LISTING).unwrap(),
        )
    }

    #[test]
    fn a_removed_forward_takes_its_elements_and_chains_with_it() {
        // web is the only forward masqueraded by the TCP set: it goes with its rule.
        let edit = without("web");
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(
            lines[..2],
            [
                "delete element inet portfwd-gw pre-port4-mark { tcp . 8080 }",
                "delete element inet portfwd-gw pre-port4-nat { tcp . 8080 }",
            ]
        );
        assert!(lines[2].starts_with("delete rule inet portfwd-gw postrouting handle "));
        assert_eq!(
            lines[3..],
            ["delete set inet portfwd-gw post-tcp-port4-masq"]
        );
        assert_eq!(edit.forwards.removed, ["web"]);
        // The last of a map's elements takes the map and its rule with it.
        let edit = without("r");
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(lines[0], "flush chain inet portfwd-gw pre-r");
        assert!(lines[1].starts_with("delete rule inet portfwd-gw prerouting handle "));
        assert_eq!(
            lines[2..],
            [
                "delete map inet portfwd-gw pre-port4-exact",
                "delete chain inet portfwd-gw pre-r"
            ]
        );
        assert_eq!(edit.forwards.removed, ["r"]);
    }

    fn plain(n: usize) -> Table {
        compile_table(&crate::testing::plain_forwards(n))
    }

    /// Most of a hashed map's elements going: the map is flushed and the kept ones written
    /// again, whatever the kind of map; a few going are deleted by key.
    #[test]
    fn removing_most_elements_flushes_the_map() {
        let have = NftObserved::as_written(plain(100));
        let edit = plan_table("gw", "portfwd-gw", &plain(2), &have);
        let lines: Vec<&str> = edit.script.lines().collect();
        assert!(
            lines.contains(&"flush map inet portfwd-gw pre-port4-nat")
                && lines.contains(&"flush set inet portfwd-gw post-tcp-port4-masq"),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.starts_with("delete ")),
            "{lines:#?}"
        );
        let nat_adds: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("add element inet portfwd-gw pre-port4-nat"))
            .collect();
        assert_eq!(nat_adds.len(), 1, "{lines:#?}");
        assert!(nat_adds[0].contains("10000") && nat_adds[0].contains("10001"));
        assert_eq!(edit.forwards.removed.len(), 98);
        let edit = plan_table("gw", "portfwd-gw", &plain(90), &have);
        assert!(!edit.script.contains("flush "), "{}", edit.script);
        assert!(edit
            .script
            .contains("delete element inet portfwd-gw pre-port4-nat"));
    }

    #[test]
    fn absent_deletes_the_table_and_nothing_else() {
        let edit = plan_table(
            "gw",
            "portfwd-gw",
            &Table::default(),
            &parse(LISTING).unwrap(),
        );
        assert_eq!(edit.script, "delete table inet portfwd-gw\n");
        assert_eq!(edit.forwards.removed.len(), 6);
    }

    /// Rollback plans back to what was read: every rule read back can be written again.
    #[test]
    fn a_snapshot_is_written_back_whole() {
        let observed = parse(LISTING).unwrap();
        let edit = plan_table("gw", "portfwd-gw", &observed.table, &NftObserved::default());
        let rules = observed.table.chains.values().map(Vec::len).sum::<usize>();
        let added = edit
            .script
            .lines()
            .filter(|l| l.starts_with("add rule "))
            .count();
        assert_eq!(added, rules, "{}", edit.script);
        assert!(edit.script.starts_with("add table inet portfwd-gw\n"));
    }

    /// The listing with `edit` applied to its JSON objects.
    fn edited(edit: impl Fn(&mut serde_json::Value)) -> NftObserved {
        let mut json: serde_json::Value = serde_json::from_str(LISTING).unwrap();
        for object in json["nftables"].as_array_mut().unwrap() {
            edit(object);
        }
        parse(&json.to_string()).unwrap()
    }

    fn repair(have: &NftObserved) -> TableEdit {
        plan_table("gw", "portfwd-gw", &table(PARAMS), have)
    }

    #[test]
    fn a_dormant_table_is_woken() {
        let edit = repair(&edited(|o| {
            if let Some(t) = o.get_mut("table") {
                t["flags"] = "dormant".into();
            }
        }));
        assert_eq!(edit.script, "add table inet portfwd-gw\n");
        assert_eq!(edit.repaired, ["table inet portfwd-gw flags (dormant)"]);
        assert_eq!(edit.forwards, EntryChanges::default());
    }

    #[test]
    fn a_base_chain_with_another_policy_or_priority_is_declared_again() {
        for (key, value) in [("policy", json!("drop")), ("prio", json!(5))] {
            let edit = repair(&edited(|o| {
                if o["chain"]["name"] == "prerouting" {
                    o["chain"][key] = value.clone();
                }
            }));
            let lines: Vec<&str> = edit.script.lines().collect();
            assert_eq!(
                lines[..3],
                [
                    "flush chain inet portfwd-gw prerouting",
                    "delete chain inet portfwd-gw prerouting",
                    "add chain inet portfwd-gw prerouting { type nat hook prerouting priority dstnat; policy accept; }",
                ],
                "{lines:#?}"
            );
            // Its lookup rules are written again, nothing else.
            let rules = table(PARAMS).chains["prerouting"].len();
            assert_eq!(lines.len(), 3 + rules, "{lines:#?}");
            assert!(lines[3..]
                .iter()
                .all(|l| l.starts_with("add rule inet portfwd-gw prerouting ")));
            assert_eq!(edit.repaired.len(), 1, "{:?}", edit.repaired);
            assert!(edit.repaired[0].starts_with("chain prerouting (type nat hook prerouting"));
        }
    }

    #[test]
    fn a_rule_edited_under_its_comment_is_written_again() {
        let edit = repair(&edited(|o| {
            if o["rule"]["chain"] == "pre-r" {
                o["rule"]["expr"][2]["redirect"]["port"] = 23.into();
            }
        }));
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].starts_with("delete rule inet portfwd-gw pre-r handle "));
        assert!(lines[1].contains("redirect to :22"), "{lines:#?}");
        assert_eq!(
            edit.repaired,
            ["rule 1 of chain pre-r (gw:fwd:r:38a511b8) edited"]
        );
        // A mark set's rule that sets another mark.
        let edit = repair(&edited(|o| {
            if o["rule"]["chain"] == "prerouting"
                && o["rule"]["comment"]
                    .as_str()
                    .is_some_and(|c| c.contains("pre-port4-mark"))
            {
                o["rule"]["expr"][4]["mangle"]["value"]["|"][1] = 1.into();
            }
        }));
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].starts_with("delete rule inet portfwd-gw prerouting handle "));
        assert!(
            lines[1].starts_with("insert rule inet portfwd-gw prerouting position "),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("@pre-port4-mark ct mark set ct mark | 0x00002000"),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_statement_added_by_hand_makes_the_rule_unknown_and_rewritten() {
        let edit = repair(&edited(|o| {
            if o["rule"]["chain"] == "pre-r" {
                let expr = o["rule"]["expr"].as_array_mut().unwrap();
                expr.insert(0, json!({"log": {"prefix": "x"}}));
            }
        }));
        assert_eq!(edit.script.lines().count(), 2, "{}", edit.script);
        assert_eq!(edit.repaired.len(), 1, "{:?}", edit.repaired);
    }

    #[test]
    fn an_element_edited_by_hand_and_a_stranger_in_an_owned_chain_are_put_right() {
        let edit = repair(&edited(|o| {
            if o["map"]["name"] == "pre-port4-nat" {
                let elems = o["map"]["elem"].as_array_mut().unwrap();
                for e in elems.iter_mut() {
                    if e[0]["elem"]["comment"] == "gw:fwd:web:2981386a" {
                        e[1] = json!({"concat": ["10.9.9.9", 80]});
                    }
                }
            }
            if o["map"]["name"] == "pre-port4-exact" {
                let elems = o["map"]["elem"].as_array_mut().unwrap();
                elems[0][1] = json!({"jump": {"target": "pre-db"}});
            }
            if o["rule"]["chain"] == "pre-r" {
                o["rule"]["comment"] = serde_json::Value::Null;
            }
        }));
        let lines: Vec<&str> = edit.script.lines().collect();
        for line in [
            "delete element inet portfwd-gw pre-port4-nat { tcp . 8080 }",
            "add element inet portfwd-gw pre-port4-nat { tcp . 8080 comment \"gw:fwd:web:2981386a\" : 10.0.2.2 . 80 }",
            "delete element inet portfwd-gw pre-port4-exact { tcp . 2222 }",
            "add element inet portfwd-gw pre-port4-exact { tcp . 2222 comment \"gw:fwd:r:cb05569b\" : jump pre-r }",
        ] {
            assert!(lines.contains(&line), "{line}: {lines:#?}");
        }
        assert!(lines
            .iter()
            .any(|l| l.starts_with("delete rule inet portfwd-gw pre-r handle")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("add rule inet portfwd-gw pre-r ")));
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert_eq!(
            edit.repaired,
            [
                "element gw:fwd:r:cb05569b of map pre-port4-exact edited",
                "element gw:fwd:web:2981386a of map pre-port4-nat edited",
                "rule 1 of chain pre-r not written by portfwd"
            ]
        );
    }

    #[test]
    fn a_map_declared_otherwise_is_declared_again_with_its_lookups() {
        let edit = repair(&edited(|o| {
            if o["map"]["name"] == "pre-port4-exact" {
                o["map"]["flags"] = json!(["interval"]);
            }
        }));
        let lines: Vec<&str> = edit.script.lines().collect();
        let at = |prefix: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix}: {lines:#?}"))
        };
        let del_rule = at("delete rule inet portfwd-gw prerouting handle");
        let del_map = at("delete map inet portfwd-gw pre-port4-exact");
        let add_map = at("add map inet portfwd-gw pre-port4-exact");
        let add_rule = at("insert rule inet portfwd-gw prerouting");
        let add_elem = at("add element inet portfwd-gw pre-port4-exact");
        assert!(
            del_rule < del_map && del_map < add_map && add_map < add_rule && add_rule < add_elem
        );
        assert_eq!(edit.repaired, ["map pre-port4-exact declaration"]);
        // A set declared as a map (or the other way round) is deleted as what it is.
        let edit = repair(&edited(|o| {
            if let Some(set) = o
                .get("set")
                .filter(|s| s["name"] == "pre-port4-mark")
                .cloned()
            {
                let mut map = set;
                map["map"] = json!("verdict");
                *o = json!({ "map": map });
            }
        }));
        let lines: Vec<&str> = edit.script.lines().collect();
        assert!(
            lines.contains(&"delete map inet portfwd-gw pre-port4-mark"),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with(
                "add set inet portfwd-gw pre-port4-mark { type inet_proto . inet_service; }"
            )),
            "{lines:#?}"
        );
        assert_eq!(edit.repaired, ["map pre-port4-mark declaration"]);
    }
}
