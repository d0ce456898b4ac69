//! A stateful fake host for unit tests of the engine: it holds iptables tables as dumps and
//! applies restore payloads to them, applies `ip -batch` scripts to its addresses, rules and
//! routes, keeps sysctls, the record and the stored params, so the engine can run against it
//! again and again. Every call is logged; a failure can be injected at the k-th write or at a
//! call starting with a given text. The end-to-end tests in `tests/` use the real host.

mod iproute;
pub(crate) mod nft;
mod tables;

use std::collections::BTreeMap;

use crate::firewall::iptables::rules::OwnedRules;
use crate::model::Proto;
use crate::net::Family;
use crate::ownership::Record;
use crate::record_store::Records;
use crate::system::{System, SystemError};
use crate::tools::IptablesTool;
use iproute::IpState;
use tables::Tables;

/// Everything the fake host holds: two hosts are the same when these are equal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostState {
    pub tables: BTreeMap<Family, Tables>,
    /// iptables-legacy's tables (beside the nf_tables ones above).
    pub legacy: BTreeMap<Family, Tables>,
    /// nftables' `inet` tables (the nftables backend's).
    pub nft: nft::NftState,
    pub ip: IpState,
    pub sysctls: BTreeMap<String, String>,
    pub record: Record,
    pub stored: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct FakeHost {
    pub state: HostState,
    /// Extra stderr of `iptables-save` per family (the legacy-tables warning).
    pub save_stderr: BTreeMap<Family, String>,
    /// `conntrack -L` output per (family, protocol); a missing key is an empty table.
    pub flows: BTreeMap<(Family, Proto), String>,
    /// Every call, e.g. `restore ipv4 *nat | ...`, `sysctl net/ipv4/ip_forward=1`.
    pub calls: Vec<String>,
    /// A call starting with this fails.
    pub fail: Option<String>,
    /// The k-th write call (1-based) fails; an `ip -batch` applies its first line first.
    pub fail_at: Option<usize>,
    /// The nf_tables generation, bumped by every restore and table drop (None: not reported).
    pub generation: Option<u32>,
    /// `nft -j` output by its arguments (`list chains`); a missing key answers nothing.
    pub nft: BTreeMap<String, String>,
    /// Write calls so far.
    pub writes: usize,
    /// Other instances' records in this namespace.
    pub other_records: Vec<Record>,
}

const READS: [&str; 6] = [
    "save ",
    "read-sysctl ",
    "ip-json ",
    "read-",
    "conntrack-list ",
    "list-table ",
];

impl FakeHost {
    /// A host whose forwarding sysctls exist and are off, with nf_tables (a generation).
    pub(crate) fn new() -> FakeHost {
        let mut host = FakeHost {
            generation: Some(1),
            ..FakeHost::default()
        };
        for family in [Family::V4, Family::V6] {
            host.state
                .sysctls
                .insert(family.forwarding_sysctl().to_string(), "0".to_string());
        }
        host
    }

    /// The calls that would change the host.
    pub(crate) fn writes(&self) -> Vec<&String> {
        self.calls
            .iter()
            .filter(|c| !READS.iter().any(|r| c.starts_with(r)))
            .collect()
    }

    /// Replaces a family's tables with a dump.
    pub(crate) fn set_dump(&mut self, family: Family, dump: &str) {
        self.state.tables.insert(family, Tables::parse(dump));
    }

    /// A family's tables as `iptables-save` prints them (empty when there are none).
    pub(crate) fn dump(&self, family: Family) -> String {
        self.state
            .tables
            .get(&family)
            .filter(|t| !t.0.is_empty())
            .map(Tables::render)
            .unwrap_or_default()
    }

    /// A family's iptables-legacy tables as `iptables-legacy-save` prints them.
    pub(crate) fn legacy_dump(&self, family: Family) -> String {
        self.state
            .legacy
            .get(&family)
            .filter(|t| !t.0.is_empty())
            .map(|t| t.render().replacen(" (nf_tables)", " (legacy)", 1))
            .unwrap_or_default()
    }

