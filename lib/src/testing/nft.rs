//! The fake host's nftables: `inet` tables with base and regular chains, rules with handles and
//! comments, verdict maps with commented elements, and the `dormant` flag. An `nft -f` script
//! is applied line by line to a copy and committed only when every line went through (nft's
//! transaction), and `nft -j list table` prints the table as nft 1.0.6 does for the statements
//! portfwd writes (and the few a hand edit adds: `log`, `accept`). A statement it does not
//! know refuses the script, as nft's parser would.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// A base chain's declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseDecl {
    pub kind: String,
    pub hook: String,
    pub prio: i64,
    pub policy: String,
}

/// A rule: its handle, its statements as written (without the comment), its comment.
#[derive(Debug, Clone, Eq)]
pub(crate) struct FakeRule {
    pub handle: u64,
    pub body: String,
    pub comment: Option<String>,
}

/// Handles are the kernel's numbering, not content.
impl PartialEq for FakeRule {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body && self.comment == other.comment
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FakeChain {
    pub base: Option<BaseDecl>,
    pub rules: Vec<FakeRule>,
}

/// A map or set element: its key as written (`1.2.3.4 . tcp . 81-90`), comment and data
/// (`jump pre-web`, `10.0.0.2 . 80`; None in a set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FakeElement {
    pub key: String,
    pub comment: Option<String>,
    pub data: Option<String>,
}

impl FakeElement {
    /// The chain a verdict element jumps to.
    pub(crate) fn chain(&self) -> Option<&str> {
        self.data.as_deref()?.strip_prefix("jump ")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FakeMap {
    pub types: Vec<String>,
    /// The data type (`verdict`, `ipv4_addr . inet_service`); None: a set.
    pub data: Option<String>,
    /// `flags interval`: only such a map takes ranges as keys.
    pub interval: bool,
    pub elements: Vec<FakeElement>,
}

#[derive(Debug, Clone, Default, Eq)]
pub(crate) struct FakeTable {
    pub dormant: bool,
    pub chains: BTreeMap<String, FakeChain>,
    pub maps: BTreeMap<String, FakeMap>,
    pub next_handle: u64,
}

impl PartialEq for FakeTable {
    fn eq(&self, other: &Self) -> bool {
        self.dormant == other.dormant && self.chains == other.chains && self.maps == other.maps
    }
}

/// Every `inet` table by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NftState {
    pub tables: BTreeMap<String, FakeTable>,
}

impl NftState {
    /// Applies a script as one transaction.
    pub(crate) fn apply(&mut self, script: &str) -> Result<(), String> {
        let mut next = self.clone();
        for line in script.lines().filter(|l| !l.trim().is_empty()) {
            next.command(line.trim())
                .map_err(|e| format!("Error: {e}\n{line}"))?;
        }
        *self = next;
        Ok(())
    }

    fn table(&mut self, name: &str) -> Result<&mut FakeTable, String> {
        self.tables
            .get_mut(name)
            .ok_or_else(|| format!("No such file or directory: table inet {name}"))
    }

