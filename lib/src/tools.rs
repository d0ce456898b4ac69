//! The tools portfwd drives and the backends it names, as data: which backend holds an
//! instance, which iptables flavour's commands run, and the reads asked of the host.
//!
//! Nothing here runs anything ([`crate::system`] does): the backends name their reads and
//! transactions in these terms and stay pure, and the record keeps the [`Backend`] by name.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::net::Family;

/// Which packet filter portfwd writes: iptables (its flavour as installed, or one forced) or
/// nftables natively. `auto`, `nft` and `legacy` are the names before nftables was a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// `iptables-save`/`iptables-restore` as installed (whatever the alternatives select).
    #[default]
    Iptables,
    /// `iptables-nft-save`/`iptables-nft-restore`.
    IptablesNft,
    /// `iptables-legacy-save`/`iptables-legacy-restore`.
    IptablesLegacy,
    /// A table of the instance's own, `inet portfwd-<instance>`, written with `nft -f`.
    Nftables,
    /// Deprecated name of `iptables`.
    Auto,
    /// Deprecated name of `iptables-nft`.
    Nft,
    /// Deprecated name of `iptables-legacy`.
    Legacy,
}

impl Backend {
    /// The current name of a deprecated one (`auto` → `iptables`).
    pub fn canonical(self) -> Backend {
        match self {
            Backend::Auto => Backend::Iptables,
            Backend::Nft => Backend::IptablesNft,
            Backend::Legacy => Backend::IptablesLegacy,
            other => other,
        }
    }

    /// The value as the user writes it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::Nftables => "nftables",
            Backend::Auto => "auto",
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The iptables tools it runs; None for nftables.
    pub fn iptables_tool(self) -> Option<IptablesTool> {
        match self.canonical() {
            Backend::Nftables => None,
            Backend::IptablesNft => Some(IptablesTool::Nft),
            Backend::IptablesLegacy => Some(IptablesTool::Legacy),
            _ => Some(IptablesTool::Installed),
        }
    }

    /// Is this the native nftables backend (rather than one of the iptables ones)?
    pub fn is_nftables(self) -> bool {
        self == Backend::Nftables
    }
}

/// Which iptables tools a backend runs: as installed (`iptables-save`, whatever the
/// alternatives select), or one flavour by name. A run may use two (a move between flavours).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum IptablesTool {
    #[default]
    Installed,
    Nft,
    Legacy,
}

impl IptablesTool {
    /// The tools the params' backend names (`nftables` reads iptables as installed).
    pub fn of(backend: Backend) -> IptablesTool {
        match backend.canonical() {
            Backend::IptablesNft => IptablesTool::Nft,
            Backend::IptablesLegacy => IptablesTool::Legacy,
            _ => IptablesTool::Installed,
        }
    }

    /// `iptables-nft-save`, `ip6tables-restore`, ...
    pub fn command(self, family: Family, verb: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            IptablesTool::Installed => format!("{base}-{verb}"),
            IptablesTool::Nft => format!("{base}-nft-{verb}"),
            IptablesTool::Legacy => format!("{base}-legacy-{verb}"),
        }
    }

    /// The backend that runs these tools (as installed: `iptables`).
    pub fn backend(self) -> Backend {
        match self {
            IptablesTool::Installed => Backend::Iptables,
            IptablesTool::Nft => Backend::IptablesNft,
            IptablesTool::Legacy => Backend::IptablesLegacy,
        }
    }

    /// The flavour's name in messages (`iptables-nft`), its backend's.
    pub fn name(self) -> &'static str {
        self.backend().name()
    }

    /// The flavour that is not this one (as installed counts as nf_tables).
    pub fn other(self) -> IptablesTool {
        match self {
            IptablesTool::Legacy => IptablesTool::Nft,
            _ => IptablesTool::Legacy,
        }
    }
}

/// The restore command line as shown in results (`commands`).
pub(crate) fn restore_command(tool: IptablesTool, family: Family) -> String {
    format!(
        "{} --noflush -w {}",
        tool.command(family, "restore"),
        RESTORE_WAIT_SECONDS
    )
}

