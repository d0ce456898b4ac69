//! `portfwd list` finds the instances on this host. An instance is found by the names portfwd
//! reserves for it (the nft table `inet portfwd-<instance>`, iptables chains
//! `PFWD-<instance>-*` of either flavour and family), by its record and by its stored params,
//! so one whose record was lost, or that another backend holds, is listed all the same.

use std::collections::BTreeSet;

use crate::error::Error;
use crate::net::Family;
use crate::ownership::{instance_of_chain, instance_of_table};
use crate::record_store::recorded_instances;
use crate::system::{RealSystem, System};
use crate::tools::{IptablesTool, Read};

/// The names of every instance on this host: stored, recorded, or named in the firewall.
pub(crate) fn instances(sys: &mut RealSystem) -> Result<BTreeSet<String>, Error> {
    let mut known = Vec::new();
    for name in sys.stored_instances()? {
        if sys.stored_namespace(&name)?.1 {
            known.push(name);
        }
    }
    known.extend(recorded_instances(sys)?);
    Ok(names(sys, known))
}

/// Every instance name the host shows, sorted; `known` are those from records and stored
/// params. Reads that fail (a tool not installed) find nothing.
pub(crate) fn names(
    sys: &mut dyn System,
    known: impl IntoIterator<Item = String>,
) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = known.into_iter().collect();
    let mut reads = Vec::new();
    for family in [Family::V4, Family::V6] {
        reads.push(Read::Save(IptablesTool::Installed, family));
        reads.push(Read::LegacySave(family, IptablesTool::Installed));
        reads.push(Read::NftSave(family, "nat"));
        reads.push(Read::NftSave(family, "filter"));
    }
    if sys.has_tool("nft") {
        reads.push(Read::NftJson(vec!["list".into(), "tables".into()]));
    }
    for (read, result) in reads.iter().zip(sys.read_batch(&reads)) {
        let Ok((out, _)) = result else { continue };
        match read {
            Read::NftJson(_) => names.extend(tables(&out)),
            _ => names.extend(chains(&out)),
        }
    }
    names
}

/// Instances of the `:PFWD-<instance>-HOOK` chains an iptables-save dump declares.
fn chains(dump: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| instance_of_chain(l.split_whitespace().next()?))
        .map(str::to_string)
        .collect()
}

/// Instances of the `inet portfwd-<instance>` tables in `nft -j list tables`.
fn tables(json: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let table = item.get("table")?;
            (table["family"] == "inet").then_some(())?;
            instance_of_table(table["name"].as_str()?).map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_read_from_chain_and_table_names() {
        let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n:PFWD-web-1-PRE - [0:0]\n:PFWD-web-1-PRE-T16 - [0:0]\n:PFWD-gw-POST - [0:0]\n:PFWD-BAD - [0:0]\n:DOCKER - [0:0]\nCOMMIT\n";
        assert_eq!(chains(dump), ["web-1", "web-1", "gw"]);
        let json = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"inet","name":"portfwd-edge","handle":3}},
            {"table":{"family":"ip","name":"portfwd-notours","handle":4}},
            {"table":{"family":"inet","name":"portfwd_trace_123","handle":5}},
            {"table":{"family":"inet","name":"firewalld","handle":6}}]}"#;
        assert_eq!(tables(json), ["edge"]);
        assert!(tables("not json").is_empty());
    }
}
