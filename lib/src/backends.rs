//! Which backends a run reads: the one the params name, and those that may still hold the
//! instance. Objects named for the instance are its own whatever the record says, so the
//! record only saves reads: it names the backend and iptables flavour holding the instance,
//! and a run with another one moves it (new objects first, then the old ones removed, one
//! rollback for both). Without a record (a wiped run dir, a reboot that restored a saved
//! ruleset), and for `state: absent`, every backend and flavour is looked at.

use crate::firewall::iptables::observe::tool_flavour;
use crate::firewall::iptables::Iptables;
use crate::firewall::migrate::Moving;
use crate::firewall::nftables::{table::table_name, Nftables};
use crate::firewall::Firewall;
use crate::model::{Config, State};
use crate::net::Family;
use crate::observe::{self, Prelude};
use crate::ownership::Record;
use crate::record_store::Host;
use crate::tools::{Backend, Flavour, IptablesTool};

/// An iptables run: the flavour asked for, then the instance's nft table and the other
/// flavour.
pub(crate) type ForIptables = Moving<Iptables, Moving<Nftables, Iptables>>;

/// An nftables run: the instance's table, then both iptables flavours.
pub(crate) type ForNftables = Moving<Nftables, Moving<Iptables, Iptables>>;

/// A stage that runs with whichever backends [`with_backends`] picks: written once, generic
/// over them, so a new backend is a branch there and not in every caller.
pub(crate) trait WithBackends {
    type Out;
    fn with<F: Firewall>(self, firewall: &F, sys: &mut dyn Host, prelude: Prelude) -> Self::Out;
}

/// Runs `stage` with the backends a run of `config` reads and writes: the one its params name,
/// and those that may still hold the instance (see the module's doc).
pub(crate) fn with_backends<W: WithBackends>(
    config: &Config,
    prelude: Prelude,
    sys: &mut dyn Host,
    stage: W,
) -> W::Out {
    if config.backend.is_nftables() {
        let moving = for_nftables(Run::of(config), &prelude, sys);
        stage.with(&moving, sys, prelude)
    } else {
        let tool = IptablesTool::of(config.backend);
        let moving = for_iptables(Run::of(config), &prelude, tool, sys);
        stage.with(&moving, sys, prelude)
    }
}

/// No record at all: nothing says which backend holds the instance (a first run looks the
/// same, and finds nothing).
pub(crate) fn record_lost(prelude: &Prelude) -> bool {
    prelude.record == Record::default()
}

/// What a run is for: its instance, and whether it removes it (then it looks everywhere).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run<'a> {
    pub instance: &'a str,
    pub absent: bool,
}

