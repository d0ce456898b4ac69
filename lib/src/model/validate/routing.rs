//! The checks of `addresses` and `policy_routes`: interface addresses (host bits allowed),
//! rule selectors, fwmarks, tables and routes, and conflicts between entries.

use std::net::IpAddr;

use serde_json::Value;

use super::{
    check_interface, parse_cidr, parse_ip, parse_mark_number, parse_u32, valid_token, Errors,
    FamilyCheck,
};
use crate::model::config::{Address, PolicyRoute, Route};
use crate::model::params::{AddressParams, PolicyRouteParams};
use crate::net::Family;

/// An interface address: `ADDR/LEN` with host bits allowed (that is the point of it).
fn parse_interface_address(path: &str, text: &str, errors: &mut Errors) -> Option<(IpAddr, u8)> {
    let Some((a, p)) = text.split_once('/') else {
        errors.push(
            path,
            text,
            "needs a prefix length, like 10.10.10.10/24".into(),
        );
        return None;
    };
    let addr = parse_ip(path, a, errors)?;
    match p.parse::<u8>() {
        Ok(prefix)
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && prefix <= Family::of(&addr).host_prefix() =>
        {
            Some((addr, prefix))
        }
        _ => {
            errors.push(path, text, "has an invalid prefix length".into());
            None
        }
    }
}

pub(super) fn validate_addresses(list: &[AddressParams], errors: &mut Errors) -> Vec<Address> {
    let mut out: Vec<Address> = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let path = format!("addresses[{i}]");
        let before = errors.0.len();
        let parsed = parse_interface_address(&format!("{path}.address"), &a.address, errors);
        check_interface(&format!("{path}.dev"), &Some(a.dev.clone()), errors);
        if a.dev.ends_with('+') {
            errors.push(
                format!("{path}.dev"),
                &a.dev,
                "must name one interface, not a wildcard".into(),
            );
        }
        if let Some(label) = &a.label {
            let ok = label.starts_with(a.dev.as_str())
                && valid_token(label, 15, |c| {
                    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':')
                });
            if !ok {
                errors.push(format!("{path}.label"), label, "must start with the device name and use [A-Za-z0-9_.:-], at most 15 characters (like eth0:1)".into());
            }
            if parsed.is_some_and(|(addr, _)| addr.is_ipv6()) {
                errors.push(
                    format!("{path}.label"),
                    label,
                    "applies to IPv4 addresses only".into(),
                );
            }
        }
        if errors.0.len() != before {
            continue;
        }
        let Some((addr, prefix)) = parsed else {
            continue;
        };
        if out.iter().any(|o| o.addr == addr && o.dev == a.dev) {
            errors.push(
                format!("{path}.address"),
                &a.address,
                "is listed twice on the same device".into(),
            );
            continue;
        }
        out.push(Address {
            addr,
            prefix,
            dev: a.dev.clone(),
            // The kernel labels an address with its device name by default: the same thing.
            label: a.label.clone().filter(|l| *l != a.dev),
        });
    }
    out
}

fn parse_fwmark(path: &str, value: &Value, errors: &mut Errors) -> Option<(u32, u32)> {
    let mark = match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|m| (m, u32::MAX)),
        Value::String(s) => match s.split_once('/') {
            Some((m, k)) => parse_mark_number(m).zip(parse_mark_number(k)),
            None => parse_mark_number(s).map(|m| (m, u32::MAX)),
        },
        _ => None,
    };
    if mark.is_none() {
        errors.push_json(
            path,
            value,
            "is not a firewall mark (16, \"0x10\" or \"0x10/0xff\")".into(),
        );
    }
    mark
}

