//! The fake host's iproute2: addresses, rules and routes changed by `ip -batch` scripts the
//! way `ip` does it (line by line, stopping at the first failure, earlier lines kept) and
//! shown as `ip -N -j` prints them.

use serde_json::{json, Value};

/// One object, as the words of its `ip` line after the verb (`10.0.0.1/24 dev eth0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IpState {
    /// The interfaces (`lo`, `eth0` and `eth1` unless a test says otherwise).
    pub links: Vec<String>,
    /// (family flag `4`/`6`, words)
    pub addresses: Vec<Entry>,
    pub rules: Vec<Entry>,
    pub routes: Vec<Entry>,
}

impl Default for IpState {
    fn default() -> Self {
        IpState {
            links: ["lo", "eth0", "eth1"].map(String::from).to_vec(),
            addresses: Vec::new(),
            rules: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// An object: (family flag `4`/`6`, the words of its line after the verb).
type Entry = (String, Vec<String>);

/// What the kernel tells objects apart by: an address by address and device, a route by
/// destination and table, a rule by its whole selector.
fn identity(object: &str, words: &[String]) -> Vec<String> {
    let pick = |keys: &[&str]| -> Vec<String> {
        let mut out = vec![words[0].clone()];
        out.extend(
            keys.iter()
                .map(|k| after(words, k).unwrap_or_default().to_string()),
        );
        out
    };
    match object {
        "address" => pick(&["dev"]),
        "route" => pick(&["table"]),
        _ => words.to_vec(),
    }
}

/// The value after `key` in a word list.
fn after<'a>(words: &'a [String], key: &str) -> Option<&'a str> {
    let i = words.iter().position(|w| w == key)?;
    words.get(i + 1).map(String::as_str)
}

impl IpState {
    /// Runs a batch; the error names the failing line.
    pub(crate) fn batch(&mut self, family: &str, script: &str) -> Result<(), String> {
        for line in script.lines().filter(|l| !l.trim().is_empty()) {
            self.line(family, line)
                .map_err(|e| format!("{line:?}: {e}"))?;
        }
        Ok(())
    }

    fn line(&mut self, family: &str, line: &str) -> Result<(), String> {
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        let (object, verb, spec) = match words.as_slice() {
            [o, v, spec @ ..] => (o.as_str(), v.as_str(), spec.to_vec()),
            _ => return Err("too short".into()),
        };
        if !matches!(object, "address" | "route" | "rule") {
            return Err("unknown object".into());
        }
        // Addresses and routes need their device; a rule's iif may name one not there yet.
        if let Some(dev) = after(&spec, "dev").filter(|_| object != "rule" && verb != "del") {
            if !self.links.iter().any(|l| l == dev) {
                return Err(format!("Cannot find device {dev:?}"));
            }
        }
        let list = match object {
            "address" => &mut self.addresses,
            "route" => &mut self.routes,
            _ => &mut self.rules,
        };
        let key = identity(object, &spec);
        let at = list
            .iter()
            .position(|(f, w)| f == family && identity(object, w) == key);
        match (verb, at) {
            ("add", Some(_)) => Err("File exists".into()),
            ("add", None) => {
                insert(object, list, (family.to_string(), spec));
                Ok(())
            }
            ("replace", Some(i)) => {
                list[i].1 = spec;
                Ok(())
            }
            ("replace", None) => {
                insert(object, list, (family.to_string(), spec));
                Ok(())
            }
            ("del", Some(i)) => {
                let was_primary = !list[..i].iter().any(|p| secondary_of(&list[i], p));
                let gone = list.remove(i);
                if object == "address" && was_primary {
                    // The kernel deletes a primary's secondaries with it.
                    list.retain(|other| !secondary_of(other, &gone));
                }
                Ok(())
            }
            ("del", None) => Err("No such file or directory".into()),
            _ => Err("unknown verb".into()),
        }
    }

