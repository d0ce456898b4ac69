//! The seam to a packet-filter backend: everything that depends on how rules are stored
//! (the iptables and the nftables modules) sits behind [`Firewall`].
//!
//! The engine stays backend-neutral: it asks a backend to compile a config into its own
//! desired objects, to name the reads it needs and parse them, to plan the edit as rendered
//! [`Transaction`]s, and to read entries back as params. Addresses, policy routes, sysctls,
//! the record and the step order belong to the engine, not to a backend.
//!
//! A backend depends only on the vocabulary below it (`net`, `tools`, `model`, `ownership`,
//! `findings`, `foreign`): it names reads and renders transactions, and never runs anything.
//! To add one: a module beside [`iptables`] implementing [`Firewall`], a [`Read`] and a
//! [`crate::plan::Step`] kind for its tool when it needs new ones, and a branch in
//! [`crate::converge::run`] that picks it.

pub(crate) mod iptables;
pub(crate) mod migrate;
pub(crate) mod nftables;

use std::fmt::Debug;

use crate::foreign::ForeignNat;
use crate::model::{Config, ForwardParams, MasqueradeParams};
use crate::net::Family;
use crate::ownership::{FirewallRead, Record};
use crate::tools::{Backend, Flavour, IptablesTool, Read};

/// One packet-filter backend. A backend is a small value (a unit struct for iptables), so the
/// engine's state types can derive their traits.
pub(crate) trait Firewall:
    Send + Sync + 'static + Default + Clone + Debug + PartialEq
{
    /// The objects the backend wants on the host for a config.
    type Desired: Clone + Debug + Default + PartialEq + Send + 'static;
    /// What the backend found of an instance on the host.
    type Observed: Clone + Debug + Default + Send + 'static;

    /// The backend holding the instance, as the record keeps it (`iptables-nft`,
    /// `iptables-legacy`, `nftables`; `iptables` for the tools as installed, unresolved).
    fn name(&self) -> Backend;

    /// Does a desired state hold any object (else the instance leaves this backend)?
    fn holds_anything(&self, want: &Self::Desired) -> bool;

    /// The backend that holds the objects of `state` (a snapshot), if any does.
    fn held_by(&self, state: &Self::Desired) -> Option<Backend> {
        self.holds_anything(state).then(|| self.name())
    }

    /// Compiles the forwards and masquerade entries (a pure function of the config).
    fn compile(&self, config: &Config) -> Self::Desired;

    /// What `config` compiles to, given `base`: what a config differing from it only in the
    /// forwards named `changed` (added, removed or edited) compiled to. A backend may take
    /// the other forwards' objects from `base`; the result must be [`Firewall::compile`]'s.
    fn recompile(
        &self,
        base: &Self::Desired,
        config: &Config,
        changed: &std::collections::BTreeSet<String>,
    ) -> Self::Desired {
        let _ = (base, changed);
        self.compile(config)
    }

    /// The reads the backend needs; they run in one batch with the engine's own.
    fn reads(&self) -> Vec<Read>;

    /// Parses the outputs of [`Firewall::reads`] (stdout, stderr), in the same order.
    fn observe(
        &self,
        instance: &str,
        outputs: Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) -> Self::Observed;

    /// A stable digest of the desired objects (None when there are none): a cached read that
    /// found objects of the same digest stands for a new read while nothing changed.
    fn digest(&self, want: &Self::Desired) -> Option<u32>;

    /// What a read would find when the last full read found exactly `want` and nothing has
    /// changed since (see [`crate::ownership::ReadCache`]).
    fn assume(&self, want: &Self::Desired, read: &FirewallRead) -> Self::Observed;

    /// Can a change be planned from an assumed state ([`Firewall::assume`] of what was last
    /// written) at all? Where every change needs a read anyway, the run does not try.
    fn plans_from_record(&self) -> bool {
        false
    }

    /// Did the read find out what the backend holds? A read that did not (a listing nft could
    /// not print) is never kept as a read cache.
    fn readable(&self, _observed: &Self::Observed) -> bool {
        true
    }

    /// The reads a run still needs when the read cache stands for this backend's own (a
    /// backend it may be moving from, which the cache says nothing about).
    fn cache_reads(&self) -> Vec<Read> {
        Vec::new()
    }

    /// [`Firewall::assume`], with what [`Firewall::cache_reads`] read (stdout, stderr).
    fn assume_reading(
        &self,
        _instance: &str,
        want: &Self::Desired,
        read: &FirewallRead,
        _outputs: Vec<(String, String)>,
        _warnings: &mut Vec<String>,
    ) -> Self::Observed {
        self.assume(want, read)
    }

    /// The table a netlink dump may be read in place of the listing of, when the record
    /// proves its shape (see [`crate::ownership::ReadCache::shape`]); None: always listed.
    fn dumped_table(&self) -> Option<String> {
        None
    }

    /// The table whose shape a run records after writing it (see [`Firewall::dumped_table`]):
    /// the same table, also while another backend is being emptied.
    fn shaped_table(&self) -> Option<String> {
        self.dumped_table()
    }

    /// What a listing would find, read from a dump whose shape is that of `last` (the
    /// objects last written); None when the dump does not say it plainly (then list).
    fn observe_dump(
        &self,
        _last: &Self::Desired,
        _dump: &crate::tools::NftDump,
    ) -> Option<Self::Observed> {
        None
    }

    /// The observed objects as a desired state: the rollback target and what `show` reads.
    fn snapshot(&self, observed: &Self::Observed) -> Self::Desired;

    /// The edit from `have` to `want`: rendered transactions, tables to drop, and which
    /// entries change. Tables the edit creates or drops are noted in `record`.
    fn plan(
        &self,
        instance: &str,
        want: &Self::Desired,
        have: &Self::Observed,
        record: &mut Record,
    ) -> FirewallPlan;

    /// The entries a state holds, as params (applying them compiles to the same state).
    fn decompile(&self, instance: &str, state: &Self::Desired) -> Entries;

    /// The forwards named in `names` a state holds: a change among 50,000 forwards needs
    /// only its own forwards' old selves.
    fn decompile_some(
        &self,
        instance: &str,
        state: &Self::Desired,
        names: &std::collections::HashSet<&str>,
    ) -> Entries {
        let mut entries = self.decompile(instance, state);
        entries.forwards.retain(|f| names.contains(f.name.as_str()));
        entries
    }

    /// Is this base chain (`nft -j list chains`: family, table, name) the backend's own way
    /// into the hook, where its accept does take effect?
    fn owns_hook_chain(
        &self,
        observed: &Self::Observed,
        family: &str,
        table: &str,
        chain: &str,
    ) -> bool;

    /// Pitfalls of the backend's own (`mixed_iptables_flavours`), for `portfwd doctor`.
    fn findings(&self, observed: &Self::Observed) -> Vec<crate::findings::Finding>;

    /// The backend's name for the result (`nf_tables`, `legacy`), when it could tell.
    fn flavour(&self, observed: &Self::Observed) -> Option<Flavour>;

    /// Other software's rules that read or write conntrack marks (`table chain rule`), for
    /// the `conn_mark` collision warning.
    fn mark_users<'a>(&self, observed: &'a Self::Observed) -> &'a [String];

    /// Does the backend's own forward hook drop what it does not accept for `family`
    /// (iptables: filter FORWARD with policy DROP)? Named, for the finding.
    fn forward_drop(&self, observed: &Self::Observed, family: crate::net::Family)
        -> Option<String>;

    /// Other owners' NAT rules a connection meets before portfwd's.
    fn foreign_nat<'a>(&self, observed: &'a Self::Observed) -> &'a [ForeignNat];

    /// The facts about other software a read found that the checks use (kept in the read
    /// cache, and given back to [`Firewall::assume`]).
    fn foreign_facts(&self, observed: &Self::Observed) -> serde_json::Value;
}

