//! `show` and `list`: the host's instances read back as params. Whatever is named for an
//! instance is read, on every backend and flavour, record or not, so what `show` prints applies
//! as a no-op and `list` can say whether each instance is converged.

use crate::backends;
use crate::converge;
use crate::error::Error;
use crate::firewall::migrate::Moving;
use crate::firewall::Firewall;
use crate::inventory::instances;
use crate::model::{self, Config, Params, Proto, RunMode};
use crate::net::Family;
use crate::observe;
use crate::plan;
use crate::record_store::Host;
use crate::report::decompile::params_from_state;
use crate::routing;
use crate::system::{RealSystem, System};
use crate::tools::{Backend, IptablesTool};

/// The instance's current managed state as params; applying them is a no-op.
/// The backend is the one the record names, else `backend`. An instance the
/// host has nothing of (no entry, no record, no stored params, no object named for it) is an
/// error naming the instances there are.
pub fn show(
    instance: &str,
    protocol: Option<u8>,
    backend: Backend,
    sys: &mut RealSystem,
) -> Result<Params, Error> {
    let nftables = backend.is_nftables();
    let params = show_on(instance, protocol, nftables, sys)?;
    let holds_nothing = params.forwards.is_empty()
        && params.masquerade.is_empty()
        && params.addresses.is_empty()
        && params.policy_routes.is_empty();
    if holds_nothing {
        let existing = instances(sys)?;
        if !existing.contains(instance) {
            return Err(Error::NoSuchInstance {
                instance: instance.to_string(),
                existing: existing.into_iter().collect(),
            });
        }
    }
    Ok(params)
}

/// [`show`] against any host.
pub(crate) fn show_on(
    instance: &str,
    protocol: Option<u8>,
    nftables: bool,
    sys: &mut dyn Host,
) -> Result<Params, Error> {
    let prelude = observe::prelude(sys, instance)?;
    // Every backend and flavour is read: what is named for the instance is its own, record
    // or not (as for `absent`).
    let all = backends::Run {
        instance,
        absent: true,
    };
    let held_by = prelude.record.backend;
    if held_by == Some(Backend::Nftables) || (held_by.is_none() && nftables) {
        let all = backends::for_nftables(all, &prelude, sys);
        show_with(&all, instance, protocol, sys, prelude)
    } else {
        // The flavour the record names, with the tools as installed when they drive it.
        let tool = match held_by.and_then(Backend::iptables_tool) {
            Some(named) if named != backends::resolve(sys, IptablesTool::Installed) => named,
            _ => IptablesTool::Installed,
        };
        let all = backends::for_iptables(all, &prelude, tool, sys);
        show_with(&all, instance, protocol, sys, prelude)
    }
}

fn show_with<N: Firewall, O: Firewall>(
    firewall: &Moving<N, O>,
    instance: &str,
    protocol: Option<u8>,
    sys: &mut dyn Host,
    prelude: observe::Prelude,
) -> Result<Params, Error> {
    let protocol = protocol.unwrap_or_else(|| model::default_route_protocol(instance));
    let observed = observe::observe(
        firewall,
        sys,
        prelude,
        observe::Known::Nothing,
        protocol,
        &[],
        observe::Scope::ALL,
    )?;
    let state = firewall.snapshot(&observed.firewall);
    // Without a record, policy routes the stored params declare are the instance's too.
    let (routing, _) = plan::record::taken_back(&routing::Routing::default(), &observed, protocol);
    let mut params = params_from_state(
        firewall.decompile(instance, &state),
        &routing.owned,
        instance,
        protocol,
        observed.stored.is_some(),
    );
    // The backend that holds the entries (the first that does), by the name the params use
    // for it; iptables as installed is the default.
    let installed = backends::resolve(sys, IptablesTool::Installed);
    params.backend = match firewall.held_by(&state) {
        Some(held) => match held.iptables_tool() {
            // A flavour forced although it is the one installed is the installed one.
            Some(tool) if tool == installed => Backend::Iptables,
            _ => held,
        },
        None => Backend::Iptables,
    };
    Ok(params)
}

/// One instance as `portfwd list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub instance: String,
    /// The backend holding its entries, as the params name it (`iptables` when it holds none).
    pub backend: Backend,
    pub forwards: usize,
    pub masquerade: usize,
    pub addresses: usize,
    pub policy_routes: usize,
    /// Its params are stored for `portfwd restore`.
    pub persist: bool,
    /// Applying its stored params (or, without stored params, its installed state as params,
    /// which finds drift of portfwd's own objects) would change nothing. None when that could
    /// not be found out (see `msg`).
    pub converged: Option<bool>,
    /// `stored params` or `installed state`.
    pub compared_with: &'static str,
    /// What applying would change, or why it could not be found out.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub msg: String,
}

