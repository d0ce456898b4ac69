//! The third stage: reads the host as the plan needs it. The firewall backend names its reads
//! and parses them; the ip rules, routes and addresses (`ip -j`), the sysctls, the record of
//! created objects and the stored params are read here. Everything the plan decides on is read
//! here; [`System`] only runs the reads.
//!
//! Read once, write once: with 10,000 foreign rules one save costs ~0.15 s, one `iptables -C`
//! ~0.1 s, so nothing ever checks rule by rule; the independent reads run at once.

pub(crate) mod iproute;
pub(crate) mod neighbours;
pub(crate) mod nft;

use std::collections::{BTreeMap, BTreeSet};

use crate::firewall::iptables::Iptables;
use crate::firewall::Firewall;
use crate::net::Family;
use crate::ownership::{FirewallRead, OtherTables, ReadCache, Record};
use crate::record_store::Host;
use crate::routing::{IfAddr, IpRule, Routing};
use crate::system::SystemError;
use crate::tools::{Flavour, IptablesTool, Read};

/// The host as the plan sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observed<F: Firewall = Iptables> {
    /// What the firewall backend found of the instance.
    pub firewall: F::Observed,
    pub sysctls: BTreeMap<String, Option<String>>,
    pub routing: RoutingObserved,
    /// What the instance recorded creating (addresses, tables, rules, routes, sysctls).
    pub record: Record,
    /// The instance's stored params file, if any.
    pub stored: Option<String>,
    /// What this run knows of the firewall at a generation (see [`ReadCache`]): from the
    /// cache it used, or from its own nf_tables read.
    pub firewall_read: Option<FirewallRead>,
    /// The firewall is known to hold exactly the desired objects (a current read cache of
    /// their digest): there is nothing to plan for it.
    pub firewall_is_desired: bool,
    /// Other tables' base chains at the forward hook (see [`nft`]).
    pub forward_chains: Vec<crate::foreign::ForwardChain>,
    /// DNAT/REDIRECT rules of other nftables tables whose NAT runs before portfwd's.
    pub foreign_nat: Vec<crate::foreign::ForeignNat>,
    /// Whether the addresses were read (see [`Scope`]).
    pub addresses_read: bool,
    /// Interfaces with an IPv6 default route from router advertisements, and their
    /// `accept_ra` (enabling forwarding drops those routes unless it is 2).
    pub ra_default_routes: Vec<(String, Option<String>)>,
    pub warnings: Vec<String>,
}

/// The host's iproute2 state as the plan needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoutingObserved {
    /// Rules and routes carrying the instance's protocol.
    pub owned: Routing,
    /// Every address on every interface.
    pub present: Vec<IfAddr>,
    /// Every interface's name (read with the addresses).
    pub links: BTreeSet<String>,
    /// Record keys (`dev addr/prefix`) of the addresses portfwd added.
    pub recorded: BTreeSet<String>,
    /// Every rule carrying the instance's protocol, whoever's, in the kernel's order (what a
    /// `rule del ... protocol N` may hit first).
    pub protocol_rules: Vec<IpRule>,
    /// Every route carrying the instance's protocol, whoever's.
    pub protocol_routes: Vec<crate::routing::IpRoute>,
    /// There is no record at all (a wiped run dir, or a first run): then a rule or route of
    /// the protocol that no other instance's record claims is offered to the plan.
    pub record_lost: bool,
    /// Record keys of the rules and routes other instances here recorded creating (read only
    /// when the record is lost).
    pub claimed_by_others: BTreeSet<String>,
    /// Record keys of every rule and route on the host, any protocol: what already exists
    /// and so can never be claimed as created by this instance.
    pub existing_rules: BTreeSet<String>,
    pub existing_routes: BTreeSet<String>,
}

impl RoutingObserved {
    /// The recorded addresses that are present, as they are now.
    pub(crate) fn owned_addresses(&self) -> Vec<IfAddr> {
        self.present
            .iter()
            .filter(|a| self.recorded.contains(&a.record_key()))
            .cloned()
            .collect()
    }
}