pub(super) fn validate_policy_routes(
    list: &[PolicyRouteParams],
    errors: &mut Errors,
) -> Vec<PolicyRoute> {
    let mut out: Vec<PolicyRoute> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let path = format!("policy_routes[{i}]");
        let before = errors.0.len();
        let mut families = FamilyCheck {
            path: &path,
            seen: None,
        };
        let from = parse_cidr(&format!("{path}.from"), &p.from, errors);
        if let Some(c) = from {
            families.note("from", c.family(), errors, &p.from);
        }
        // An all-zero `to` selects everything: the kernel stores it as no selector at all.
        let to = p.to.as_ref().and_then(|t| {
            let c = parse_cidr(&format!("{path}.to"), t, errors)?;
            families.note("to", c.family(), errors, t);
            (c.prefix != 0).then_some(c)
        });
        let table = parse_u32(
            &format!("{path}.table"),
            &p.table,
            "a routing table (1-4294967295)",
            errors,
        )
        .and_then(|t| {
            if t == 0 || (253..=255).contains(&t) {
                errors.push_json(
                    format!("{path}.table"),
                    &p.table,
                    "is reserved (0 unspec, 253 default, 254 main, 255 local)".into(),
                );
                None
            } else {
                Some(t)
            }
        });
        let priority = p.priority.as_ref().and_then(|v| {
            let n = parse_u32(
                &format!("{path}.priority"),
                v,
                "a rule priority (1-32765)",
                errors,
            )?;
            if (1..=32765).contains(&n) {
                Some(n)
            } else {
                errors.push_json(
                    format!("{path}.priority"),
                    v,
                    "is outside 1-32765 (0 is the local table's rule, 32766+ main and default)"
                        .into(),
                );
                None
            }
        });
        let fwmark = p
            .fwmark
            .as_ref()
            .and_then(|v| parse_fwmark(&format!("{path}.fwmark"), v, errors));
        check_interface(&format!("{path}.iif"), &p.iif, errors);
        let mut routes: Vec<Route> = Vec::new();
        for (j, r) in p.routes.iter().enumerate() {
            let rpath = format!("{path}.routes[{j}]");
            let dest = if r.to == "default" {
                Some(None)
            } else {
                parse_cidr(&format!("{rpath}.to"), &r.to, errors).map(Some)
            };
            if let Some(Some(c)) = dest {
                families.note(&format!("routes[{j}].to"), c.family(), errors, &r.to);
            }
            // `0.0.0.0/0` and `::/0` are the default route: the kernel shows them as such.
            let dest = dest.map(|d| d.filter(|c| c.prefix != 0));
            let via = r.via.as_ref().and_then(|v| {
                let ip = parse_ip(&format!("{rpath}.via"), v, errors)?;
                families.note(&format!("routes[{j}].via"), Family::of(&ip), errors, v);
                Some(ip)
            });
            check_interface(&format!("{rpath}.dev"), &r.dev, errors);
            if r.via.is_none() && r.dev.is_none() {
                errors.field(&rpath, "needs `via`, `dev` or both");
            }
            if let Some(to) = dest {
                if routes.iter().any(|o| o.to == to) {
                    errors.push(
                        format!("{rpath}.to"),
                        &r.to,
                        "is listed twice in this table".into(),
                    );
                }
                routes.push(Route {
                    to,
                    via,
                    dev: r.dev.clone(),
                });
            }
        }
        if errors.0.len() != before {
            continue;
        }
        let (Some(from), Some(table)) = (from, table) else {
            continue;
        };
        let family = families.seen.map_or(Family::V4, |(f, _)| f);
        let entry = PolicyRoute {
            family,
            from,
            to,
            table,
            priority,
            fwmark,
            iif: p.iif.clone(),
            routes,
        };
        for other in &out {
            if other.table == entry.table && other.family == entry.family {
                for r in &entry.routes {
                    if other.routes.iter().any(|o| o.to == r.to && o != r) {
                        errors.field(format!("{path}.routes"), &format!("a different route to {} in table {} is already given by another entry", r.to.map_or("default".to_string(), |c| c.to_string()), entry.table));
                    }
                }
            }
            if (
                other.family,
                other.from,
                other.to,
                other.table,
                other.priority,
                other.fwmark,
                &other.iif,
            ) == (
                entry.family,
                entry.from,
                entry.to,
                entry.table,
                entry.priority,
                entry.fwmark,
                &entry.iif,
            ) {
                errors.field(&path, "the same rule is listed twice");
            }
        }
        out.push(entry);
    }
    out
}
