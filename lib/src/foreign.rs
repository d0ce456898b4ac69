//! Other software's objects that portfwd's checks must know of, as plain data: found by the
//! observe stage, kept in the record's read cache, read by the checks.

use crate::net::{Family, PortRange, Proto};

/// Another owner's NAT rule that a connection meets before portfwd's (a DNAT or REDIRECT in
/// the same hook, earlier), so it may take a forward's connections first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ForeignNat {
    pub family: Family,
    /// `nat PREROUTING` or `inet docker prerouting`: where it was found.
    pub place: String,
    /// The rule as its tool shows it.
    pub rule: String,
    /// The protocol it matches (None: any).
    pub proto: Option<Proto>,
    /// The destination ports it matches (None: any).
    pub ports: Option<PortRange>,
    /// Whether it runs for locally made connections (nat OUTPUT) rather than arriving ones.
    pub local: bool,
}

/// A base chain at the forward hook, and what it does to a forwarded packet.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ForwardChain {
    pub family: String,
    pub table: String,
    pub name: String,
    pub priority: i64,
    /// `policy drop`.
    pub policy_drop: bool,
    /// Its last rule drops or rejects with no match at all.
    pub ends_in_drop: bool,
    /// A rule accepts `ct status dnat` (DNATed flows pass, as firewalld does).
    pub accepts_dnat: bool,
    /// The conntrack marks an unconditional rule accepts, as (value, mask): `ct mark & M == V
    /// accept`, `-m connmark --mark V/M -j ACCEPT`.
    #[serde(default)]
    pub accepted_marks: Vec<(u32, u32)>,
    /// iptables-legacy's FORWARD rather than an nftables chain.
    pub legacy: bool,
    /// iptables-nft's FORWARD (read with `iptables-nft-save`, in iptables' spelling).
    #[serde(default)]
    pub iptables_nft: bool,
}

impl ForwardChain {
    /// `inet firewalld filter_FORWARD`, `iptables filter FORWARD` (iptables-nft's), or
    /// `iptables-legacy filter FORWARD`.
    pub(crate) fn label(&self) -> String {
        match self.tool() {
            Some(tool) => format!("{tool} {} {}", self.table, self.name),
            None => format!("{} {} {}", self.family, self.table, self.name),
        }
    }

    /// The iptables command that manages it, when iptables does.
    pub(crate) fn tool(&self) -> Option<&'static str> {
        let v6 = self.family == "ip6";
        match (self.legacy, self.iptables_nft, v6) {
            (true, _, false) => Some("iptables-legacy"),
            (true, _, true) => Some("ip6tables-legacy"),
            (false, true, false) => Some("iptables"),
            (false, true, true) => Some("ip6tables"),
            (false, false, _) => None,
        }
    }

    /// What kind of filter it is, for messages.
    pub(crate) fn owner(&self) -> &'static str {
        match (self.legacy, self.iptables_nft) {
            (true, _) => "iptables-legacy",
            (false, true) => "iptables-nft",
            (false, false) => "nftables",
        }
    }

    /// Does an accept of the chain let every flow carrying conntrack mark `bit` through?
    pub(crate) fn accepts_mark(&self, bit: u32) -> bool {
        self.accepted_marks
            .iter()
            .any(|&(value, mask)| mask & bit == bit && value & mask == bit)
    }

    /// Drops what reaches its end (policy or last rule).
    pub(crate) fn drops(&self) -> bool {
        self.policy_drop || self.ends_in_drop
    }
}