    /// A committed nftables transaction bumps the generation.
    fn bump(&mut self, committed: bool) {
        if let (true, Some(g)) = (committed, self.generation.as_mut()) {
            *g += 1;
        }
    }

    /// A family without tables is no entry, so hosts compare equal however they got there.
    fn tidy(&mut self) {
        self.state.tables.retain(|_, t| !t.0.is_empty());
        self.state.legacy.retain(|_, t| !t.0.is_empty());
    }

    /// Logs a call; Err when the injected failure hits it.
    fn call(&mut self, text: String) -> Result<(), SystemError> {
        let write = !READS.iter().any(|r| text.starts_with(r));
        if write {
            self.writes += 1;
        }
        let failing = self
            .fail
            .as_ref()
            .is_some_and(|f| text.starts_with(f.as_str()))
            || (write && self.fail_at == Some(self.writes));
        self.calls.push(text.clone());
        if failing {
            return Err(refused(format!("injected: {text}")));
        }
        Ok(())
    }
}

fn refused(stderr: String) -> SystemError {
    SystemError::Failed {
        tool: "fake".into(),
        status: "exit status: 1".into(),
        stderr,
    }
}

impl System for FakeHost {
    fn save(
        &mut self,
        tool: IptablesTool,
        family: Family,
    ) -> Result<(String, String), SystemError> {
        if tool == IptablesTool::Legacy {
            self.call(format!("save legacy {}", family.label()))?;
            return Ok((self.legacy_dump(family), String::new()));
        }
        self.call(format!("save {}", family.label()))?;
        let stderr = self.save_stderr.get(&family).cloned().unwrap_or_default();
        Ok((self.dump(family), stderr))
    }

    fn listening_sockets(&mut self) -> Result<String, SystemError> {
        self.call("read-sockets".into())?;
        Ok(String::new())
    }

    fn connect(&mut self, target: std::net::SocketAddr) -> Result<(), SystemError> {
        self.call(format!("read-connect {target}"))
    }

    fn legacy_save(&mut self, family: Family, _: IptablesTool) -> Result<String, SystemError> {
        self.call(format!("read-legacy {}", family.label()))?;
        Ok(String::new())
    }

    fn nft_flagged_tables(&mut self) -> Result<Vec<(String, String)>, SystemError> {
        self.call("read-nft-flags".into())?;
        Ok(self
            .state
            .nft
            .tables
            .iter()
            .filter(|(_, t)| t.dormant)
            .map(|(name, _)| ("inet".to_string(), name.clone()))
            .collect())
    }

    fn nft_save(&mut self, family: Family, table: &'static str) -> Result<String, SystemError> {
        self.call(format!("read-nft-save {} {table}", family.label()))?;
        Ok(String::new())
    }

    /// What a test put under the arguments in [`FakeHost::nft`], else the fake's own tables.
    fn nft_json(&mut self, args: &[String]) -> Result<String, SystemError> {
        let key = args.join(" ");
        self.call(format!("read-nft {key}"))?;
        if let Some(preset) = self.nft.get(&key) {
            return Ok(preset.clone());
        }
        Ok(match key.as_str() {
            "list chains" => self.state.nft.list_chains(),
            _ => String::new(),
        })
    }

    fn nft_table(&mut self, name: &str) -> Result<String, SystemError> {
        let key = format!("list table inet {name}");
        self.call(format!("read-nft {key}"))?;
        if let Some(preset) = self.nft.get(&key) {
            return Ok(preset.clone());
        }
        Ok(self.state.nft.list_table(name))
    }

    /// The fake has no netlink: the table is always listed.
    fn nft_dump(
        &mut self,
        _name: &str,
        _elements_if: Option<u64>,
    ) -> Result<Option<crate::tools::NftDump>, SystemError> {
        Ok(None)
    }

    fn nft_apply(&mut self, script: &str) -> Result<(), SystemError> {
        self.call(format!("nft -f {}", script.replace('\n', " | ")))?;
        let result = self.state.nft.apply(script).map_err(refused);
        self.bump(result.is_ok());
        result
    }

    fn has_tool(&mut self, _name: &str) -> bool {
        true
    }

