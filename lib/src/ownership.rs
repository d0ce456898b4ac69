//! What is ours, decided in one place: the comment grammar every owned rule carries, the
//! stable hash in it, and the [`Record`] of objects the kernel cannot tag.
//!
//! A rule is ours when its comment reads `<instance>:<kind>:<name>:<hash>` (plus a pool
//! backend's weight, see [`weighted_comment`], and [`RESET_MARKER`] on a forward's NAT rules
//! with `reset_connections`), and a jump into the instance's chain
//! when it reads `<instance>:jump`. The hash covers the chain and the whole rule, so the
//! comment alone identifies a rule. Compile writes these comments, observe and the plan
//! recognise them, decompile reads the entries back, all through the functions below.

use std::collections::{BTreeMap, BTreeSet};

use crate::net::Family;

/// What an instance name may be: it becomes part of chain names (`PFWD-<instance>-FWD`, at
/// most 29 characters with a sub-chain suffix) and file names.
pub fn valid_instance(name: &str) -> bool {
    (1..=12).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// How [`valid_instance`] is explained to the user.
pub const INSTANCE_RULE: &str = "must match [a-z0-9-]{1,12}";

/// A forward's rules.
pub(crate) const KIND_FORWARD: &str = "fwd";
/// A masquerade entry's rules.
pub(crate) const KIND_MASQUERADE: &str = "masq";
/// The jump from a built-in chain into the instance's chain.
const KIND_JUMP: &str = "jump";
/// Rules of no single entry: the FORWARD chain's shared flow rules and the dispatch jumps.
pub(crate) const KIND_FLOW: &str = "flow";
/// Accepts the later packets of the instance's marked flows (first in FORWARD).
pub(crate) const FLOW_ESTABLISHED: &str = "established";
/// Accepts the packet that was just marked (last in FORWARD).
pub(crate) const FLOW_MARKED: &str = "marked";
/// Returns what was not DNATed before the per-forward rules see it.
pub(crate) const FLOW_NOT_DNAT: &str = "not-dnat";
/// A jump from a hook chain into a per-port sub-chain.
pub(crate) const FLOW_DISPATCH: &str = "dispatch";

/// Appended to the comment of a forward's DNAT/REDIRECT rules when `reset_connections` is
/// set, so a later run that removes the forward still knows to cut its TCP connections.
pub(crate) const RESET_MARKER: &str = ":reset";

/// What an owned rule's comment says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    /// The forward's `reset_connections` marker.
    pub reset: bool,
}

/// The comment of an owned rule: `<instance>:<kind>:<name>:<hash>[:reset]`.
pub(crate) fn entry_comment(instance: &str, tag: Tag, hash: u32) -> String {
    weighted_comment(instance, tag, hash, None)
}

/// [`entry_comment`] of one backend's rule of an iptables pool, `weight` put after the hash
/// (`web:fwd:api:1a2b3c4d:w2`): a rule's probability or counter says a backend's share only
/// relative to the backends after it, so `show` reads the weights from here.
pub(crate) fn weighted_comment(instance: &str, tag: Tag, hash: u32, weight: Option<u16>) -> String {
    let marker = if tag.reset { RESET_MARKER } else { "" };
    let (kind, name) = (tag.kind, tag.name);
    match weight {
        Some(w) => format!("{instance}:{kind}:{name}:{hash:08x}:w{w}{marker}"),
        None => format!("{instance}:{kind}:{name}:{hash:08x}{marker}"),
    }
}

/// The weight a pool backend's rule carries in its comment (see [`weighted_comment`]).
pub(crate) fn comment_weight(comment: &str) -> Option<u16> {
    let comment = comment.strip_suffix(RESET_MARKER).unwrap_or(comment);
    comment.rsplit(':').next()?.strip_prefix('w')?.parse().ok()
}

/// How every comment of an entry's objects starts (`<instance>:<kind>:<name>:`): they sort
/// together, so an entry's objects are found by a range, not a scan.
pub(crate) fn entry_prefix(instance: &str, kind: &str, name: &str) -> String {
    format!("{instance}:{kind}:{name}:")
}

/// The comment of a jump into the instance's chain.
pub(crate) fn jump_comment(instance: &str) -> String {
    format!("{instance}:{KIND_JUMP}")
}

/// Is this the instance's jump comment?
pub(crate) fn is_jump_comment(comment: &str, instance: &str) -> bool {
    comment
        .strip_prefix(instance)
        .and_then(|rest| rest.strip_prefix(':'))
        == Some(KIND_JUMP)
}