/// Every instance on this host (see [`crate::inventory`]), sorted by name. It changes nothing.
pub fn list(sys: &mut RealSystem) -> Result<Vec<Listed>, Error> {
    let names = instances(sys)?;
    let mut out = Vec::new();
    for instance in names {
        let stored = sys.read_stored(&instance)?;
        let stored_config = stored
            .as_deref()
            .map(|text| Config::from_json(text).map(|(config, _, _)| config));
        let protocol = match &stored_config {
            Some(Ok(config)) => Some(config.route_protocol),
            _ => None,
        };
        let shown = show(&instance, protocol, Backend::Iptables, sys)?;
        let (compared_with, against) = match stored_config {
            Some(parsed) => ("stored params", parsed),
            None => ("installed state", shown.validate()),
        };
        let (converged, msg) = match against {
            Err(e) => (None, e.to_string()),
            Ok(config) => {
                let check = RunMode {
                    check: true,
                    diff: false,
                };
                let report = converge::run(&config, check, sys);
                match (report.failed, report.changed) {
                    (true, _) => (None, report.msg),
                    (false, true) => (Some(false), report.msg),
                    (false, false) => (Some(true), String::new()),
                }
            }
        };
        out.push(Listed {
            backend: shown.backend,
            forwards: shown.forwards.len(),
            masquerade: shown.masquerade.len(),
            addresses: shown.addresses.len(),
            policy_routes: shown.policy_routes.len(),
            persist: stored.is_some(),
            converged,
            compared_with,
            msg,
            instance,
        });
    }
    Ok(out)
}

/// Names where each traced packet's flow went (the reply source of its conntrack entry), so a
/// pool's trace says the backend it chose. Packets without an entry (gone, or conntrack not
/// installed) keep none.
pub fn name_backends(packets: &mut [crate::trace::Packet], sys: &mut RealSystem) {
    let mut listed: std::collections::HashMap<(Family, Proto), Vec<crate::conntrack::Flow>> =
        std::collections::HashMap::new();
    for packet in packets.iter_mut() {
        let Some(key) = packet.flow else {
            continue;
        };
        let family = Family::of(&key.src);
        let flows = listed.entry((family, key.proto)).or_insert_with(|| {
            match sys.conntrack_list(family, key.proto) {
                Ok(Some(text)) => crate::conntrack::parse(&text, family),
                _ => Vec::new(),
            }
        });
        let found = flows.iter().find(|f| {
            (f.orig_src, f.orig_sport, f.orig_dst, f.orig_dport)
                == (key.src, key.sport, key.dst, key.dport)
        });
        if let Some(f) = found {
            if (f.reply_src, f.reply_sport) != (f.orig_dst, f.orig_dport) {
                packet.chose((f.reply_src, f.reply_sport));
            }
        }
    }
}

/// The forwards an instance has installed, to label its rules in a trace.
pub fn trace_entries(instance: &str, sys: &mut RealSystem) -> Result<crate::trace::Entries, Error> {
    let config = show(instance, None, Backend::Iptables, sys)?.validate()?;
    Ok(config
        .forwards
        .iter()
        .map(|f| {
            let to = |(addr, port): (std::net::IpAddr, Option<u16>)| match (addr, port) {
                (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
                (a, Some(p)) => format!("{a}:{p}"),
                (a, None) => a.to_string(),
            };
            let dnat = match f.action.backends().as_slice() {
                [] => None,
                [one] if matches!(f.action, crate::model::Action::Dnat { .. }) => {
                    Some(format!("dnat to {}", to(*one)))
                }
                pool => Some(format!(
                    "dnat to one of {}",
                    pool.iter().map(|b| to(*b)).collect::<Vec<_>>().join(", ")
                )),
            };
            let snat = match f.action.snat() {
                Some(crate::model::Snat::To(ip)) => Some(format!("snat to {ip}")),
                _ => None,
            };
            crate::trace::Entry {
                instance: instance.to_string(),
                name: f.name.clone(),
                protos: f.protos.clone(),
                ports: f.listen_port,
                dnat,
                snat,
            }
        })
        .collect())
}