/// What a run needs to read besides the rulesets, sysctls and records. A no-op of a plain
/// forwarder reads neither ip rules, routes nor addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scope {
    /// ip rules and routes: policy routes wanted or recorded, or IPv6 forwarding being managed
    /// (router-advertised default routes).
    pub routing: bool,
    /// Addresses: wanted or recorded, or needed by a warning.
    pub addresses: bool,
    /// Other filters: other nftables tables' forward-hook and early NAT chains, and
    /// iptables-legacy's FORWARD (something is forwarded).
    pub other_filters: bool,
    /// The iptables tools the run drives (iptables-legacy's FORWARD is read apart only when
    /// they are not the legacy ones).
    pub iptables_in_use: IptablesTool,
}

impl Scope {
    /// Everything (`show`, rollback).
    pub(crate) const ALL: Scope = Scope {
        routing: true,
        addresses: true,
        other_filters: false,
        iptables_in_use: IptablesTool::Installed,
    };
}

/// What a run reads first, while the desired state is being compiled: the record of created
/// objects (with the read cache) and the nf_tables generation.
#[derive(Clone)]
pub(crate) struct Prelude {
    /// Whose state is read.
    pub instance: String,
    pub record: Record,
    pub warning: Option<String>,
    pub generation: Option<u32>,
}

/// Reads the record and the generation (both cheap).
pub(crate) fn prelude(sys: &mut dyn Host, instance: &str) -> Result<Prelude, SystemError> {
    let (record, warning) = sys.read_record(instance)?;
    let generation = sys.nft_generation()?;
    Ok(Prelude {
        instance: instance.to_string(),
        record,
        warning,
        generation,
    })
}

impl Prelude {
    /// Is there a read cache of the current generation? (Then the desired objects decide.)
    pub(crate) fn cache_is_current(&self) -> bool {
        self.record
            .read_cache
            .as_ref()
            .is_some_and(|c| Some(c.read.generation) == self.generation)
    }

    /// The read cache that stands for a firewall read of objects with `read_key`.
    pub(crate) fn usable_cache(&self, read_key: Option<u32>) -> Option<ReadCache> {
        let cache = self.record.read_cache.as_ref()?;
        (self.cache_is_current() && Some(cache.digest) == read_key).then(|| cache.clone())
    }
}

/// Does `inet <table>` exist with chains? Read from the chain list (cheap, and read for the
/// warnings anyway), best-effort: where nft is missing or refused, it does not.
pub(crate) fn nft_table_has_chains(sys: &mut dyn Host, table: &str) -> bool {
    if !sys.has_tool("nft") {
        return false;
    }
    let read = Read::NftJson(vec!["list".into(), "chains".into()]);
    sys.read_batch(&[read])
        .first()
        .and_then(|r| r.as_ref().ok())
        .is_some_and(|(out, _)| nft::has_chains_in(out, "inet", table))
}

/// What a run knows of its firewall objects before reading them.
pub(crate) enum Known<'a, F: Firewall> {
    /// Nothing: the firewall is read.
    Nothing,
    /// The read cache of the current generation stands for the read: the objects it holds.
    Cached(&'a F::Desired, ReadCache),
    /// Another writer moved the generation, but a dump of the table has the recorded shape:
    /// what it found (the elements read from it, the rest as last written), and the shape.
    Dumped(F::Observed, u64),
}