    /// `ip -N -j ARGS` output.
    pub(crate) fn json(&self, args: &[&str]) -> String {
        let family = match args.first() {
            Some(&"-6") => "6",
            _ => "4",
        };
        let of_family = |list: &[Entry], render: fn(&[String]) -> Value| {
            let items = list.iter().filter(|(f, _)| f == family);
            Value::Array(items.map(|(_, w)| render(w)).collect())
        };
        let value = match args {
            [_, "rule", "show", ..] => of_family(&self.rules, rule_json),
            [_, "route", "show", ..] => of_family(&self.routes, route_json),
            ["addr", "show", ..] => addresses_json(&self.links, &self.addresses),
            _ => Value::Array(Vec::new()),
        };
        value.to_string()
    }
}

/// Could `addr` be a secondary of `primary` (same device, IPv4, same subnet)? Which one is
/// the primary is the one added first.
fn secondary_of(addr: &Entry, primary: &Entry) -> bool {
    addr.0 == "4"
        && primary.0 == "4"
        && after(&addr.1, "dev") == after(&primary.1, "dev")
        && same_subnet(&addr.1[0], &primary.1[0])
}

/// `10.0.0.5/24` and `10.0.0.9/24` → true.
fn same_subnet(a: &str, b: &str) -> bool {
    let net = |cidr: &str| -> Option<(u32, u8)> {
        let (addr, len) = cidr.split_once('/')?;
        let addr: std::net::Ipv4Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        Some((u32::from(addr) & mask, len))
    };
    net(a).is_some() && net(a) == net(b)
}

/// Where the kernel lists a new object: rules by priority (after others of the same
/// priority), routes by table and destination, addresses in the order they were added.
fn insert(object: &str, list: &mut Vec<Entry>, entry: Entry) {
    let priority = |w: &[String]| after(w, "priority").and_then(|p| p.parse::<u32>().ok());
    let at = match object {
        "rule" => list
            .iter()
            .position(|(_, w)| priority(w) > priority(&entry.1))
            .unwrap_or(list.len()),
        "route" => {
            let key = |w: &[String]| (after(w, "table").map(str::to_string), w[0].clone());
            list.iter()
                .position(|(_, w)| key(w) > key(&entry.1))
                .unwrap_or(list.len())
        }
        _ => list.len(),
    };
    list.insert(at, entry);
}

/// `10.0.0.0/16` → ("10.0.0.0", Some(16)); `all`-like zero prefixes → "all".
fn prefix_json(obj: &mut serde_json::Map<String, Value>, key: &str, len_key: &str, cidr: &str) {
    match cidr.split_once('/') {
        Some((_, "0")) => {
            obj.insert(key.into(), json!("all"));
        }
        Some((addr, len)) if len != "32" && len != "128" => {
            obj.insert(key.into(), json!(addr));
            obj.insert(len_key.into(), json!(len.parse::<u64>().unwrap_or(0)));
        }
        Some((addr, _)) => {
            obj.insert(key.into(), json!(addr));
        }
        None => {
            obj.insert(key.into(), json!(cidr));
        }
    }
}

fn rule_json(w: &[String]) -> Value {
    let mut o = serde_json::Map::new();
    if let Some(p) = after(w, "priority") {
        o.insert("priority".into(), json!(p.parse::<u64>().unwrap_or(0)));
    }
    if let Some(from) = after(w, "from") {
        prefix_json(&mut o, "src", "srclen", from);
    }
    if let Some(to) = after(w, "to") {
        prefix_json(&mut o, "dst", "dstlen", to);
    }
    if let Some(mark) = after(w, "fwmark") {
        let (m, mask) = mark.split_once('/').unwrap_or((mark, "0xffffffff"));
        o.insert("fwmark".into(), json!(m));
        if mask != "0xffffffff" {
            o.insert("fwmask".into(), json!(mask));
        }
    }
    for (key, name) in [("iif", "iif"), ("table", "table"), ("protocol", "protocol")] {
        if let Some(v) = after(w, key) {
            o.insert(name.into(), json!(v));
        }
    }
    Value::Object(o)
}

fn route_json(w: &[String]) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("dst".into(), json!(w[0]));
    for (key, name) in [("via", "gateway"), ("dev", "dev"), ("proto", "protocol")] {
        if let Some(v) = after(w, key) {
            o.insert(name.into(), json!(v));
        }
    }
    if let Some(t) = after(w, "table").filter(|t| *t != "254") {
        o.insert("table".into(), json!(t));
    }
    Value::Object(o)
}

fn addresses_json(devices: &[String], addresses: &[Entry]) -> Value {
    let mut links: Vec<(String, Vec<Value>)> =
        devices.iter().map(|d| (d.clone(), Vec::new())).collect();
    for (i, entry) in addresses.iter().enumerate() {
        let w = &entry.1;
        let secondary = addresses[..i].iter().any(|p| secondary_of(entry, p));
        let dev = after(w, "dev").unwrap_or_default().to_string();
        let (addr, len) = w[0].split_once('/').unwrap_or((&w[0], "32"));
        let mut info = json!({"local": addr, "prefixlen": len.parse::<u64>().unwrap_or(32)});
        info["label"] = json!(after(w, "label").unwrap_or(&dev));
        if secondary {
            info["secondary"] = json!(true);
        }
        match links.iter_mut().find(|(d, _)| *d == dev) {
            Some((_, infos)) => infos.push(info),
            None => links.push((dev, vec![info])),
        }
    }
    Value::Array(
        links
            .into_iter()
            .map(|(dev, infos)| json!({"ifname": dev, "addr_info": infos}))
            .collect(),
    )
}
