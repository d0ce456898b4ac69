//! Reads the params back out of what an instance owns, for `portfwd show` and the `before`
//! side of `--diff`: the entries from the firewall backend, addresses and policy routes from
//! the owned iproute2 objects. Compiling the result reproduces the same state, so applying
//! what `show` prints is a no-op.
//!
//! The order is the installed one, so the same state always reads back the same: with iptables
//! forwards and masquerade entries in rule order (the order of the params that wrote them);
//! with nftables forwards by name (its maps keep no order; two forwards that could match the
//! same packet are refused, so their order has no effect) and masquerade entries in rule order
//! (the first matching subnet wins); addresses as the kernel lists them (a subnet's primary
//! first); policy routes by priority, each table's routes under its first rule.

use serde_json::Value;

use crate::firewall::Entries;
use crate::model::{default_route_protocol, AddressParams, Params, PolicyRouteParams, RouteParams};
use crate::routing::Routing;

/// Rebuilds the whole params: forwards and masquerade from owned iptables rules, addresses and
/// policy routes from owned iproute2 objects (each table's routes under its first rule).
pub(crate) fn params_from_state(
    entries: Entries,
    routing: &Routing,
    instance: &str,
    protocol: u8,
    persist: bool,
) -> Params {
    let mut params = Params {
        instance: instance.to_string(),
        forwards: entries.forwards,
        masquerade: entries.masquerade,
        conn_mark: entries.conn_mark,
        ..Params::default()
    };
    params.addresses = routing
        .addresses
        .iter()
        .map(|a| AddressParams {
            address: format!("{}/{}", a.addr, a.prefix),
            dev: a.dev.clone(),
            label: a.label.clone(),
        })
        .collect();
    params.policy_routes = routing
        .rules
        .iter()
        .map(|r| PolicyRouteParams {
            from: r.from.to_string(),
            to: r.to.map(|c| c.to_string()),
            table: Value::from(r.table),
            priority: Some(Value::from(r.priority)),
            fwmark: r.fwmark.map(|(mark, mask)| {
                Value::from(if mask == u32::MAX {
                    format!("{mark:#x}")
                } else {
                    format!("{mark:#x}/{mask:#x}")
                })
            }),
            iif: r.iif.clone(),
            routes: Vec::new(),
        })
        .collect();
    for route in &routing.routes {
        let owner = routing
            .rules
            .iter()
            .position(|r| r.table == route.table && r.family == route.family);
        if let Some(entry) = owner.and_then(|i| params.policy_routes.get_mut(i)) {
            entry.routes.push(RouteParams {
                to: route
                    .to
                    .map_or_else(|| "default".to_string(), |c| c.to_string()),
                via: route.via.map(|v| v.to_string()),
                dev: route.dev.clone(),
            });
        }
    }
    params.persist = persist;
    if protocol != default_route_protocol(instance) {
        params.route_protocol = Some(protocol);
    }
    params
}