/// Reads both families' rulesets (unless the read cache proves them unchanged), the
/// instance's ip rules, routes and addresses, and the given sysctls. The independent reads run
/// at once ([`System::read_batch`]).
pub(crate) fn observe<F: Firewall>(
    firewall: &F,
    sys: &mut dyn Host,
    prelude: Prelude,
    known: Known<'_, F>,
    protocol: u8,
    sysctl_keys: &[String],
    scope: Scope,
) -> Result<Observed<F>, SystemError> {
    let Prelude {
        instance,
        record,
        warning,
        generation,
    } = prelude;
    let instance = instance.as_str();
    let mut observed = Observed::<F> {
        record,
        ..Observed::default()
    };
    observed.warnings.extend(warning);
    let record = &observed.record;
    let routing = scope.routing || !record.rules.is_empty() || !record.routes.is_empty();
    let addresses = scope.addresses || !record.addresses.is_empty();
    // Other tables' chains change only with the generation too: a current cache holds them.
    let cached_other = match &known {
        Known::Cached(_, c) => c.read.other.clone(),
        _ => None,
    };
    let mut reads = match known {
        Known::Nothing => firewall.reads(),
        _ => firewall.cache_reads(),
    };
    let firewall_reads = reads.len();
    if routing {
        for flag in ["-4", "-6"] {
            reads.push(Read::IpJson(vec![flag, "rule", "show"]));
            reads.push(Read::IpJson(vec![flag, "route", "show", "table", "all"]));
        }
    }
    if addresses {
        reads.push(Read::IpJson(vec!["addr", "show"]));
    }
    if scope.other_filters {
        if cached_other.is_none() {
            reads.push(Read::NftJson(vec!["list".into(), "chains".into()]));
        }
        for family in [Family::V4, Family::V6] {
            reads.push(Read::LegacySave(family, scope.iptables_in_use));
        }
    }
    let mut results = sys.read_batch(&reads).into_iter();
    let mut next = || {
        results
            .next()
            .unwrap_or_else(|| Ok((String::new(), String::new())))
    };
    let outputs = (0..firewall_reads)
        .map(|_| next())
        .collect::<Result<Vec<_>, _>>()?;
    match known {
        Known::Cached(want, cache) => {
            let mut warnings = Vec::new();
            observed.firewall =
                firewall.assume_reading(instance, want, &cache.read, outputs, &mut warnings);
            observed
                .warnings
                .extend(cache.read.warnings.iter().cloned());
            observed.warnings.extend(warnings);
            observed.firewall_read = Some(cache.read);
        }
        Known::Dumped(dumped, shape) => {
            // As a full read at the run's generation (the dump's may be later: then the
            // next run reads again), with other tables read anew.
            observed.firewall_read = generation.map(|generation| FirewallRead {
                generation,
                warnings: Vec::new(),
                facts: firewall.foreign_facts(&dumped),
                other: None,
                shape: Some(shape),
            });
            observed.firewall = dumped;
        }
        Known::Nothing => {
            let mut warnings = Vec::new();
            observed.firewall = firewall.observe(instance, outputs, &mut warnings);
            let flavour = firewall.flavour(&observed.firewall);
            // nf_tables only: iptables-legacy changes do not move the generation.
            let readable = firewall.readable(&observed.firewall);
            if let (Some(generation), Some(true), true) =
                (generation, flavour.map(Flavour::in_nf_tables), readable)
            {
                observed.firewall_read = Some(FirewallRead {
                    generation,
                    warnings: warnings.clone(),
                    facts: firewall.foreign_facts(&observed.firewall),
                    other: None,
                    shape: None,
                });
            }
            observed.warnings.extend(warnings);
        }
    }
    let mut ra_devices = Vec::new();
    if routing {
        for family in [Family::V4, Family::V6] {
            let (rules, _) = next()?;
            let (routes, _) = next()?;
            let ours = iproute::parse_rules(&rules, family, protocol);
            let r = &mut observed.routing;
            r.protocol_rules.extend(ours.iter().cloned());
            r.owned.rules.extend(ours);
            r.existing_rules
                .extend(iproute::all_rule_keys(&rules, family));
            let ours = iproute::parse_routes(&routes, family, protocol);
            r.protocol_routes.extend(ours.iter().cloned());
            r.owned.routes.extend(ours);
            r.existing_routes
                .extend(iproute::all_route_keys(&routes, family));
            if family == Family::V6 {
                ra_devices = iproute::ra_default_devices(&routes);
            }
        }
    }
    if addresses {
        let (text, _) = next()?;
        observed.routing.present = iproute::parse_addresses(&text);
        observed.routing.links = iproute::parse_links(&text);
    }
    observed.addresses_read = addresses;
    if scope.other_filters {
        // Other filters are looked at for warnings only: a failed read (no permission, an
        // older nft) means nothing is known about them, never a failed run.
        let other = match cached_other {
            Some(other) => other,
            None => {
                let chains = next().map(|(out, _)| out).unwrap_or_default();
                let (forward_chains, foreign_nat, volatile) =
                    other_tables(firewall, sys, &observed.firewall, &chains, instance);
                let other = OtherTables {
                    forward_chains,
                    foreign_nat,
                };
                // A full read at a known generation keeps them for the next run, unless a
                // table of them has flags: one with `flags owner` vanishes with its process
                // without moving the generation.
                if let Some(read) = observed.firewall_read.as_mut().filter(|_| !volatile) {
                    read.other = Some(other.clone());
                }
                other
            }
        };
        observed.forward_chains = other.forward_chains;
        observed.foreign_nat = other.foreign_nat;
        for family in [Family::V4, Family::V6] {
            let dump = next().map(|(out, _)| out).unwrap_or_default();
            // A backend driving iptables-legacy has its own FORWARD there.
            // Read on every run (legacy changes never move the generation), so a cached run
            // sees a legacy DNAT that takes a forward's port as a full read does.
            if firewall.flavour(&observed.firewall) != Some(Flavour::Legacy) {
                let (forward, nat) = neighbours::legacy(&dump, family, instance);
                observed.forward_chains.extend(forward);
                observed.foreign_nat.extend(nat);
            }
        }
    }
    for key in sysctl_keys {
        let value = sys.read_sysctl(key)?;
        observed.sysctls.insert(key.clone(), value);
    }
    for dev in ra_devices {
        let value = sys.read_sysctl(&format!("net/ipv6/conf/{dev}/accept_ra"))?;
        observed.ra_default_routes.push((dev, value));
    }
    // Sysctls portfwd set earlier: their current value, to put the old one back.
    for key in observed.record.sysctls.keys() {
        if !observed.sysctls.contains_key(key) {
            let value = sys.read_sysctl(key)?;
            observed.sysctls.insert(key.clone(), value);
        }
    }
    observed.routing.recorded = observed.record.addresses.clone();
    observed.routing.record_lost = observed.record == Record::default();
    if routing && observed.routing.record_lost {
        for other in sys.other_records(instance)? {
            observed.routing.claimed_by_others.extend(other.rules);
            observed.routing.claimed_by_others.extend(other.routes);
        }
    }
    // Our protocol number is shared by construction with other instances (and anyone may use
    // it): only what this instance recorded creating is its own.
    let record = &observed.record;
    observed
        .routing
        .owned
        .rules
        .retain(|r| record.rules.contains(&r.record_key()));
    observed
        .routing
        .owned
        .routes
        .retain(|r| record.routes.contains(&r.record_key()));
    observed.routing.owned.addresses = observed.routing.owned_addresses();
    observed.stored = sys.read_stored(instance)?;
    Ok(observed)
}

