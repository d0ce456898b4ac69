//! Parsers for `ip -N -j` output (rules, routes, addresses). `-N` makes protocols and tables
//! numeric, so a name someone put in `/etc/iproute2/rt_protos` cannot hide our protocol.
//!
//! Unknown fields are ignored and entries that cannot be read are skipped: they are not ours.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::Value;

use crate::net::{Cidr, Family};
use crate::routing::{IfAddr, IpRoute, IpRule};

fn entries(text: &str) -> Vec<Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn number(v: &Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// An interface name from the kernel that is safe to write back into an `ip -batch` line (no
/// space, `#` comment, quote or backslash). Entries naming anything else are not ours.
fn safe_name(v: &Value, key: &str) -> Option<Option<String>> {
    match field(v, key) {
        None => Some(None),
        Some(n)
            if !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, '#' | '"' | '\'' | '\\')) =>
        {
            Some(Some(n.to_string()))
        }
        Some(_) => None,
    }
}

fn has_protocol(v: &Value, protocol: u8) -> bool {
    number(v, "protocol") == Some(u64::from(protocol))
}

/// `all`, `ADDR` (with a separate length key) or `ADDR/LEN` → CIDR.
fn prefix(v: &Value, addr_key: &str, len_key: &str, family: Family) -> Option<Option<Cidr>> {
    let Some(text) = field(v, addr_key) else {
        return Some(None);
    };
    if text == "all" || text == "default" {
        let addr: IpAddr = match family {
            Family::V4 => IpAddr::from([0u8; 4]),
            Family::V6 => IpAddr::from([0u16; 8]),
        };
        return Some(Some(Cidr { addr, prefix: 0 }));
    }
    let (addr_text, len) = match text.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok()?),
        None => {
            let addr: IpAddr = text.parse().ok()?;
            let default = Family::of(&addr).host_prefix();
            (
                text,
                number(v, len_key).map_or(Some(default), |n| u8::try_from(n).ok())?,
            )
        }
    };
    let addr: IpAddr = addr_text.parse().ok()?;
    if len > Family::of(&addr).host_prefix() {
        return None;
    }
    Some(Some(Cidr { addr, prefix: len }.network()))
}

fn hex(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim_start_matches("0x"), 16).ok()
}

/// Rules of one family carrying `protocol`, in the kernel's order.
pub(crate) fn parse_rules(text: &str, family: Family, protocol: u8) -> Vec<IpRule> {
    rules_where(text, family, |v| has_protocol(v, protocol))
}

/// Record keys of every rule of one family, whatever its protocol.
pub(crate) fn all_rule_keys(text: &str, family: Family) -> Vec<String> {
    rules_where(text, family, |_| true)
        .iter()
        .map(IpRule::record_key)
        .collect()
}

fn rules_where(text: &str, family: Family, keep: impl Fn(&Value) -> bool) -> Vec<IpRule> {
    entries(text)
        .iter()
        .filter(|v| keep(v))
        .filter_map(|v| {
            let from = prefix(v, "src", "srclen", family)??;
            let to = prefix(v, "dst", "dstlen", family)?;
            let fwmark = match field(v, "fwmark") {
                Some(m) => Some((hex(m)?, field(v, "fwmask").map_or(Some(u32::MAX), hex)?)),
                None => None,
            };
            Some(IpRule {
                family,
                priority: u32::try_from(number(v, "priority")?).ok()?,
                from,
                to,
                fwmark,
                iif: safe_name(v, "iif")?,
                table: u32::try_from(number(v, "table")?).ok()?,
            })
        })
        .collect()
}

/// Routes of one family (from `route show table all`) carrying `protocol`.
pub(crate) fn parse_routes(text: &str, family: Family, protocol: u8) -> Vec<IpRoute> {
    routes_where(text, family, |v| has_protocol(v, protocol))
}

/// Record keys (family, table, destination) of every route of one family, any protocol.
pub(crate) fn all_route_keys(text: &str, family: Family) -> Vec<String> {
    routes_where(text, family, |_| true)
        .iter()
        .map(IpRoute::record_key)
        .collect()
}

/// Devices with a default route learned from router advertisements (`proto ra`, 9).
pub(crate) fn ra_default_devices(text: &str) -> Vec<String> {
    let mut devs: Vec<String> = entries(text)
        .iter()
        .filter(|v| field(v, "dst") == Some("default") && has_protocol(v, 9))
        .filter_map(|v| safe_name(v, "dev").flatten())
        .collect();
    devs.sort();
    devs.dedup();
    devs
}

fn routes_where(text: &str, family: Family, keep: impl Fn(&Value) -> bool) -> Vec<IpRoute> {
    entries(text)
        .iter()
        .filter(|v| keep(v))
        .filter_map(|v| {
            let to = match field(v, "dst")? {
                "default" => None,
                _ => prefix(v, "dst", "dstlen", family)?,
            };
            Some(IpRoute {
                family,
                // The main table is omitted from the JSON.
                table: number(v, "table").map_or(Some(254), |t| u32::try_from(t).ok())?,
                to,
                via: field(v, "gateway").and_then(|g| g.parse().ok()),
                dev: safe_name(v, "dev")?,
            })
        })
        .collect()
}

/// Every address of every interface (`ip -j addr show`).
/// The interface names `ip -j addr show` lists (every interface, with addresses or not).
pub(crate) fn parse_links(text: &str) -> BTreeSet<String> {
    entries(text)
        .iter()
        .filter_map(|link| field(link, "ifname"))
        .map(str::to_string)
        .collect()
}

