//! iptables tables beside the backend in use, read in iptables' own spelling: iptables-legacy's
//! (legacy and nf_tables each filter every packet, so a drop there is not undone by an accept
//! in nf_tables), and iptables-nft's FORWARD and nat chains when the nftables backend runs (nft
//! lists iptables' matches and targets as opaque `xt` expressions: without their arguments,
//! and with nft 0.9.8 without their names).

use crate::firewall::iptables::save::{parse, tokenize, Dump};
use crate::foreign::{ForeignNat, ForwardChain};
use crate::net::Family;

/// Which iptables wrote a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavour {
    Legacy,
    Nft,
}

/// The filter FORWARD chain of `family` in `dump` as a forward-hook chain of another filter.
pub(crate) fn forward_chain(dump: &str, family: Family, flavour: Flavour) -> Option<ForwardChain> {
    forward_chain_of(&parse(dump), family, flavour)
}

fn forward_chain_of(parsed: &Dump, family: Family, flavour: Flavour) -> Option<ForwardChain> {
    let filter = parsed.table("filter")?;
    let decl = filter.chains.iter().find(|c| c.name == "FORWARD")?;
    let rules: Vec<Vec<String>> = filter
        .rules
        .iter()
        .filter(|r| r.chain == "FORWARD")
        .map(|r| tokenize(r.text).map(uncommented).unwrap_or_default())
        .collect();
    let ends_in_drop = rules
        .last()
        .is_some_and(|r| matches!(words(r).as_slice(), ["-j", "DROP"] | ["-j", "REJECT", ..]));
    // `--ctstate DNAT` accepts DNATed flows; `-m connmark --mark V/M` the marked ones.
    let accepts_dnat = rules.iter().any(|r| {
        let w = words(r);
        w.ends_with(&["-j", "ACCEPT"])
            && w.windows(2).any(|p| p == ["--ctstate", "DNAT"])
            && !w.contains(&"!")
    });
    let accepted_marks = rules
        .iter()
        .filter_map(|r| match words(r).as_slice() {
            ["-m", "connmark", "--mark", mark, "-j", "ACCEPT"] => mark_of(mark),
            _ => None,
        })
        .collect();
    Some(ForwardChain {
        family: family.nft_family().to_string(),
        table: "filter".to_string(),
        name: "FORWARD".to_string(),
        priority: 0,
        policy_drop: decl.policy == "DROP",
        ends_in_drop,
        accepts_dnat,
        accepted_marks,
        legacy: flavour == Flavour::Legacy,
        iptables_nft: flavour == Flavour::Nft,
    })
}

/// What iptables-legacy's tables of `family` do beside an nf_tables backend: their FORWARD as
/// another filter, and the DNAT and REDIRECT rules of their nat PREROUTING and OUTPUT (and the
/// chains those jump to), which take a forward's connections before portfwd's rules do. The
/// dump is parsed once for both.
pub(crate) fn legacy(
    dump: &str,
    family: Family,
    instance: &str,
) -> (Option<ForwardChain>, Vec<ForeignNat>) {
    let parsed = parse(dump);
    let tool = match family {
        Family::V4 => "iptables-legacy",
        Family::V6 => "ip6tables-legacy",
    };
    let nat = nat_of(&parsed, family, instance, tool);
    (forward_chain_of(&parsed, family, Flavour::Legacy), nat)
}

/// The DNAT and REDIRECT rules of iptables-nft's nat PREROUTING and OUTPUT of `family` (and
/// of the chains those jump to) in `dump`, placed as `iptables nat PREROUTING`.
pub(crate) fn iptables_nft_nat(dump: &str, family: Family, instance: &str) -> Vec<ForeignNat> {
    let tool = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    nat_of(&parse(dump), family, instance, tool)
}

/// The foreign DNAT and REDIRECT rules of a dump, placed under the tool that manages them.
fn nat_of(parsed: &Dump, family: Family, instance: &str, tool: &str) -> Vec<ForeignNat> {
    let mut nat = crate::firewall::iptables::observe::foreign_nat(parsed, family, instance);
    for rule in &mut nat {
        rule.place = format!("{tool} {}", rule.place);
    }
    nat
}

fn words(rule: &[String]) -> Vec<&str> {
    rule.iter().map(String::as_str).collect()
}

/// A rule's words without its `-m comment --comment TEXT` (a label, not a match).
fn uncommented(words: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i] == "-m" && words.get(i + 1).is_some_and(|w| w == "comment") {
            i += 2;
            if words.get(i).is_some_and(|w| w == "--comment") {
                i += 2;
            }
            continue;
        }
        out.push(words[i].clone());
        i += 1;
    }
    out
}

/// `0x2000/0x2000` or `0x2000` (every bit) as (value, mask).
fn mark_of(text: &str) -> Option<(u32, u32)> {
    let number = |t: &str| match t.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    };
    match text.split_once('/') {
        Some((v, m)) => Some((number(v)?, number(m)?)),
        None => Some((number(text)?, u32::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(rules: &str) -> ForwardChain {
        let dump = format!("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n{rules}COMMIT\n");
        forward_chain(&dump, Family::V4, Flavour::Nft).expect("has FORWARD")
    }

    #[test]
    fn a_connmark_accept_counts_only_for_the_bits_it_accepts() {
        let c = chain("-A FORWARD -m connmark --mark 0x2000/0x2000 -m comment --comment \"our fix\" -j ACCEPT\n");
        assert!(c.accepts_mark(0x2000));
        assert!(!c.accepts_mark(0x4000), "another bit is not accepted");
        let c = chain("-A FORWARD -m connmark --mark 0x1/0x1 -j ACCEPT\n");
        assert!(!c.accepts_mark(0x2000), "a mask without the bit");
        let c = chain("-A FORWARD -m connmark --mark 0x2000 -j ACCEPT\n");
        assert!(
            c.accepts_mark(0x2000),
            "a bare value is every bit: exactly the bit"
        );
        let c = chain("-A FORWARD -m connmark --mark 0x0/0x2000 -j ACCEPT\n");
        assert!(!c.accepts_mark(0x2000), "accepts flows without the bit");
        let c = chain("-A FORWARD -s 10.0.0.0/8 -m connmark --mark 0x2000/0x2000 -j ACCEPT\n");
        assert!(
            !c.accepts_mark(0x2000),
            "a narrower rule accepts only some flows"
        );
    }

    #[test]
    fn rhel_reject_and_a_plain_drop_end_the_chain() {
        assert!(chain("-A FORWARD -j REJECT --reject-with icmp-host-prohibited\n").ends_in_drop);
        assert!(chain("-A FORWARD -m comment --comment deny -j DROP\n").ends_in_drop);
        assert!(!chain("-A FORWARD -s 10.0.0.1/32 -j DROP\n").ends_in_drop);
        let c = chain("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j ACCEPT\n");
        assert!(!c.accepts_dnat, "a state list is not the DNAT accept alone");
        assert!(chain("-A FORWARD -m conntrack --ctstate DNAT -j ACCEPT\n").accepts_dnat);
    }
}