    fn command(&mut self, line: &str) -> Result<(), String> {
        let words = tokens(line);
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["add", "table", "inet", t, rest @ ..] => {
                let dormant = rest.iter().any(|x| x.contains("dormant"));
                self.tables.entry(t.to_string()).or_default().dormant = dormant;
                Ok(())
            }
            ["delete", "table", "inet", t] => self
                .tables
                .remove(*t)
                .map(drop)
                .ok_or_else(|| format!("No such file or directory: table {t}")),
            ["add", "chain", "inet", t, c, rest @ ..] => {
                let decl = rest.first().map(|d| base_decl(d)).transpose()?;
                let table = self.table(t)?;
                match table.chains.get_mut(*c) {
                    Some(chain) => match (&mut chain.base, decl) {
                        (Some(have), Some(want)) => {
                            if (&have.kind, &have.hook, have.prio)
                                != (&want.kind, &want.hook, want.prio)
                            {
                                return Err("Operation not supported".into());
                            }
                            have.policy = want.policy;
                            Ok(())
                        }
                        (None, None) => Ok(()),
                        _ => Err("Operation not supported".into()),
                    },
                    None => {
                        table.chains.insert(
                            c.to_string(),
                            FakeChain {
                                base: decl,
                                rules: Vec::new(),
                            },
                        );
                        Ok(())
                    }
                }
            }
            ["flush", "chain", "inet", t, c] => {
                let chain = self
                    .table(t)?
                    .chains
                    .get_mut(*c)
                    .ok_or("No such file or directory")?;
                chain.rules.clear();
                Ok(())
            }
            ["delete", "chain", "inet", t, c] => {
                let table = self.table(t)?;
                let chain = table.chains.get(*c).ok_or("No such file or directory")?;
                let jumped = table
                    .maps
                    .values()
                    .any(|m| m.elements.iter().any(|e| e.chain() == Some(*c)));
                if !chain.rules.is_empty() || jumped {
                    return Err("Device or resource busy".into());
                }
                table.chains.remove(*c);
                Ok(())
            }
            [add @ "add", object @ ("map" | "set"), "inet", t, m, decl] => {
                let _ = add;
                let (types, data) = map_types(decl)?;
                if (*object == "set") != data.is_none() {
                    return Err(format!("syntax error in {object} declaration"));
                }
                let interval = decl.contains("flags interval;");
                let table = self.table(t)?;
                match table.maps.get(*m) {
                    Some(have)
                        if have.types != types
                            || have.interval != interval
                            || have.data != data =>
                    {
                        Err("File exists".into())
                    }
                    Some(_) => Ok(()),
                    None => {
                        table.maps.insert(
                            m.to_string(),
                            FakeMap {
                                types,
                                data,
                                interval,
                                elements: Vec::new(),
                            },
                        );
                        Ok(())
                    }
                }
            }
            ["flush", object @ ("map" | "set"), "inet", t, m] => {
                let map = self
                    .table(t)?
                    .maps
                    .get_mut(*m)
                    .filter(|have| (*object == "set") == have.data.is_none())
                    .ok_or("No such file or directory")?;
                map.elements.clear();
                Ok(())
            }
            ["delete", object @ ("map" | "set"), "inet", t, m] => {
                let table = self.table(t)?;
                if table
                    .maps
                    .get(*m)
                    .is_some_and(|have| (*object == "set") != have.data.is_none())
                {
                    return Err("No such file or directory".into());
                }
                let used = table
                    .chains
                    .values()
                    .any(|c| c.rules.iter().any(|r| r.body.contains(&format!("@{m}"))));
                if used {
                    return Err("Device or resource busy".into());
                }
                table
                    .maps
                    .remove(*m)
                    .map(drop)
                    .ok_or_else(|| "No such file or directory".into())
            }
            ["add", "rule", "inet", t, c, ..] => self.add_rule(t, c, &words[5..], None),
            ["insert", "rule", "inet", t, c, "position", h, ..] => {
                let handle = h.parse::<u64>().map_err(|_| "syntax error")?;
                self.add_rule(t, c, &words[7..], Some(Some(handle)))
            }
            ["insert", "rule", "inet", t, c, ..] => self.add_rule(t, c, &words[5..], Some(None)),
            ["replace", "rule", "inet", t, c, "handle", h, ..] => {
                let handle = h.parse::<u64>().map_err(|_| "syntax error")?;
                let (body, comment) = split_comment(&words[7..]);
                statements(&body)?;
                let chain = self
                    .table(t)?
                    .chains
                    .get_mut(*c)
                    .ok_or("No such file or directory")?;
                let rule = chain
                    .rules
                    .iter_mut()
                    .find(|r| r.handle == handle)
                    .ok_or("No such file or directory")?;
                rule.body = body;
                rule.comment = comment;
                Ok(())
            }
            ["delete", "rule", "inet", t, c, "handle", h] => {
                let handle = h.parse::<u64>().map_err(|_| "syntax error")?;
                let chain = self
                    .table(t)?
                    .chains
                    .get_mut(*c)
                    .ok_or("No such file or directory")?;
                let before = chain.rules.len();
                chain.rules.retain(|r| r.handle != handle);
                if chain.rules.len() == before {
                    return Err("No such file or directory".into());
                }
                Ok(())
            }
            ["add", "element", "inet", t, m, set] => {
                let table = self.table(t)?;
                let new = elements(set)?;
                for chain in new.iter().filter_map(FakeElement::chain) {
                    if !table.chains.contains_key(chain) {
                        return Err(format!(
                            "Could not process rule: No such file or directory: {chain}"
                        ));
                    }
                }
                let map = table.maps.get_mut(*m).ok_or("No such file or directory")?;
                let verdict = map.data.as_deref() == Some("verdict");
                for e in &new {
                    let fits = match &e.data {
                        None => map.data.is_none(),
                        Some(_) if verdict => e.chain().is_some(),
                        Some(d) => {
                            map.data.as_deref().map(|t| t.split(" . ").count())
                                == Some(d.split(" . ").count())
                        }
                    };
                    let parts = e.key.split(" . ").count();
                    if !fits || parts != map.types.len() {
                        return Err("Could not process rule: datatype mismatch".into());
                    }
                }
                // A range (`8000-8010`; addresses have no `-`) needs an interval map.
                if !map.interval && new.iter().any(|e| e.key.contains('-')) {
                    return Err("Could not process rule: Operation not supported".into());
                }
                for e in new {
                    if map.elements.iter().any(|have| have.key == e.key) {
                        return Err("File exists".into());
                    }
                    map.elements.push(e);
                }
                // nft keeps (and lists) a set's elements in key order.
                map.elements.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(())
            }
            ["delete", "element", "inet", t, m, set] => {
                let map = self
                    .table(t)?
                    .maps
                    .get_mut(*m)
                    .ok_or("No such file or directory")?;
                let inner = set.trim_start_matches('{').trim_end_matches('}');
                for key in inner.split(',').map(str::trim) {
                    let before = map.elements.len();
                    map.elements.retain(|e| e.key != key);
                    if map.elements.len() == before {
                        return Err("No such file or directory".into());
                    }
                }
                Ok(())
            }
            _ => Err("syntax error".into()),
        }
    }