pub(crate) fn parse_addresses(text: &str) -> Vec<IfAddr> {
    let mut out = Vec::new();
    for link in entries(text) {
        let Some(dev) = field(&link, "ifname") else {
            continue;
        };
        let Some(infos) = link.get("addr_info").and_then(Value::as_array) else {
            continue;
        };
        for info in infos {
            let (Some(addr), Some(prefix)) = (
                field(info, "local").and_then(|a| a.parse::<IpAddr>().ok()),
                number(info, "prefixlen").and_then(|p| u8::try_from(p).ok()),
            ) else {
                continue;
            };
            out.push(IfAddr {
                addr,
                prefix,
                dev: dev.to_string(),
                label: field(info, "label")
                    .filter(|l| *l != dev)
                    .map(str::to_string),
                secondary: info
                    .get("secondary")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from iproute2 6.1 (`ip -N -j ...`) in a namespace on kernel 6.18.
    const RULES_V4: &str = r#"[{"priority":0,"src":"all","table":"255"},{"priority":1000,"src":"10.9.9.9","dst":"1.2.3.0","dstlen":24,"fwmark":"0x10","fwmask":"0xff","iif":"pa","table":"100","protocol":"201"},{"priority":1001,"src":"10.9.0.0","srclen":16,"table":"101","protocol":"202"},{"priority":32766,"src":"all","table":"254"},{"priority":32767,"src":"all","table":"253"}]"#;
    const ROUTES_V4: &str = r#"[{"dst":"default","gateway":"10.9.9.1","dev":"pa","table":"100","protocol":"201","flags":[]},{"dst":"5.5.5.0/24","dev":"pa","table":"100","protocol":"201","scope":"253","flags":[]},{"dst":"10.9.9.0/24","dev":"pa","protocol":"2","scope":"253","prefsrc":"10.9.9.9","flags":[]},{"type":"2","dst":"10.9.9.9","dev":"pa","table":"255","protocol":"2","scope":"254","prefsrc":"10.9.9.9","flags":[]}]"#;
    const ROUTES_V6: &str = r#"[{"dst":"default","gateway":"fd00::1","dev":"pa","table":"100","protocol":"201","metric":1024,"flags":[],"pref":"medium"},{"dst":"fd00::/64","dev":"pa","protocol":"2","metric":256,"flags":[],"pref":"medium"}]"#;
    const ADDRS: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK"],"addr_info":[]},{"ifindex":3,"link":"pb","ifname":"pa","flags":["UP"],"addr_info":[{"family":"inet","local":"10.9.9.9","prefixlen":24,"scope":"global","label":"pa:1","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet","local":"10.9.9.10","prefixlen":24,"scope":"global","secondary":true,"label":"pa","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fd00::9","prefixlen":64,"scope":"global","nodad":true},{"family":"inet6","local":"fe80::bc51:f0ff:fe6b:3838","prefixlen":64,"scope":"link"}]}]"#;

    #[test]
    fn rules_with_our_protocol_only() {
        insta::assert_debug_snapshot!(parse_rules(RULES_V4, Family::V4, 201));
        assert_eq!(
            parse_rules(RULES_V4, Family::V4, 202)[0].from.to_string(),
            "10.9.0.0/16"
        );
        assert!(parse_rules(RULES_V4, Family::V4, 99).is_empty());
    }

    #[test]
    fn routes_with_our_protocol_only() {
        let v4 = parse_routes(ROUTES_V4, Family::V4, 201);
        let text: Vec<String> = v4.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "default via 10.9.9.1 dev pa table 100",
                "5.5.5.0/24 dev pa table 100"
            ]
        );
        let v6 = parse_routes(ROUTES_V6, Family::V6, 201);
        assert_eq!(v6[0].to_string(), "default via fd00::1 dev pa table 100");
    }

    #[test]
    fn addresses_with_labels() {
        let text: Vec<String> = parse_addresses(ADDRS)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            vec![
                "10.9.9.9/24 dev pa label pa:1",
                "10.9.9.10/24 dev pa",
                "fd00::9/64 dev pa",
                "fe80::bc51:f0ff:fe6b:3838/64 dev pa",
            ]
        );
    }

    #[test]
    fn names_that_could_break_a_batch_line_and_impossible_prefixes_are_not_ours() {
        let text = r#"[{"dst":"5.5.5.0/24","dev":"br#lan","table":"100","protocol":"201"},{"dst":"6.6.6.0/24","dev":"a b","table":"100","protocol":"201"},{"dst":"7.7.7.0/40","dev":"pa","table":"100","protocol":"201"}]"#;
        assert!(parse_routes(text, Family::V4, 201).is_empty());
        let rule = r#"[{"priority":5,"src":"10.0.0.0","srclen":99,"table":"100","protocol":"201"},{"priority":6,"src":"all","iif":"x#y","table":"100","protocol":"201"}]"#;
        assert!(parse_rules(rule, Family::V4, 201).is_empty());
    }

    #[test]
    fn garbage_is_not_ours() {
        assert!(parse_rules("not json", Family::V4, 201).is_empty());
        assert!(parse_routes(r#"[{"protocol":"201"}]"#, Family::V4, 201).is_empty());
        assert!(parse_addresses(r#"{"ifname":"x"}"#).is_empty());
    }
}
