//! The minimal edit of the instance's table as one `nft -f` script, one transaction for both
//! families: objects are matched by their comments, so an unchanged rule or element is never
//! touched (its counters and the connections it made stay) and a changed forward costs only
//! its own rules and elements. The table is created when missing and deleted when nothing is
//! wanted; nothing outside it is ever named.

use std::collections::{BTreeMap, BTreeSet};

use super::observe::NftObserved;
use super::table::{element_text, ident, rule_text, Base, Element, Rule, Table, FAMILY};
use crate::firewall::EntryChanges;
use crate::ownership::{parse_comment, KIND_FORWARD, KIND_MASQUERADE};

/// The script and what it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableEdit {
    /// One `nft -f -` script, a command per line, each adding or deleting one object (or a
    /// map's elements); empty: nothing to do.
    pub script: String,
    pub forwards: EntryChanges,
    pub masquerade: EntryChanges,
}

/// The rules of a kept chain to delete (by handle) and to add (with the handle each goes
/// before, None: at the end). A desired rule already there in order is kept; one out of order
/// is written again.
fn chain_edit<'r>(
    want: &'r [Rule],
    have: &[Rule],
    handles: &[u64],
) -> (Vec<u64>, Vec<(&'r Rule, Option<u64>)>) {
    let position: BTreeMap<&str, usize> = have
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.comment.is_empty())
        .map(|(i, r)| (r.comment.as_str(), i))
        .collect();
    let mut kept: Vec<Option<usize>> = Vec::with_capacity(want.len());
    let mut last: Option<usize> = None;
    for rule in want {
        let at = position
            .get(rule.comment.as_str())
            .copied()
            .filter(|&i| last.is_none_or(|l| i > l));
        if at.is_some() {
            last = at;
        }
        kept.push(at);
    }
    let keep: BTreeSet<usize> = kept.iter().flatten().copied().collect();
    let deletes = (0..have.len())
        .filter(|i| !keep.contains(i))
        .filter_map(|i| handles.get(i).copied())
        .collect();
    let mut adds = Vec::new();
    for (i, rule) in want.iter().enumerate() {
        if kept[i].is_none() {
            // Before the next kept rule, so the order comes out right.
            let before = kept[i..]
                .iter()
                .flatten()
                .next()
                .and_then(|&j| handles.get(j).copied());
            adds.push((rule, before));
        }
    }
    (deletes, adds)
}