    /// `add rule` (position None), `insert rule` (Some(None): first; Some(Some(h)): before h).
    fn add_rule(
        &mut self,
        t: &str,
        c: &str,
        words: &[String],
        insert: Option<Option<u64>>,
    ) -> Result<(), String> {
        let (body, comment) = split_comment(words);
        statements(&body)?;
        let table = self.table(t)?;
        for map in body.split_whitespace().filter_map(|w| w.strip_prefix('@')) {
            if !table.maps.contains_key(map) {
                return Err(format!(
                    "Could not process rule: No such file or directory: @{map}"
                ));
            }
        }
        table.next_handle += 1;
        let handle = table.next_handle;
        let chain = table.chains.get_mut(c).ok_or("No such file or directory")?;
        let rule = FakeRule {
            handle,
            body,
            comment,
        };
        match insert {
            None => chain.rules.push(rule),
            Some(None) => chain.rules.insert(0, rule),
            Some(Some(before)) => {
                let at = chain
                    .rules
                    .iter()
                    .position(|r| r.handle == before)
                    .ok_or("No such file or directory")?;
                chain.rules.insert(at, rule);
            }
        }
        Ok(())
    }

    /// `nft -j list table inet NAME`; empty when there is no such table.
    pub(crate) fn list_table(&self, name: &str) -> String {
        let Some(table) = self.tables.get(name) else {
            return String::new();
        };
        let mut items = vec![
            json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}),
        ];
        let mut t = json!({"family": "inet", "name": name, "handle": 1});
        if table.dormant {
            // nft 1.0.6 prints the flags' value garbled; that the key is there is what counts.
            t["flags"] = json!("Lester Gooch #5");
        }
        items.push(json!({ "table": t }));
        for (m, map) in table.maps.iter() {
            let elem: Vec<Value> = map
                .elements
                .iter()
                .map(|e| {
                    let mut inner = json!({"val": key_json(&e.key)});
                    if let Some(c) = &e.comment {
                        inner["comment"] = json!(c);
                    }
                    match (&e.data, e.chain()) {
                        (_, Some(chain)) => json!([{"elem": inner}, {"jump": {"target": chain}}]),
                        (Some(data), None) => json!([{"elem": inner}, key_json(data)]),
                        (None, None) => json!({"elem": inner}),
                    }
                })
                .collect();
            let types = match map.types.as_slice() {
                [one] => json!(one),
                many => json!(many),
            };
            let mut o = json!({"family": "inet", "name": m, "table": name, "type": types,
                               "handle": 0});
            if let Some(data) = &map.data {
                o["map"] = json!(data);
            }
            if map.interval {
                o["flags"] = json!(["interval"]);
            }
            if !elem.is_empty() {
                o["elem"] = json!(elem);
            }
            let object = if map.data.is_some() { "map" } else { "set" };
            items.push(json!({ object: o }));
        }
        for (c, chain) in table.chains.iter() {
            items.push(chain_json(name, c, chain));
        }
        for (c, chain) in table.chains.iter() {
            for r in &chain.rules {
                let mut o = json!({"family": "inet", "table": name, "chain": c, "handle": r.handle,
                                   "expr": statements(&r.body).unwrap_or_default()});
                if let Some(comment) = &r.comment {
                    o["comment"] = json!(comment);
                }
                items.push(json!({ "rule": o }));
            }
        }
        json!({ "nftables": items }).to_string()
    }

    /// `nft -j list chains`: every chain of every table.
    pub(crate) fn list_chains(&self) -> String {
        let mut items = vec![json!({"metainfo": {"version": "1.0.6"}})];
        for (name, table) in &self.tables {
            for (c, chain) in table.chains.iter() {
                items.push(chain_json(name, c, chain));
            }
        }
        json!({ "nftables": items }).to_string()
    }
}