    fn nft_generation(&mut self) -> Result<Option<u32>, SystemError> {
        self.call("read-gen".into())?;
        Ok(self.generation)
    }

    fn save_tool(&mut self, tool: IptablesTool, family: Family) -> Result<String, SystemError> {
        self.call(format!("read-tool {}", family.label()))?;
        Ok(match tool {
            IptablesTool::Legacy => "/usr/sbin/xtables-legacy-multi",
            _ => "/usr/sbin/xtables-nft-multi",
        }
        .to_string())
    }

    fn restore(
        &mut self,
        tool: IptablesTool,
        family: Family,
        payload: &str,
    ) -> Result<(), SystemError> {
        let legacy = tool == IptablesTool::Legacy;
        self.call(format!(
            "restore {}{} {}",
            if legacy { "legacy " } else { "" },
            family.label(),
            payload.replace('\n', " | ")
        ))?;
        let flavour = if legacy {
            &mut self.state.legacy
        } else {
            &mut self.state.tables
        };
        let result = flavour
            .entry(family)
            .or_default()
            .restore(payload)
            .map_err(refused);
        self.tidy();
        // iptables-legacy changes never move the nf_tables generation.
        self.bump(result.is_ok() && !legacy);
        result
    }

    fn read_sysctl(&mut self, key: &str) -> Result<Option<String>, SystemError> {
        self.call(format!("read-sysctl {key}"))?;
        Ok(self.state.sysctls.get(key).cloned())
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> Result<(), SystemError> {
        self.call(format!("sysctl {key}={value}"))?;
        match self.state.sysctls.get_mut(key) {
            Some(v) => {
                *v = value.to_string();
                Ok(())
            }
            None => Err(refused(format!("cannot stat /proc/sys/{key}"))),
        }
    }

    fn ip_json(&mut self, args: &[&str]) -> Result<String, SystemError> {
        self.call(format!("ip-json {}", args.join(" ")))?;
        Ok(self.state.ip.json(args))
    }

    fn ip_batch(&mut self, family: Family, script: &str) -> Result<(), SystemError> {
        let flag = family.ip_flag();
        let injected = self.call(format!(
            "ip-batch {} {}",
            family.label(),
            script.replace('\n', " | ")
        ));
        if let Err(e) = injected {
            // `ip -batch` stops half way: the first line went through.
            let first = script.lines().next().unwrap_or_default();
            let _ = self.state.ip.batch(flag, first);
            return Err(e);
        }
        self.state.ip.batch(flag, script).map_err(refused)
    }

    fn list_nft_table(&mut self, family: Family, table: &str) -> Result<String, SystemError> {
        self.call(format!("list-table {} {table}", family.label()))?;
        let chains = self
            .state
            .tables
            .get(&family)
            .and_then(|t| t.0.get(table))
            .ok_or_else(|| refused(format!("No such file or directory: table {table}")))?;
        let nft = family.nft_family();
        let mut items = vec![
            serde_json::json!({"metainfo": {"version": "1.0.6"}}),
            serde_json::json!({"table": {"family": nft, "name": table}}),
        ];
        for c in chains {
            items.push(
                serde_json::json!({"chain": {"family": nft, "table": table, "name": c.name}}),
            );
            for _ in &c.rules {
                items.push(
                    serde_json::json!({"rule": {"family": nft, "table": table, "chain": c.name}}),
                );
            }
        }
        Ok(serde_json::json!({ "nftables": items }).to_string())
    }

    fn delete_table(&mut self, family: Family, table: &str) -> Result<(), SystemError> {
        self.call(format!("delete-table {} {table}", family.label()))?;
        let tables = self.state.tables.entry(family).or_default();
        let result = tables
            .0
            .remove(table)
            .map(drop)
            .ok_or_else(|| refused(format!("No such file or directory: table {table}")));
        self.tidy();
        self.bump(result.is_ok());
        result
    }

    fn read_stored(&mut self, _instance: &str) -> Result<Option<String>, SystemError> {
        self.call("read-stored".into())?;
        Ok(self.state.stored.clone())
    }

    fn write_stored(&mut self, _instance: &str, params: Option<&str>) -> Result<(), SystemError> {
        self.call(format!("write-stored {}", params.is_some()))?;
        self.state.stored = params.map(str::to_string);
        Ok(())
    }

    fn conntrack_list(
        &mut self,
        family: Family,
        proto: Proto,
    ) -> Result<Option<String>, SystemError> {
        self.call(format!(
            "conntrack-list {} {}",
            family.label(),
            proto.name()
        ))?;
        Ok(Some(
            self.flows
                .get(&(family, proto))
                .cloned()
                .unwrap_or_default(),
        ))
    }

    fn conntrack_delete(&mut self, args: &[String]) -> Result<bool, SystemError> {
        self.call(format!("conntrack {}", args.join(" ")))?;
        Ok(true)
    }
}

impl Records for FakeHost {
    fn read_record(&mut self, _instance: &str) -> Result<(Record, Option<String>), SystemError> {
        self.call("read-record".into())?;
        Ok((self.state.record.clone(), None))
    }