/// Reads an owned rule's comment; None when it is not one of this instance's entries.
pub(crate) fn parse_comment<'a>(comment: &'a str, instance: &str) -> Option<Tag<'a>> {
    let (comment, reset) = match comment.strip_suffix(RESET_MARKER) {
        Some(rest) => (rest, true),
        None => (comment, false),
    };
    let mut parts = comment.split(':');
    let (inst, kind, name, _hash) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let weight = parts.next();
    let weight_ok = weight.is_none_or(|w| {
        w.strip_prefix('w')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
    });
    (inst == instance && weight_ok && parts.next().is_none()).then_some(Tag { kind, name, reset })
}

/// Does an owned rule's comment carry [`RESET_MARKER`]?
pub(crate) fn has_reset_marker(comment: &str) -> bool {
    comment.ends_with(RESET_MARKER)
}

/// The instance an iptables chain of portfwd's is named for: `PFWD-<instance>-<HOOK>[-T12]`.
/// The instance is lower case and the hook upper case, so `PFWD-web-1-PRE` is `web-1`.
pub(crate) fn instance_of_chain(chain: &str) -> Option<&str> {
    let rest = chain.strip_prefix("PFWD-")?;
    let end = rest
        .match_indices('-')
        .map(|(i, _)| i)
        .find(|&i| rest[i + 1..].starts_with(|c: char| c.is_ascii_uppercase()))?;
    Some(&rest[..end]).filter(|name| valid_instance(name))
}

/// The instance an nft table of portfwd's is named for: `portfwd-<instance>` (family inet).
pub(crate) fn instance_of_table(table: &str) -> Option<&str> {
    table
        .strip_prefix("portfwd-")
        .filter(|name| valid_instance(name))
}

/// FNV-1a: stable across runs, releases and platforms (the comments, the default route
/// protocol and policy-rule priorities must not change when portfwd is upgraded).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StableHash(u32);

impl StableHash {
    pub(crate) fn new() -> StableHash {
        StableHash(0x811c_9dc5)
    }

    pub(crate) fn bytes(mut self, bytes: &[u8]) -> StableHash {
        for b in bytes {
            self.0 ^= u32::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
        self
    }

    /// A part followed by a NUL, so `("ab", "c")` and `("a", "bc")` differ.
    pub(crate) fn part(self, bytes: &[u8]) -> StableHash {
        self.bytes(bytes).bytes(&[0])
    }

    pub(crate) fn finish(self) -> u32 {
        self.0
    }
}

impl Default for StableHash {
    fn default() -> Self {
        StableHash::new()
    }
}

/// What this instance created: addresses (`dev addr/prefix`, which the kernel cannot tag),
/// iptables tables (`ipv4 nat`) that did not exist before it, and its ip rules and routes
/// (which carry its protocol number, but 50 default numbers cannot keep every instance
/// apart). Only what is recorded is ever removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    #[serde(default)]
    pub addresses: BTreeSet<String>,
    #[serde(default)]
    pub tables: BTreeSet<String>,
    #[serde(default)]
    pub rules: BTreeSet<String>,
    #[serde(default)]
    pub routes: BTreeSet<String>,
    /// Sysctls portfwd set (route_localnet) → the value they had before, put back when no
    /// entry needs them any more.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    /// The backend holding the instance's firewall objects when it is not iptables (`nftables`);
    /// a run with another backend moves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<crate::tools::Backend>,
    /// What the last full read of the firewall proved, for skipping the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_cache: Option<ReadCache>,
}

/// The firewall held exactly the desired objects (`digest`) at nf_tables generation
/// `generation`: a full read found them there (the generation read before it), or this run
/// wrote them and the generation after its commits is the one before them plus one per
/// commit (no other writer came between). While the generation stays the same no
/// transaction has changed any table, so a run with the same desired objects can skip the
/// read (an `iptables-save` of 10,000 foreign rules costs ~0.12 s). Other software's changes
/// (iptables-nft's included) bump the generation; iptables-legacy ones do not, so legacy hosts
/// never use it (and only nf_tables reads are cached).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "ReadCacheFile")]
pub(crate) struct ReadCache {
    /// [`crate::firewall::Firewall::digest`] of the desired objects, with the backend setting
    /// and portfwd's version.
    pub digest: u32,
    #[serde(flatten)]
    pub read: FirewallRead,
    /// The params (compact JSON) that compiled to `digest`: with them a change is planned
    /// from what was last written, without reading the table, while the generation proves
    /// nothing else has written since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
}

/// [`ReadCache`] as a record file holds it, read field by field: a flattened struct is
/// buffered whole before it is read (with the params of every forward in it).
#[derive(serde::Deserialize)]
struct ReadCacheFile {
    digest: u32,
    generation: u32,
    #[serde(default)]
    warnings: Vec<String>,
    #[serde(default)]
    facts: serde_json::Value,
    #[serde(default)]
    other: Option<OtherTables>,
    #[serde(default)]
    params: Option<String>,
    #[serde(default)]
    shape: Option<u64>,
}