/// A chain as `nft -j` lists it (a base chain with its declaration).
fn chain_json(table: &str, name: &str, chain: &FakeChain) -> Value {
    let mut o = json!({"family": "inet", "table": table, "name": name, "handle": 0});
    if let Some(b) = &chain.base {
        o["type"] = json!(b.kind);
        o["hook"] = json!(b.hook);
        o["prio"] = json!(b.prio);
        o["policy"] = json!(b.policy);
    }
    json!({ "chain": o })
}

/// A line's words: `{ ... }`, `( ... )` and `"..."` each one word.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            '{' | '(' if !quoted => {
                depth += 1;
                cur.push(ch);
            }
            '}' | ')' if !quoted => {
                depth = depth.saturating_sub(1);
                cur.push(ch);
            }
            c if c.is_whitespace() && !quoted && depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A rule's words without its trailing `comment "..."`, and the comment.
fn split_comment(words: &[String]) -> (String, Option<String>) {
    match words {
        [body @ .., key, text] if key == "comment" => {
            (body.join(" "), Some(text.trim_matches('"').to_string()))
        }
        _ => (words.join(" "), None),
    }
}

fn priority(word: &str) -> Result<i64, String> {
    match word {
        "dstnat" => Ok(-100),
        "srcnat" => Ok(100),
        "filter" => Ok(0),
        n => n
            .parse()
            .map_err(|_| format!("syntax error, unexpected {n}")),
    }
}

/// `{ type nat hook prerouting priority dstnat; policy accept; }`
fn base_decl(text: &str) -> Result<BaseDecl, String> {
    let inner = text
        .trim_start_matches('{')
        .trim_end_matches('}')
        .replace(';', " ");
    let w: Vec<&str> = inner.split_whitespace().collect();
    match w.as_slice() {
        ["type", kind, "hook", hook, "priority", prio, "policy", policy] => Ok(BaseDecl {
            kind: kind.to_string(),
            hook: hook.to_string(),
            prio: priority(prio)?,
            policy: policy.to_string(),
        }),
        ["type", kind, "hook", hook, "priority", prio] => Ok(BaseDecl {
            kind: kind.to_string(),
            hook: hook.to_string(),
            prio: priority(prio)?,
            policy: "accept".into(),
        }),
        _ => Err("syntax error in chain declaration".into()),
    }
}

/// `{ type ipv4_addr . inet_proto . inet_service : verdict; flags interval; }`: the key types
/// and the data type (None: a set, `{ type inet_proto . inet_service; }`).
fn map_types(text: &str) -> Result<(Vec<String>, Option<String>), String> {
    let inner = text.trim_start_matches('{').trim_end_matches('}');
    let decl = inner
        .split(';')
        .next()
        .and_then(|d| d.trim().strip_prefix("type "))
        .ok_or("syntax error in map declaration")?;
    let (key, data) = match decl.split_once(" : ") {
        Some((key, data)) => (key, Some(data.trim().to_string())),
        None => (decl, None),
    };
    let types = key.split(" . ").map(|t| t.trim().to_string()).collect();
    Ok((types, data))
}