/// The edit from `have` to `want` for table `table`.
pub fn plan_table(instance: &str, table: &str, want: &Table, have: &NftObserved) -> TableEdit {
    let mut s: Vec<String> = Vec::new();
    let changes = entry_changes(instance, want, &have.table);
    if want.is_empty() {
        if have.exists {
            s.push(format!("delete table {FAMILY} {table}"));
        }
        return finish(s, changes);
    }
    let t = table;
    if !have.exists {
        s.push(format!("add table {FAMILY} {t}"));
    }
    for name in want
        .chains
        .keys()
        .filter(|c| !have.table.chains.contains_key(*c))
    {
        let Some(q) = ident(name) else { continue };
        match Base::from_name(name) {
            Some(base) => s.push(format!(
                "add chain {FAMILY} {t} {q} {{ {} }}",
                base.declaration()
            )),
            None => s.push(format!("add chain {FAMILY} {t} {q}")),
        }
    }
    for name in want
        .maps
        .keys()
        .filter(|m| !have.table.maps.contains_key(*m))
    {
        let decl = super::table::MapKind::from_name(name)
            .map(|k| k.declaration())
            .unwrap_or_default();
        s.push(format!("add map {FAMILY} {t} {name} {{ {decl} }}"));
    }
    // Stale elements of kept maps, stale rules of kept chains; removed chains are flushed.
    for (name, elements) in &have.table.maps {
        let Some(wanted) = want.maps.get(name) else {
            continue;
        };
        let keys: Vec<&String> = elements
            .keys()
            .filter(|c| !wanted.contains_key(*c))
            .filter_map(|c| have.keys.get(&(name.clone(), c.clone())))
            .collect();
        if !keys.is_empty() {
            let keys: Vec<&str> = keys.into_iter().map(String::as_str).collect();
            s.push(format!(
                "delete element {FAMILY} {t} {name} {{ {} }}",
                keys.join(", ")
            ));
        }
    }
    let mut adds: Vec<(String, &Rule, Option<u64>)> = Vec::new();
    for (name, rules) in &have.table.chains {
        let Some(q) = ident(name) else { continue };
        let handles = have.handles.get(name).map_or(&[][..], Vec::as_slice);
        match want.chains.get(name) {
            None => {
                if !rules.is_empty() {
                    s.push(format!("flush chain {FAMILY} {t} {q}"));
                }
            }
            Some(wanted) => {
                let (deletes, missing) = chain_edit(wanted, rules, handles);
                for handle in deletes {
                    s.push(format!("delete rule {FAMILY} {t} {q} handle {handle}"));
                }
                adds.extend(missing.into_iter().map(|(r, at)| (name.clone(), r, at)));
            }
        }
    }
    for name in have
        .table
        .maps
        .keys()
        .filter(|m| !want.maps.contains_key(*m))
    {
        s.push(format!("delete map {FAMILY} {t} {name}"));
    }
    for (name, rules) in want
        .chains
        .iter()
        .filter(|(c, _)| !have.table.chains.contains_key(*c))
    {
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
    for (name, elements) in &want.maps {
        let present = have.table.maps.get(name);
        let new: Vec<String> = elements
            .iter()
            .filter(|(c, _)| present.is_none_or(|p| !p.contains_key(*c)))
            .filter_map(|(c, e): (&String, &Element)| element_text(c, e))
            .collect();
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
    finish(s, changes)
}

fn finish(lines: Vec<String>, (forwards, masquerade): (EntryChanges, EntryChanges)) -> TableEdit {
    TableEdit {
        script: lines.iter().map(|l| format!("{l}\n")).collect(),
        forwards,
        masquerade,
    }
}

/// Entries whose objects differ, by kind: the comments of all of an entry's rules and
/// elements, compared as a set.
fn entry_changes(instance: &str, want: &Table, have: &Table) -> (EntryChanges, EntryChanges) {
    fn objects(instance: &str, table: &Table) -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        let comments = table
            .chains
            .values()
            .flat_map(|rules| rules.iter().map(|r| r.comment.as_str()))
            .chain(
                table
                    .maps
                    .values()
                    .flat_map(|e| e.keys().map(String::as_str)),
            );
        for comment in comments {
            if let Some(tag) = parse_comment(comment, instance) {
                out.entry((tag.kind.to_string(), tag.name.to_string()))
                    .or_default()
                    .insert(comment.to_string());
            }
        }
        out
    }
    let (want, have) = (objects(instance, want), objects(instance, have));
    let mut forwards = EntryChanges::default();
    let mut masquerade = EntryChanges::default();
    let keys: BTreeSet<&(String, String)> = want.keys().chain(have.keys()).collect();
    for key in keys {
        let list = match key.0.as_str() {
            KIND_FORWARD => &mut forwards,
            KIND_MASQUERADE => &mut masquerade,
            _ => continue,
        };
        match (want.get(key), have.get(key)) {
            (Some(_), None) => list.added.push(key.1.clone()),
            (None, Some(_)) => list.removed.push(key.1.clone()),
            (Some(a), Some(b)) if a != b => list.updated.push(key.1.clone()),
            _ => {}
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
        let lines: Vec<&str> = edit.script.lines().collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains(" pre-web ") || l.contains(" post-web ")),
            "{lines:#?}"
        );
        assert!(lines
            .iter()
            .any(|l| l.starts_with("delete rule inet portfwd-gw pre-web handle ")));
        assert_eq!(edit.forwards.updated, ["web"]);
    }

    #[test]
    fn a_removed_forward_takes_its_elements_and_chains_with_it() {
        let without: serde_json::Value = {
            let mut v: serde_json::Value = serde_json::from_str(PARAMS).unwrap();
            let list = v["forwards"].as_array_mut().unwrap();
            list.retain(|f| f["name"] != "r");
            v
        };
        let edit = plan_table(
            "gw",
            "portfwd-gw",
            &table(&without.to_string()),
            &parse(LISTING).unwrap(),
        );
        assert_eq!(
            edit.script,
            "delete element inet portfwd-gw pre-port4 { tcp . 2222 }\nflush chain inet portfwd-gw pre-r\ndelete chain inet portfwd-gw pre-r\n"
        );
        assert_eq!(edit.forwards.removed, ["r"]);
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
        assert_eq!(edit.forwards.removed.len(), 4);
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
}