    fn write_record(&mut self, _instance: &str, record: &Record) -> Result<(), SystemError> {
        self.call(format!("write-record {record:?}"))?;
        self.state.record = record.clone();
        Ok(())
    }

    fn other_records(&mut self, _instance: &str) -> Result<Vec<Record>, SystemError> {
        self.call("read-other-records".into())?;
        Ok(self.other_records.clone())
    }
}

/// `n` plain forwards `f0`.. of instance `gw` (nftables backend), TCP and UDP on ports
/// 10000.., all to 10.0.2.2:80: map elements by the hundred for tests of size.
pub(crate) fn plain_forwards(n: usize) -> crate::model::Config {
    let forwards: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"name": format!("f{i}"), "proto": "both", "listen_port": 10000 + i, "to": "10.0.2.2:80"}))
        .collect();
    let params = serde_json::json!({"instance": "gw", "backend": "nftables", "forwards": forwards});
    let (config, _, _) =
        crate::model::Config::from_json(&params.to_string()).expect("valid params");
    config
}

/// The desired state of params JSON, compiled for the iptables backend.
pub(crate) fn compiled(json: &str) -> crate::compile::Desired {
    let (config, _, _) = crate::model::Config::from_json(json).expect("valid params");
    crate::compile::compile(&config, &crate::firewall::iptables::Iptables::default())
}

/// What `iptables-save` prints once `rules` are in place (policies ACCEPT, jumps first).
pub(crate) fn dump_of(rules: &OwnedRules, instance: &str, family: Family) -> String {
    use crate::firewall::iptables::rules::{Hook, Table};
    let mut out =
        "# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 21 23:10:00 2026\n".to_string();
    for table in [Table::Filter, Table::Nat] {
        let hooks: Vec<Hook> = Hook::ALL
            .into_iter()
            .filter(|h| h.table() == table && rules.chains.contains_key(&(family, *h)))
            .collect();
        if hooks.is_empty() {
            continue;
        }
        out.push_str(&format!("*{}\n", table.name()));
        let builtins: &[&str] = match table {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        };
        for b in builtins {
            out.push_str(&format!(":{b} ACCEPT [0:0]\n"));
        }
        for h in &hooks {
            out.push_str(&format!(":{} - [0:0]\n", h.chain(instance)));
            for sub in rules.chains[&(family, *h)].subchains.keys() {
                out.push_str(&format!(":{sub} - [0:0]\n"));
            }
        }
        for h in &hooks {
            for jump in &rules.chains[&(family, *h)].jumps {
                out.push_str(&format!("-A {} {}\n", h.builtin(), jump.rule.render()));
            }
        }
        for h in &hooks {
            let chain = &rules.chains[&(family, *h)];
            for rule in &chain.rules {
                out.push_str(&format!("-A {} {}\n", h.chain(instance), rule.render()));
            }
            for (sub, sub_rules) in &chain.subchains {
                for rule in sub_rules.iter() {
                    out.push_str(&format!("-A {sub} {}\n", rule.render()));
                }
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod properties;