/// `{ K comment "C" : jump X, K2 : 10.0.0.2 . 80, K3 comment "D" }`
fn elements(text: &str) -> Result<Vec<FakeElement>, String> {
    let inner = text.trim_start_matches('{').trim_end_matches('}');
    inner
        .split(", ")
        .map(|e| {
            let (left, data) = match e.rsplit_once(" : ") {
                Some((left, data)) => (left, Some(data.trim().to_string())),
                None => (e, None),
            };
            let (key, comment) = match left.split_once(" comment ") {
                Some((k, c)) => (k.trim(), Some(c.trim().trim_matches('"').to_string())),
                None => (left.trim(), None),
            };
            Ok(FakeElement {
                key: key.to_string(),
                comment,
                data,
            })
        })
        .collect()
}

/// An element key (`1.2.3.4 . tcp . 81-90`) as nft lists it.
fn key_json(key: &str) -> Value {
    let parts: Vec<Value> = key.split(" . ").map(|p| value_json(p.trim())).collect();
    match parts.as_slice() {
        [one] => one.clone(),
        _ => json!({ "concat": parts }),
    }
}

/// A value as nft lists it: a host bare, a network as a prefix, a port range as a range,
/// numbers as numbers, sets as sets.
fn value_json(text: &str) -> Value {
    if let Some(inner) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        let items: Vec<Value> = inner.split(',').map(|i| value_json(i.trim())).collect();
        return json!({ "set": items });
    }
    if let Some(s) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        return json!(s);
    }
    if let Ok(n) = text.parse::<u64>() {
        return json!(n);
    }
    if let Some((addr, len)) = text.split_once('/') {
        if let (Ok(ip), Ok(len)) = (addr.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
            let host = if ip.is_ipv4() { 32 } else { 128 };
            return if len == host {
                json!(addr)
            } else {
                json!({"prefix": {"addr": addr, "len": len}})
            };
        }
    }
    if let Some((a, b)) = text.split_once('-') {
        if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
            return json!({ "range": [a, b] });
        }
        if a.parse::<std::net::IpAddr>().is_ok() && b.parse::<std::net::IpAddr>().is_ok() {
            return json!({ "range": [a, b] });
        }
    }
    json!(text)
}

/// One expression at `w[*i]` (`ip saddr`, `meta l4proto`, `ct original proto-dst`, ...).
fn expr(w: &[String], i: &mut usize) -> Result<Value, String> {
    let word = |k: usize| w.get(k).map(String::as_str).unwrap_or_default();
    let at = *i;
    let (value, used) = match word(at) {
        p @ ("ip" | "ip6" | "th" | "tcp" | "udp") => (
            json!({"payload": {"protocol": p, "field": word(at + 1)}}),
            2,
        ),
        "meta" => (json!({"meta": {"key": word(at + 1)}}), 2),
        k @ ("iifname" | "oifname") => (json!({"meta": {"key": k}}), 1),
        "fib" if word(at + 1) == "daddr" && word(at + 2) == "type" => {
            (json!({"fib": {"result": "type", "flags": ["daddr"]}}), 3)
        }
        "ct" if matches!(word(at + 1), "original" | "reply") => {
            let dir = word(at + 1);
            match word(at + 2) {
                f @ ("ip" | "ip6") => (
                    json!({"ct": {"key": format!("{f} {}", word(at + 3)), "dir": dir}}),
                    4,
                ),
                k => (json!({"ct": {"key": k, "dir": dir}}), 3),
            }
        }
        "ct" => (json!({"ct": {"key": word(at + 1)}}), 2),
        other => return Err(format!("syntax error, unexpected {other}")),
    };
    *i += used;
    Ok(value)
}