impl<'a> Run<'a> {
    pub(crate) fn of(config: &'a Config) -> Run<'a> {
        Run {
            instance: &config.instance,
            absent: config.state == State::Absent,
        }
    }
}

/// Should the run look everywhere (no record, or removing the instance)?
fn everywhere(run: Run, prelude: &Prelude) -> bool {
    record_lost(prelude) || run.absent
}

/// The oldest kernel the nftables backend's table loads on: its maps have concatenated keys
/// with intervals (`meta l4proto . th dport`, Linux 5.6; inet NAT came with 5.2). Tested on
/// Debian 11's 5.10 with nft 0.9.8 and later.
pub(crate) const NFTABLES_MIN_KERNEL: (u32, u32) = (5, 6);

/// Why the nftables backend cannot install here (an older kernel), checked before the
/// firewall is read; None when it can, or when the kernel cannot be told. Removing an
/// instance is never refused.
pub(crate) fn nftables_unsupported(config: &Config, sys: &mut dyn Host) -> Option<String> {
    if config.state == State::Absent {
        return None;
    }
    let release = sys.read_sysctl("kernel/osrelease").ok().flatten()?;
    let found = kernel_version(&release)?;
    (found < NFTABLES_MIN_KERNEL).then(|| {
        let (major, minor) = NFTABLES_MIN_KERNEL;
        format!("backend: nftables needs Linux {major}.{minor} or later (its maps key on protocol and port ranges together); this kernel is {release}: use backend: iptables (the default), which works here")
    })
}

/// `5.10.0-32-amd64` as (5, 10).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The flavour `tool` runs here: as installed resolves to nf_tables or legacy by where
/// `iptables-save` leads (stays as installed when that cannot be told).
pub(crate) fn resolve(sys: &mut dyn Host, tool: IptablesTool) -> IptablesTool {
    resolved(tool, installed_flavour(sys))
}

/// The flavour `iptables-save` drives, by where it leads (one lookup, no process).
fn installed_flavour(sys: &mut dyn Host) -> IptablesTool {
    match sys
        .save_tool(IptablesTool::Installed, Family::V4)
        .ok()
        .as_deref()
        .and_then(tool_flavour)
    {
        Some(Flavour::Legacy) => IptablesTool::Legacy,
        Some(_) => IptablesTool::Nft,
        None => IptablesTool::Installed,
    }
}

fn resolved(tool: IptablesTool, installed: IptablesTool) -> IptablesTool {
    match tool {
        IptablesTool::Installed => installed,
        named => named,
    }
}

/// The iptables backend for `flavour`: the tools as installed when they drive it (what
/// `iptables-save` is, as the operator's own commands), else that flavour's by name.
fn driving(flavour: IptablesTool, installed: IptablesTool) -> Iptables {
    if flavour == installed || flavour == IptablesTool::Installed {
        Iptables::new(IptablesTool::Installed, installed)
    } else {
        Iptables::new(flavour, flavour)
    }
}

/// Are the backend's tools on PATH?
fn on_path(sys: &mut dyn Host, backend: &Iptables) -> bool {
    sys.has_tool(&backend.tool.command(Family::V4, "save"))
}

/// The iptables flavour the record names (a record from before flavours were kept, or one of
/// the iptables backend without a name, means iptables as installed), or None when it names
/// nftables or is lost.
fn recorded_flavour(prelude: &Prelude, installed: IptablesTool) -> Option<IptablesTool> {
    if record_lost(prelude) {
        return None;
    }
    match prelude.record.backend {
        None => Some(installed),
        Some(backend) => backend.iptables_tool().map(|t| resolved(t, installed)),
    }
}

/// The backends of an iptables run with `tool`.
pub(crate) fn for_iptables(
    run: Run,
    prelude: &Prelude,
    tool: IptablesTool,
    sys: &mut dyn Host,
) -> ForIptables {
    let installed = installed_flavour(sys);
    let new = resolved(tool, installed);
    let other = new.other();
    let everywhere = everywhere(run, prelude);
    let held = prelude.record.backend;
    // The nft table is looked at best-effort when nothing names it (a refused nft never
    // fails an iptables run).
    let read_nft = held == Some(Backend::Nftables)
        || (everywhere && observe::nft_table_has_chains(sys, &table_name(run.instance)));
    // With the flavour unknown the other one might be the same tables: never read as "old".
    let other_backend = driving(other, installed);
    let read_other = new != IptablesTool::Installed
        && (recorded_flavour(prelude, installed) == Some(other) || everywhere)
        && on_path(sys, &other_backend);
    // The tools the params name, known to drive `new`.
    let new_backend = Iptables::new(tool, new);
    Moving {
        new: new_backend,
        old: Moving {
            new: Nftables::new(run.instance),
            old: other_backend,
            from_new: read_nft,
            from_old: read_other,
        },
        from_old: read_nft || read_other,
        from_new: true,
    }
}

/// The backends of an nftables run.
pub(crate) fn for_nftables(run: Run, prelude: &Prelude, sys: &mut dyn Host) -> ForNftables {
    let everywhere = everywhere(run, prelude);
    let installed = installed_flavour(sys);
    let recorded = recorded_flavour(prelude, installed);
    let first = recorded.unwrap_or(installed);
    let (first_backend, second_backend) =
        (driving(first, installed), driving(first.other(), installed));
    let read_first = (recorded.is_some() || everywhere) && on_path(sys, &first_backend);
    // With the flavour unknown the other one might be the same tables: never read twice.
    let read_second =
        first != IptablesTool::Installed && everywhere && on_path(sys, &second_backend);
    Moving {
        new: Nftables::new(run.instance),
        old: Moving {
            new: first_backend,
            old: second_backend,
            from_new: read_first,
            from_old: read_second,
        },
        from_old: read_first || read_second,
        from_new: true,
    }
}