impl From<ReadCacheFile> for ReadCache {
    fn from(f: ReadCacheFile) -> ReadCache {
        ReadCache {
            digest: f.digest,
            read: FirewallRead {
                generation: f.generation,
                warnings: f.warnings,
                facts: f.facts,
                other: f.other,
                shape: f.shape,
            },
            params: f.params,
        }
    }
}

/// What a full nf_tables read of the firewall found besides portfwd's own objects, and at
/// which generation (read before it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FirewallRead {
    pub generation: u32,
    /// The warnings that read gave (repeated on every run that uses the cache).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The backend's facts about other software's rules (conntrack mark users, NAT rules
    /// met before portfwd's), which the checks use.
    #[serde(default)]
    pub facts: serde_json::Value,
    /// Other nftables tables' forward-hook chains and early NAT rules, when that run read
    /// them (they too change only with the generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<OtherTables>,
    /// The digest of the nftables table's netlink dump (all but elements) while it held
    /// exactly the cached objects: after another writer's commit, a dump of the same shape
    /// proves chains, rules and declarations unchanged, and only the elements are read
    /// ([`crate::firewall::Firewall::observe_dump`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<u64>,
}

/// What the warnings need of other nftables tables (see [`crate::observe::nft`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct OtherTables {
    pub forward_chains: Vec<crate::foreign::ForwardChain>,
    pub foreign_nat: Vec<crate::foreign::ForeignNat>,
}

impl Record {
    pub(crate) fn is_empty(&self) -> bool {
        self.addresses.is_empty()
            && self.tables.is_empty()
            && self.rules.is_empty()
            && self.routes.is_empty()
            && self.sysctls.is_empty()
            && self.read_cache.is_none()
            && self.backend.is_none()
    }
}

/// Does portfwd own this sysctl's value (set it, record the old one in the [`Record`], put it
/// back when no entry needs it)? route_localnet only; forwarding is never turned off again.
pub(crate) fn is_reverted_sysctl(key: &str) -> bool {
    key.starts_with("net/ipv4/conf/") && key.ends_with("/route_localnet")
}

/// How a firewall table appears in the record: `ipv4 nat`.
pub(crate) fn table_key(family: Family, table: &str) -> String {
    format!("{} {table}", family.label())
}

/// May an nf_tables table portfwd created be deleted? Only when `nft -j list table` shows
/// nothing in it but chains (no rules, sets, maps or flowtables, which iptables-save cannot
/// show and someone else may have added).
pub(crate) fn holds_only_chains(nft_listing: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(nft_listing)
        .ok()
        .and_then(|v| v.get("nftables").and_then(|n| n.as_array()).cloned())
        .is_some_and(|items| {
            items.iter().all(|item| {
                item.as_object().is_some_and(|o| {
                    o.keys()
                        .all(|k| k == "metainfo" || k == "table" || k == "chain")
                })
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_round_trip_and_other_instances_are_not_ours() {
        for reset in [false, true] {
            let tag = Tag {
                kind: KIND_FORWARD,
                name: "web.1",
                reset,
            };
            let comment = entry_comment("edge", tag, 0xdead_beef);
            assert_eq!(parse_comment(&comment, "edge"), Some(tag));
            assert_eq!(parse_comment(&comment, "edg"), None);
            assert_eq!(parse_comment(&comment, "edge-2"), None);
        }
        assert_eq!(parse_comment("edge:fwd:web", "edge"), None, "no hash");
        assert_eq!(parse_comment("edge:fwd:web:1:2", "edge"), None);
        assert!(is_jump_comment(&jump_comment("edge"), "edge"));
        assert!(!is_jump_comment(&jump_comment("edge"), "edg"));
        assert!(!is_jump_comment("edge:jump:x", "edge"));
    }

    #[test]
    fn only_a_table_of_bare_chains_may_be_dropped() {
        let bare = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},{"table":{"family":"ip","name":"nat"}},{"chain":{"family":"ip","table":"nat","name":"PREROUTING"}}]}"#;
        assert!(holds_only_chains(bare));
        let with_rule = bare.replace(
            "]}",
            r#",{"rule":{"family":"ip","table":"nat","chain":"PREROUTING"}}]}"#,
        );
        assert!(!holds_only_chains(&with_rule));
        let with_set = bare.replace("]}", r#",{"set":{"family":"ip","name":"s"}}]}"#);
        assert!(!holds_only_chains(&with_set));
        assert!(!holds_only_chains("not json"));
    }

    /// Upgrading portfwd must not rename a rule or renumber a route protocol.
    #[test]
    fn the_hash_is_fnv1a() {
        assert_eq!(StableHash::new().finish(), 0x811c_9dc5);
        assert_eq!(StableHash::new().bytes(b"a").finish(), 0xe40c_292c);
        assert_ne!(
            StableHash::new().part(b"ab").part(b"c").finish(),
            StableHash::new().part(b"a").part(b"bc").finish()
        );
    }
}