/// A rule's statements as nft lists them (`expr`).
pub(crate) fn statements(body: &str) -> Result<Vec<Value>, String> {
    let w = tokens(body);
    let word = |k: usize| w.get(k).map(String::as_str).unwrap_or_default();
    let mut out = Vec::new();
    let mut i = 0;
    while i < w.len() {
        match word(i) {
            "counter" => {
                out.push(json!({"counter": {"packets": 0, "bytes": 0}}));
                i += 1;
            }
            "accept" | "drop" => {
                out.push(json!({ word(i): null }));
                i += 1;
            }
            "masquerade" => {
                out.push(json!({"masquerade": null}));
                i += 1;
            }
            "log" => {
                if word(i + 1) == "prefix" {
                    out.push(json!({"log": {"prefix": word(i + 2).trim_matches('"')}}));
                    i += 3;
                } else {
                    out.push(json!({"log": null}));
                    i += 1;
                }
            }
            "redirect" if word(i + 1) == "to" => {
                let port: u64 = word(i + 2)
                    .trim_start_matches(':')
                    .parse()
                    .map_err(|_| "syntax error in redirect")?;
                out.push(json!({"redirect": {"port": port}}));
                i += 3;
            }
            nat @ ("dnat" | "snat")
                if word(i + 2) == "to" || (word(i + 2) == "addr" && word(i + 5) == "to") =>
            {
                let family = word(i + 1);
                let concat = word(i + 2) == "addr";
                let mut k = if concat { i + 6 } else { i + 3 };
                let lookup = w[k..].iter().any(|x| x == "map");
                if !lookup && !concat {
                    let dest = word(k);
                    let (addr, port) = if let Some(rest) = dest.strip_prefix('[') {
                        let (a, p) = rest.split_once("]:").ok_or("syntax error in address")?;
                        (a.to_string(), p.parse::<u64>().ok())
                    } else if family == "ip" {
                        match dest.split_once(':') {
                            Some((a, p)) => (a.to_string(), p.parse::<u64>().ok()),
                            None => (dest.to_string(), None),
                        }
                    } else {
                        (dest.to_string(), None)
                    };
                    let mut o = json!({"family": family, "addr": addr});
                    if let Some(p) = port {
                        o["port"] = json!(p);
                    }
                    out.push(json!({ nat: o }));
                    i = k + 1;
                    continue;
                }
                // `to <key> map @m`: a lookup (nft 1.0.6 lists no `type_flags`).
                let mut parts = vec![expr(&w, &mut k)?];
                while word(k) == "." {
                    k += 1;
                    parts.push(expr(&w, &mut k)?);
                }
                if word(k) != "map" || !word(k + 1).starts_with('@') {
                    return Err(format!("syntax error in {nat}"));
                }
                let key = if parts.len() == 1 {
                    parts.remove(0)
                } else {
                    json!({ "concat": parts })
                };
                out.push(json!({ nat: {"family": family, "addr": {"map": {"key": key, "data": word(k + 1)}}} }));
                i = k + 2;
            }
            nat @ ("dnat" | "snat") if word(i + 2) == "to" => {
                let family = word(i + 1);
                let dest = word(i + 3);
                let (addr, port) = if let Some(rest) = dest.strip_prefix('[') {
                    let (a, p) = rest.split_once("]:").ok_or("syntax error in address")?;
                    (a.to_string(), p.parse::<u64>().ok())
                } else if family == "ip" {
                    match dest.split_once(':') {
                        Some((a, p)) => (a.to_string(), p.parse::<u64>().ok()),
                        None => (dest.to_string(), None),
                    }
                } else {
                    (dest.to_string(), None)
                };
                let mut o = json!({"family": family, "addr": addr});
                if let Some(p) = port {
                    o["port"] = json!(p);
                }
                out.push(json!({ nat: o }));
                i += 4;
            }
            _ => {
                let first = expr(&w, &mut i)?;
                let mut parts = vec![first];
                while word(i) == "." {
                    i += 1;
                    parts.push(expr(&w, &mut i)?);
                }
                let left = if parts.len() == 1 {
                    parts.remove(0)
                } else {
                    json!({ "concat": parts })
                };
                match word(i) {
                    "vmap" => {
                        out.push(json!({"vmap": {"key": left, "data": word(i + 1)}}));
                        i += 2;
                    }
                    "set" => {
                        i += 1;
                        let source = expr(&w, &mut i)?;
                        if word(i) != "|" {
                            return Err("syntax error in mangle".into());
                        }
                        let bits = u64::from_str_radix(word(i + 1).trim_start_matches("0x"), 16)
                            .map_err(|_| "syntax error in mark")?;
                        out.push(json!({"mangle": {"key": left, "value": {"|": [source, bits]}}}));
                        i += 2;
                    }
                    "&" if word(i + 2) == "==" && word(i + 3) == "0" => {
                        let flags = word(i + 1);
                        let right = match flags.strip_prefix('(').and_then(|f| f.strip_suffix(')'))
                        {
                            Some(list) => json!(list.split('|').map(str::trim).collect::<Vec<_>>()),
                            None => json!(flags),
                        };
                        out.push(json!({"match": {"op": "!", "left": left, "right": right}}));
                        i += 4;
                    }
                    "!=" => {
                        out.push(json!({"match": {"op": "!=", "left": left, "right": value_json(word(i + 1))}}));
                        i += 2;
                    }
                    "" => return Err("syntax error, unexpected end of rule".into()),
                    value => {
                        let flags = left
                            .get("ct")
                            .and_then(|c| c.get("key"))
                            .and_then(Value::as_str);
                        let op = if matches!(flags, Some("status" | "state")) {
                            "in"
                        } else {
                            "=="
                        };
                        out.push(
                            json!({"match": {"op": op, "left": left, "right": value_json(value)}}),
                        );
                        i += 1;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::nftables::compile::compile_table;
    use crate::firewall::nftables::observe::parse;
    use crate::firewall::nftables::plan::plan_table;
    use crate::model::Config;

    /// What the fake lists for a table portfwd wrote reads back as what was compiled, as the
    /// listing nft 1.0.6 printed does (the observe tests): the fake speaks nft's JSON.
    #[test]
    fn a_written_table_lists_as_nft_lists_it() {
        let (config, _, _) =
            Config::from_json(include_str!("../firewall/nftables/testdata/params.json"))
                .expect("valid params");
        let want = compile_table(&config);
        let mut nft = NftState::default();
        let edit = plan_table("gw", "portfwd-gw", &want, &Default::default());
        nft.apply(&edit.script).expect("the script applies");
        let observed = parse(&nft.list_table("portfwd-gw")).expect("parses");
        assert_eq!(observed.table, want);
        let again = plan_table("gw", "portfwd-gw", &want, &observed);
        assert_eq!(again.script, "", "converged");
    }

    /// The route_localnet guard (`ct state & (...) == 0`) and a masquerade's mark too.
    #[test]
    fn guards_and_marks_list_as_written() {
        let (config, _, _) = Config::from_json(
            r#"{"backend":"nftables","instance":"gw","forwards":[
                {"name":"ssh","listen_port":2222,"to":"127.0.0.1:22","in_interface":"eth0"},
                {"name":"six","listen_port":80,"to":"[fd00::2]:80","sources":["fd00:1::/64","fd00:9::7"]}],
               "masquerade":[{"name":"lan","source":"10.0.0.0/8","out_interface":"eth1"}]}"#,
        )
        .expect("valid params");
        let want = compile_table(&config);
        assert!(want.chains.contains_key("input"));
        let mut nft = NftState::default();
        nft.apply(&plan_table("gw", "portfwd-gw", &want, &Default::default()).script)
            .expect("applies");
        let observed = parse(&nft.list_table("portfwd-gw")).expect("parses");
        assert_eq!(observed.table, want);
    }

    /// A plan that flushes maps (most of many forwards removed) lands on the table the
    /// kept forwards compile to; a flush names the object as it is declared.
    #[test]
    fn a_flushed_map_keeps_what_is_added_back() {
        let plain = |n| compile_table(&crate::testing::plain_forwards(n));
        let mut nft = NftState::default();
        nft.apply(&plan_table("gw", "portfwd-gw", &plain(100), &Default::default()).script)
            .expect("applies");
        let have = parse(&nft.list_table("portfwd-gw")).expect("parses");
        let edit = plan_table("gw", "portfwd-gw", &plain(3), &have);
        assert!(edit.script.contains("flush map "), "{}", edit.script);
        nft.apply(&edit.script).expect("applies");
        let observed = parse(&nft.list_table("portfwd-gw")).expect("parses");
        assert_eq!(observed.table, plain(3));
        assert!(nft
            .apply("flush set inet portfwd-gw pre-port4-nat")
            .is_err());
    }

    #[test]
    fn a_failing_line_leaves_the_table_as_it_was() {
        let mut nft = NftState::default();
        nft.apply("add table inet t\nadd chain inet t c\n").unwrap();
        let before = nft.clone();
        let err = nft
            .apply("add rule inet t c counter accept\nadd rule inet t nochain counter accept\n")
            .unwrap_err();
        assert!(err.contains("No such file"), "{err}");
        assert_eq!(nft, before);
        assert!(nft.apply("add rule inet t c bogus statement").is_err());
    }
}