/// Forwards and masquerade entries read back from the firewall.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entries {
    pub forwards: Vec<ForwardParams>,
    pub masquerade: Vec<MasqueradeParams>,
    /// The `conn_mark` the rules use, when it is not the default.
    pub conn_mark: Option<serde_json::Value>,
}

/// A backend's part of the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FirewallPlan {
    /// Each one atomic on its own, in order.
    pub transactions: Vec<Transaction>,
    /// Tables portfwd created and has emptied, dropped after the transactions.
    pub drops: Vec<TableDrop>,
    pub forwards: EntryChanges,
    pub masquerade: EntryChanges,
    /// Owned objects that differ from what portfwd writes although no entry changed (edited
    /// in place, flags or policies changed, foreign objects in owned chains), each named.
    pub repaired: Vec<String>,
    /// Planned from an assumed state ([`Firewall::assume`]), the edit needs what only a read
    /// has (nftables: a base chain's rule handles): the run reads and plans again.
    pub needs_read: bool,
}

/// One atomic write to the firewall, rendered by its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transaction {
    pub tool: Tool,
    /// The table it edits (`nat`, `inet portfwd-web`), for messages.
    pub table: String,
    /// The tool's input.
    pub payload: String,
}

/// What runs a [`Transaction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    /// `iptables-restore --noflush` (or `ip6tables-restore`) of that flavour: one table of one
    /// family.
    IptablesRestore(IptablesTool, Family),
    /// `nft -f -`: one script, both families.
    Nft,
}

impl Transaction {
    /// How it is named in messages (`ipv4 nat transaction`).
    pub(crate) fn describe(&self) -> String {
        match self.tool {
            Tool::IptablesRestore(IptablesTool::Installed, family) => {
                format!("{} {} transaction", family.label(), self.table)
            }
            Tool::IptablesRestore(tool, family) => {
                format!(
                    "{} {} {} transaction",
                    tool.name(),
                    family.label(),
                    self.table
                )
            }
            Tool::Nft => format!("nft transaction on table {}", self.table),
        }
    }
}

/// An nf_tables table to delete (`nft delete table ip nat`), only if it holds nothing but
/// empty chains when the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableDrop {
    pub family: Family,
    pub table: &'static str,
}

/// Entry names by what happens to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryChanges {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
}

impl EntryChanges {
    pub fn count(&self) -> usize {
        self.added.len() + self.updated.len() + self.removed.len()
    }
}