/// How long `iptables-restore -w` waits for the xtables lock of other tools.
pub(crate) const RESTORE_WAIT_SECONDS: u32 = 10;

/// The kernel side of a backend's objects, as a result's `backend` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavour {
    /// iptables-nft: iptables' rules in nf_tables.
    NfTables,
    /// iptables-legacy: the xtables tables.
    Legacy,
    /// The native nftables backend's own table.
    Nftables,
}

impl Flavour {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Flavour::NfTables => "nf_tables",
            Flavour::Legacy => "legacy",
            Flavour::Nftables => "nftables",
        }
    }

    /// Is it in nf_tables, whose generation every change of any table moves (legacy
    /// changes move nothing)?
    pub(crate) fn in_nf_tables(self) -> bool {
        self != Flavour::Legacy
    }
}

/// A read that does not depend on any other, so a batch of them can run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// `iptables-save` / `ip6tables-save` of that flavour: (stdout, stderr).
    Save(IptablesTool, Family),
    /// `ip -N -j ARGS...`: (stdout, "").
    IpJson(Vec<&'static str>),
    /// `iptables-legacy-save` / `ip6tables-legacy-save` (lists only tables that exist, loads
    /// nothing): (stdout, ""); empty when the tool is not installed, or when it is the save
    /// tool in use (then [`Read::Save`] reads it already).
    LegacySave(Family, IptablesTool),
    /// `iptables-nft-save -t TABLE` / `ip6tables-nft-save -t TABLE` (`filter` or `nat`):
    /// (stdout, ""); empty when not installed. Read when another backend than iptables-nft
    /// runs beside iptables-nft's chains: nft's JSON lists their matches and targets as `xt`
    /// expressions without arguments (nft 0.9.8: without even a name).
    NftSave(Family, &'static str),
    /// `nft -j ARGS...`: (stdout, ""); empty when `nft` is not installed. Callers pass only
    /// words nft's parser takes back as one word each (nft joins its arguments into a line).
    NftJson(Vec<String>),
    /// `nft -j list table inet NAME`: (stdout, ""); empty when the table does not exist or
    /// `nft` is not installed.
    NftTable(String),
    /// The file the save tool resolves to through links (`/usr/sbin/xtables-nft-multi`):
    /// (path, ""). iptables before 1.8.8 does not name its flavour in the dump. When the
    /// file's name does not say it either (a wrapper script), the flavour its `--version`
    /// names follows the path: `/usr/local/sbin/iptables-save (nf_tables)`.
    SaveTool(IptablesTool, Family),
}

/// One nftables table as a netlink dump found it at one generation (see the host's
/// `nft_dump`): what the nftables backend reads in place of a listing when the record proves
/// the table's shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NftDump {
    /// The generation it was made at (the same before and after it).
    pub generation: u32,
    /// A digest of the table, its chains, rules and sets (counters' values left out): equal
    /// digests, equal objects.
    pub shape: u64,
    /// Each set and map, in the kernel's order, with its elements when they were asked for.
    pub sets: Vec<DumpedSet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DumpedSet {
    pub name: String,
    pub elements: Vec<DumpedElement>,
}

/// One element as the kernel holds it: the key's bytes (concatenated fields, each padded to
/// four bytes), the end of a range, the data's bytes or a jump's chain, and its comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DumpedElement {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub data: Option<Vec<u8>>,
    pub jump: Option<String>,
    pub comment: Option<String>,
    /// It has something portfwd never writes (flags, a timeout, expressions, a verdict other
    /// than a jump, user data other than a comment).
    pub other: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_follow_backend() {
        assert_eq!(
            IptablesTool::of(Backend::Iptables).command(Family::V6, "save"),
            "ip6tables-save"
        );
        assert_eq!(
            IptablesTool::of(Backend::IptablesNft).command(Family::V4, "restore"),
            "iptables-nft-restore"
        );
        assert_eq!(
            IptablesTool::of(Backend::Legacy).command(Family::V4, "save"),
            "iptables-legacy-save"
        );
    }
}
