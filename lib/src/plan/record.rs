//! Plans the record of created objects (see [`crate::ownership::Record`]): after the run,
//! exactly the desired addresses, rules and routes are recorded, except those that existed
//! before without being ours; and before it, the union, so a run killed half way still owns
//! what it made.

use std::collections::BTreeSet;

use super::iproute::RoutingPlan;
use crate::firewall::Firewall;
use crate::observe::{Observed, RoutingObserved};
use crate::ownership::Record;
use crate::routing::{IpRoute, IpRule, Routing};

/// Notes the iproute2 objects of the run in `record`. What existed before without being ours
/// is never claimed, not even ahead of the write (a rollback after `File exists` would
/// otherwise delete someone else's rule or route).
pub(crate) fn plan_routing_record(
    want: &Routing,
    have: &RoutingObserved,
    recorded: &Record,
    routing: &RoutingPlan,
    record: &mut Record,
) {
    if let Some(addresses) = &routing.record {
        record.addresses = addresses.clone();
    }
    let adoptable = adoptable(have);
    let claimable = |key: &String, existing: &BTreeSet<String>, owned: &BTreeSet<String>| {
        owned.contains(key) || !existing.contains(key) || adoptable.contains(key)
    };
    record.rules = want
        .rules
        .iter()
        .map(IpRule::record_key)
        .filter(|k| claimable(k, &have.existing_rules, &recorded.rules))
        .chain(routing.kept_rules.iter().cloned())
        .collect();
    record.routes = want
        .routes
        .iter()
        .map(IpRoute::record_key)
        .filter(|k| claimable(k, &have.existing_routes, &recorded.routes))
        .collect();
}

/// Without a record (a wiped run dir, a first run), the rules and routes carrying the
/// instance's protocol that no other instance here recorded creating: a desired one among them
/// is what this instance made, and is taken back. (One another instance recorded is never
/// taken; what the params do not ask for is never taken: other software may use the number.)
pub(crate) fn adoptable(have: &RoutingObserved) -> BTreeSet<String> {
    if !have.record_lost {
        return BTreeSet::new();
    }
    have.protocol_rules
        .iter()
        .map(IpRule::record_key)
        .chain(have.protocol_routes.iter().map(IpRoute::record_key))
        .filter(|k| !have.claimed_by_others.contains(k))
        .collect()
}

/// The observed routing with, when there is no record, the rules and routes of the protocol
/// that this run's params or the instance's stored params declare exactly (and no other
/// instance here recorded) counted as the instance's own, so a run takes them back and an
/// `absent` with stored params removes them; a warning names each.
pub(crate) fn taken_back<F: Firewall>(
    want: &Routing,
    observed: &Observed<F>,
    protocol: u8,
) -> (RoutingObserved, Vec<String>) {
    let mut have = observed.routing.clone();
    let adoptable = adoptable(&have);
    let mut warnings = Vec::new();
    if adoptable.is_empty() {
        return (have, warnings);
    }
    let stored = observed
        .stored
        .as_deref()
        .and_then(|text| crate::model::Config::from_json(text).ok())
        .map(|(config, _, _)| crate::compile::compile_routing(&config))
        .unwrap_or_default();
    let declared: BTreeSet<String> = [want, &stored]
        .iter()
        .flat_map(|r| {
            r.rules
                .iter()
                .map(IpRule::record_key)
                .chain(r.routes.iter().map(IpRoute::record_key))
        })
        .collect();
    let take = |key: String| adoptable.contains(&key) && declared.contains(&key);
    for r in have.protocol_rules.clone() {
        if take(r.record_key()) && !have.owned.rules.contains(&r) {
            warnings.push(format!("ip rule {} carries this instance's protocol {protocol}, its params declare it and no record says whose it is: taken back as this instance's own", r.record_key()));
            have.owned.rules.push(r);
        }
    }
    for r in have.protocol_routes.clone() {
        if take(r.record_key()) && !have.owned.routes.contains(&r) {
            warnings.push(format!("route {} carries this instance's protocol {protocol}, its params declare it and no record says whose it is: taken back as this instance's own", r.record_key()));
            have.owned.routes.push(r);
        }
    }
    (have, warnings)
}

/// The record written before the first change: what was recorded plus everything the run
/// may create (None when that is what is recorded already).
pub(crate) fn ahead(recorded: &Record, after: &Record) -> Option<Record> {
    let mut ahead = recorded.clone();
    ahead.addresses.extend(after.addresses.iter().cloned());
    ahead.tables.extend(after.tables.iter().cloned());
    ahead.rules.extend(after.rules.iter().cloned());
    ahead.routes.extend(after.routes.iter().cloned());
    // A run killed half way may have moved the instance: the next one reads both backends.
    if after.backend.is_some() {
        ahead.backend = after.backend;
    }
    (&ahead != recorded).then_some(ahead)
}