/// The forward-hook chains of other tables, and the NAT rules of other tables' nat chains that
/// run before iptables' (priority -100 or earlier), with the rules of those whose names nft
/// takes back safely (read at once, one `nft -j list chain` each). iptables-nft's nat chains
/// are read with iptables-nft-save instead: in iptables' spelling, with the chains their rules
/// jump to, where nft's JSON shows an `xt` target without its arguments (or, nft 0.9.8,
/// without its name).
fn other_tables<F: Firewall>(
    firewall: &F,
    sys: &mut dyn Host,
    ours: &F::Observed,
    listing: &str,
    instance: &str,
) -> (
    Vec<crate::foreign::ForwardChain>,
    Vec<crate::foreign::ForeignNat>,
    bool,
) {
    let skip =
        |family: &str, table: &str, name: &str| firewall.owns_hook_chain(ours, family, table, name);
    let mut chains = nft::forward_chains(listing, skip);
    let nat_chains = nft::nat_chains_before(listing, -100, skip);
    let safe =
        |f: &str, t: &str, n: &str| nft::safe_name(f) && nft::safe_name(t) && nft::safe_name(n);
    let list = |f: &str, t: &str, n: &str| {
        Read::NftJson(vec![
            "list".into(),
            "chain".into(),
            f.to_string(),
            t.to_string(),
            n.to_string(),
        ])
    };
    // iptables-nft's own chains are named as iptables names them.
    for c in chains.iter_mut() {
        c.iptables_nft = iptables_nft_chain(&c.family, &c.table, &c.name);
    }
    let readable: Vec<usize> = (0..chains.len())
        .filter(|&i| safe(&chains[i].family, &chains[i].table, &chains[i].name))
        .collect();
    let family_of = |f: &str| if f == "ip6" { Family::V6 } else { Family::V4 };
    let mut nat_saves: Vec<Family> = Vec::new();
    for c in &nat_chains {
        let family = family_of(&c.family);
        if iptables_nft_chain(&c.family, &c.table, &c.name) && !nat_saves.contains(&family) {
            nat_saves.push(family);
        }
    }
    let nat_readable: Vec<&nft::NatChain> = nat_chains
        .iter()
        .filter(|c| safe(&c.family, &c.table, &c.name))
        .filter(|c| !iptables_nft_chain(&c.family, &c.table, &c.name))
        .collect();
    let reads: Vec<Read> = readable
        .iter()
        .map(|&i| list(&chains[i].family, &chains[i].table, &chains[i].name))
        .chain(
            nat_readable
                .iter()
                .map(|c| list(&c.family, &c.table, &c.name)),
        )
        .collect();
    let mut results = sys.read_batch(&reads).into_iter();
    // iptables-nft's FORWARD that drops and accepts by connmark (the mask is not in nft's
    // JSON), or that nft cannot describe at all (nft 0.9.8 lists every `xt` expression as
    // `"xt": null`): that table is read again with iptables-nft-save.
    let mut masks: Vec<(usize, Family)> = Vec::new();
    for &i in &readable {
        if let Some(Ok((text, _))) = results.next() {
            nft::read_rules(&text, &mut chains[i]);
            let c = &chains[i];
            let opaque = text.contains("\"xt\": null");
            if c.iptables_nft && (opaque || (c.drops() && text.contains("\"name\": \"connmark\"")))
            {
                masks.push((i, family_of(&c.family)));
            }
        }
    }
    let mut nat = Vec::new();
    for chain in nat_readable {
        if let Some(Ok((text, _))) = results.next() {
            nat.extend(nft::nat_rules(&text, chain));
        }
    }
    // A table with flags among those the findings are about (one with `flags owner` vanishes
    // with its process without moving the generation), or flags that could not be read: not
    // to be kept.
    let looked_at = !chains.is_empty() || !nat_chains.is_empty();
    let volatile = looked_at
        && match sys.nft_flagged_tables() {
            Ok(flagged) => chains
                .iter()
                .map(|c| (c.family.as_str(), c.table.as_str()))
                .chain(
                    nat_chains
                        .iter()
                        .map(|c| (c.family.as_str(), c.table.as_str())),
                )
                .any(|(f, t)| flagged.iter().any(|(ff, tt)| ff == f && tt == t)),
            Err(_) => true,
        };
    let saves: Vec<Read> = masks
        .iter()
        .map(|&(_, f)| Read::NftSave(f, "filter"))
        .chain(nat_saves.iter().map(|&f| Read::NftSave(f, "nat")))
        .collect();
    let mut saved = sys.read_batch(&saves).into_iter();
    for &(i, family) in &masks {
        if let Some(forward) = saved.next().and_then(Result::ok).and_then(|(dump, _)| {
            neighbours::forward_chain(&dump, family, neighbours::Flavour::Nft)
        }) {
            chains[i] = forward;
        }
    }
    for &family in &nat_saves {
        if let Some(Ok((dump, _))) = saved.next() {
            nat.extend(neighbours::iptables_nft_nat(&dump, family, instance));
        }
    }
    (chains, nat, volatile)
}

/// A chain iptables-nft makes (`ip filter FORWARD`, `ip6 nat PREROUTING`, ...): the standard
/// tables' built-in chains, upper case, in the `ip`/`ip6` families.
fn iptables_nft_chain(family: &str, table: &str, name: &str) -> bool {
    matches!(family, "ip" | "ip6")
        && matches!(
            (table, name),
            ("filter", "FORWARD") | ("nat", "PREROUTING" | "OUTPUT")
        )
}
