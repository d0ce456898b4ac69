//! Live flows follow the change: after a successful apply, the conntrack entries the change
//! made stale are deleted, as kube-proxy, Docker and the CNI portmap plugin do.
//!
//! NAT rules act only on a connection's first packet; the entry made then keeps steering the
//! flow. A UDP client that keeps sending never lets it expire, so without this a changed `to`
//! keeps feeding the old target, a flow that began before the forward existed is never
//! forwarded, and a removed forward keeps forwarding. Which entries are stale is decided here,
//! as a pure function of the change and the listed entries; only entries whose original
//! destination is a changed forward's listen address and port (and, for a changed or removed
//! forward, whose reply comes from its old target) are touched. TCP entries are deleted only
//! for forwards with `reset_connections`: by default open connections finish on the old target.

use std::net::IpAddr;

use crate::model::{Action, Forward, Proto, Snat};
use crate::net::Family;
use crate::system::System;

/// One conntrack entry: the original tuple and the reply's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Flow {
    pub family: Family,
    pub proto: Proto,
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
    /// Where replies go: the client, or the address SNAT put in its place.
    pub reply_dst: IpAddr,
}

impl Flow {
    /// `conntrack -D` arguments naming exactly this entry (its original tuple is unique).
    pub(crate) fn delete_args(&self) -> Vec<String> {
        [
            "-D",
            "-f",
            self.family.conntrack_name(),
            "-p",
            self.proto.name(),
            "--orig-src",
            &self.orig_src.to_string(),
            "--orig-dst",
            &self.orig_dst.to_string(),
            "--orig-port-src",
            &self.orig_sport.to_string(),
            "--orig-port-dst",
            &self.orig_dport.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Not NATed: the reply comes from where the client sent.
    fn unnated(&self) -> bool {
        self.reply_src == self.orig_dst && self.reply_sport == self.orig_dport
    }
}

/// Parses `conntrack -L` lines (`udp 17 29 src=.. dst=.. sport=.. dport=.. [UNREPLIED]
/// src=.. dst=.. sport=.. dport=.. mark=0 use=1`). Lines that cannot be read are skipped:
/// an entry portfwd cannot read is never one it deletes.
pub(crate) fn parse(text: &str, family: Family) -> Vec<Flow> {
    text.lines().filter_map(|l| parse_line(l, family)).collect()
}

fn parse_line(line: &str, family: Family) -> Option<Flow> {
    let mut words = line.split_whitespace();
    let proto = match words.next()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let (mut src, mut dst, mut sport, mut dport) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "src" => src.push(value.parse::<IpAddr>().ok()?),
            "dst" => dst.push(value.parse::<IpAddr>().ok()?),
            "sport" => sport.push(value.parse::<u16>().ok()?),
            "dport" => dport.push(value.parse::<u16>().ok()?),
            _ => {}
        }
    }
    if src.len() != 2 || dst.len() != 2 || sport.len() != 2 || dport.len() != 2 {
        return None;
    }
    if Family::of(&src[0]) != family {
        return None;
    }
    Some(Flow {
        family,
        proto,
        orig_src: src[0],
        orig_dst: dst[0],
        orig_sport: sport[0],
        orig_dport: dport[0],
        reply_src: src[1],
        reply_sport: sport[1],
        reply_dst: dst[1],
    })
}

/// A forward that the run added (`old` None), changed, or removed (`new` None).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardChange<'a> {
    pub old: Option<&'a Forward>,
    pub new: Option<&'a Forward>,
}

impl ForwardChange<'_> {
    /// Are TCP entries of this change to be deleted? The new setting decides for a change,
    /// the old one for a removal.
    fn resets_tcp(&self) -> bool {
        self.new.or(self.old).is_some_and(|f| f.reset_connections)
    }

    /// The (family, protocol) tables worth listing for this change.
    pub(crate) fn tables(&self) -> Vec<(Family, Proto)> {
        let mut out = Vec::new();
        for f in self.old.iter().chain(self.new.iter()) {
            for &p in &f.protos {
                if (p == Proto::Udp || self.resets_tcp()) && !out.contains(&(f.family, p)) {
                    out.push((f.family, p));
                }
            }
        }
        out
    }
}

/// Is `flow` addressed to `f`'s listen side? `local` are this host's addresses (a forward
/// without `listen_address` takes only traffic to them, never to loopback).
fn addressed_to(f: &Forward, flow: &Flow, local: &[IpAddr]) -> bool {
    f.family == flow.family
        && f.protos.contains(&flow.proto)
        && f.listen_port.contains(flow.orig_dport)
        && match f.listen_address {
            Some(a) => a == flow.orig_dst,
            None => !flow.orig_dst.is_loopback() && local.contains(&flow.orig_dst),
        }
        && (f.sources.is_empty() || f.sources.iter().any(|s| s.contains(&flow.orig_src)))
}

/// Was `flow` translated by `f` (its reply comes from `f`'s target, and goes to the client
/// or to `f`'s SNAT address as `f` says)?
fn nated_by(f: &Forward, flow: &Flow, local: &[IpAddr]) -> bool {
    if !addressed_to(f, flow, local) {
        return false;
    }
    if let Action::Redirect { port } = f.action {
        return port == flow.reply_sport && local.contains(&flow.reply_src);
    }
    // One backend, or any of a pool's (a drained one's flows are still its own).
    let from_backend = f.action.backends().iter().any(|&(addr, port)| {
        addr == flow.reply_src
            && match port {
                Some(p) => p == flow.reply_sport,
                None => flow.reply_sport == flow.orig_dport,
            }
    });
    from_backend
        && match f.action.snat() {
            Some(Snat::None) => flow.reply_dst == flow.orig_src,
            // A connection of this host's own may keep its address.
            Some(Snat::Masquerade) => {
                flow.reply_dst != flow.orig_src || local.contains(&flow.orig_src)
            }
            Some(Snat::To(ip)) => flow.reply_dst == ip,
            None => false,
        }
}

/// The entries the changes made stale:
/// - flows that reach a new or changed forward's listen side un-NATed (they began before the
///   forward existed): UDP only, an un-NATed TCP connection is a local service's;
/// - flows translated by a changed or removed forward's old rules that its new rules would not
///   translate the same way: UDP, and TCP when `reset_connections` is set.
pub(crate) fn stale(changes: &[ForwardChange], flows: &[Flow], local: &[IpAddr]) -> Vec<Flow> {
    flows
        .iter()
        .filter(|flow| {
            changes.iter().any(|c| {
                let tcp_ok = flow.proto == Proto::Udp || c.resets_tcp();
                let unforwarded = flow.proto == Proto::Udp
                    && flow.unnated()
                    && c.new.is_some_and(|n| addressed_to(n, flow, local));
                let misrouted = tcp_ok
                    && c.old.is_some_and(|o| nated_by(o, flow, local))
                    && !c.new.is_some_and(|n| nated_by(n, flow, local));
                unforwarded || misrouted
            })
        })
        .cloned()
        .collect()
}

/// What [`reset`] did, for the report.
#[derive(Debug, Default)]
pub(crate) struct Reset {
    /// `conntrack -D ...` of every entry deleted.
    pub commands: Vec<String>,
    pub udp: usize,
    pub tcp: usize,
    pub warnings: Vec<String>,
}

impl Reset {
    /// `conntrack: 3 udp flows reset, 1 tcp connection reset`, or None when nothing was.
    pub(crate) fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.udp > 0 {
            parts.push(format!(
                "{} udp flow{} reset",
                self.udp,
                if self.udp == 1 { "" } else { "s" }
            ));
        }
        if self.tcp > 0 {
            parts.push(format!(
                "{} tcp connection{} reset",
                self.tcp,
                if self.tcp == 1 { "" } else { "s" }
            ));
        }
        (!parts.is_empty()).then(|| format!("conntrack: {}", parts.join(", ")))
    }
}

/// Lists the tables the changes need and deletes their stale entries, one by one. Runs after
/// the rules are committed; every failure is a warning, never a rollback (the rules are right,
/// only old flows linger until they expire).
pub(crate) fn reset(changes: &[ForwardChange], local: &[IpAddr], sys: &mut dyn System) -> Reset {
    let mut out = Reset::default();
    let mut tables: Vec<(Family, Proto)> = Vec::new();
    for c in changes {
        for t in c.tables() {
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
    }
    for (family, proto) in tables {
        let listing = match sys.conntrack_list(family, proto) {
            Ok(Some(text)) => text,
            Ok(None) => {
                out.warnings.push("conntrack is not installed: flows that began under the old rules keep their old path until they expire (install conntrack to have them follow the change)".to_string());
                return out;
            }
            Err(e) => {
                out.warnings
                    .push(format!("listing conntrack entries failed: {e}"));
                continue;
            }
        };
        for flow in stale(changes, &parse(&listing, family), local) {
            let args = flow.delete_args();
            match sys.conntrack_delete(&args) {
                Ok(true) => {
                    out.commands.push(format!("conntrack {}", args.join(" ")));
                    match flow.proto {
                        Proto::Udp => out.udp += 1,
                        Proto::Tcp => out.tcp += 1,
                    }
                }
                Ok(false) => {}
                Err(e) => out
                    .warnings
                    .push(format!("deleting a stale conntrack entry failed: {e}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    // Captured from conntrack-tools 1.4.7 on kernel 6.18.
    const LISTING: &str = "\
udp      17 29 src=10.0.1.2 dst=10.0.1.1 sport=40001 dport=5353 [UNREPLIED] src=10.0.2.2 dst=10.0.2.1 sport=1234 dport=40001 mark=0 use=1
udp      17 29 src=10.0.1.2 dst=10.0.1.1 sport=40002 dport=5353 [UNREPLIED] src=10.0.1.1 dst=10.0.1.2 sport=5353 dport=40002 mark=0 use=1
udp      17 29 src=10.0.1.2 dst=10.0.1.1 sport=40003 dport=6000 src=10.0.2.2 dst=10.0.2.1 sport=6000 dport=40003 mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.1.1 sport=50000 dport=5353 src=10.0.2.2 dst=10.0.2.1 sport=1234 dport=50000 [ASSURED] mark=0 use=1
udp      17 29 src=127.0.0.1 dst=127.0.0.1 sport=40004 dport=5353 [UNREPLIED] src=127.0.0.1 dst=127.0.0.1 sport=5353 dport=40004 mark=0 use=1
udp      17 29 src=10.0.1.9 dst=10.0.1.1 sport=40005 dport=5353 [UNREPLIED] src=10.0.9.9 dst=10.0.2.1 sport=1234 dport=40005 mark=0 use=1
garbage line
";

    fn forward(json: &str) -> Forward {
        let params = format!(r#"{{"forwards":[{json}]}}"#);
        Config::from_json(&params).unwrap().0.forwards.remove(0)
    }

    fn local() -> Vec<IpAddr> {
        ["10.0.1.1", "10.0.2.1", "127.0.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    fn ports(flows: &[Flow]) -> Vec<u16> {
        flows.iter().map(|f| f.orig_sport).collect()
    }

    #[test]
    fn parses_orig_and_reply_and_skips_what_it_cannot_read() {
        let flows = parse(LISTING, Family::V4);
        assert_eq!(flows.len(), 6);
        assert_eq!(flows[3].proto, Proto::Tcp);
        assert_eq!(flows[0].reply_src.to_string(), "10.0.2.2");
        assert_eq!(flows[0].reply_sport, 1234);
        assert!(flows[1].unnated());
        assert!(parse(LISTING, Family::V6).is_empty());
        assert_eq!(
            flows[0].delete_args().join(" "),
            "-D -f ipv4 -p udp --orig-src 10.0.1.2 --orig-dst 10.0.1.1 --orig-port-src 40001 --orig-port-dst 5353"
        );
    }

    #[test]
    fn a_new_forward_takes_over_udp_flows_that_reached_the_port_before() {
        let new = forward(r#"{"name":"d","proto":"udp","listen_port":5353,"to":"10.0.2.2:1234"}"#);
        let change = ForwardChange {
            old: None,
            new: Some(&new),
        };
        let stale = stale(&[change], &parse(LISTING, Family::V4), &local());
        // 40002: un-NATed to our port. Not 40001 (already NATed, by someone: not ours to
        // judge), not the loopback flow, not the TCP connection.
        assert_eq!(ports(&stale), vec![40002]);
    }

    #[test]
    fn a_changed_target_resets_the_udp_flows_of_the_old_one_only() {
        let old = forward(r#"{"name":"d","proto":"both","listen_port":5353,"to":"10.0.2.2:1234"}"#);
        let new = forward(r#"{"name":"d","proto":"both","listen_port":5353,"to":"10.0.2.3:1234"}"#);
        let change = ForwardChange {
            old: Some(&old),
            new: Some(&new),
        };
        let flows = parse(LISTING, Family::V4);
        assert_eq!(
            ports(&stale(&[change], &flows, &local())),
            vec![40001, 40002]
        );
        let new_reset = Forward {
            reset_connections: true,
            ..new.clone()
        };
        let change = ForwardChange {
            old: Some(&old),
            new: Some(&new_reset),
        };
        assert_eq!(
            ports(&stale(&[change], &flows, &local())),
            vec![40001, 40002, 50000],
            "reset_connections also cuts the TCP connection"
        );
        assert_eq!(
            change.tables(),
            vec![(Family::V4, Proto::Tcp), (Family::V4, Proto::Udp)]
        );
    }

    /// The flow 40001 is masqueraded (its replies go to the proxy's 10.0.2.1): once the
    /// forward says `snat: none` it would not be, so it is reset; the other way round too.
    #[test]
    fn a_changed_snat_resets_the_flows_translated_the_old_way() {
        let masq = forward(r#"{"name":"d","proto":"udp","listen_port":5353,"to":"10.0.2.2:1234"}"#);
        let none = forward(
            r#"{"name":"d","proto":"udp","listen_port":5353,"to":"10.0.2.2:1234","snat":"none"}"#,
        );
        let flows = parse(LISTING, Family::V4);
        let change = ForwardChange {
            old: Some(&masq),
            new: Some(&none),
        };
        assert_eq!(
            ports(&stale(&[change], &flows, &local())),
            vec![40001, 40002]
        );
        let kept = ForwardChange {
            old: Some(&masq),
            new: Some(&masq),
        };
        assert_eq!(ports(&stale(&[kept], &flows, &local())), vec![40002]);
        let unmasqueraded = "udp      17 29 src=10.0.1.2 dst=10.0.1.1 sport=40009 dport=5353 src=10.0.2.2 dst=10.0.1.2 sport=1234 dport=40009 mark=0 use=1\n";
        let back = ForwardChange {
            old: Some(&none),
            new: Some(&masq),
        };
        let flows = parse(unmasqueraded, Family::V4);
        assert_eq!(ports(&stale(&[back], &flows, &local())), vec![40009]);
    }

    #[test]
    fn an_unchanged_translation_is_kept() {
        // Only the sources changed: flows already going to the same target stay.
        let old = forward(r#"{"name":"d","proto":"udp","listen_port":5353,"to":"10.0.2.2:1234"}"#);
        let new = forward(
            r#"{"name":"d","proto":"udp","listen_port":5353,"to":"10.0.2.2:1234","sources":["10.0.1.0/24"]}"#,
        );
        let change = ForwardChange {
            old: Some(&old),
            new: Some(&new),
        };
        assert_eq!(
            ports(&stale(&[change], &parse(LISTING, Family::V4), &local())),
            vec![40002]
        );
    }

    #[test]
    fn a_removed_forward_resets_only_its_own_flows() {
        let old = forward(
            r#"{"name":"d","proto":"both","listen_port":5353,"to":"10.0.2.2:1234","reset_connections":true}"#,
        );
        let change = ForwardChange {
            old: Some(&old),
            new: None,
        };
        // 40005 went to another target (10.0.9.9): not this forward's flow.
        assert_eq!(
            ports(&stale(&[change], &parse(LISTING, Family::V4), &local())),
            vec![40001, 50000]
        );
        let keep_tcp = Forward {
            reset_connections: false,
            ..old.clone()
        };
        let change = ForwardChange {
            old: Some(&keep_tcp),
            new: None,
        };
        assert_eq!(
            ports(&stale(&[change], &parse(LISTING, Family::V4), &local())),
            vec![40001]
        );
        assert_eq!(change.tables(), vec![(Family::V4, Proto::Udp)]);
    }

    #[test]
    fn redirect_flows_are_recognised_by_the_local_reply() {
        let old =
            forward(r#"{"name":"r","proto":"udp","listen_port":6000,"redirect_to_port":6000}"#);
        let change = ForwardChange {
            old: Some(&old),
            new: None,
        };
        // 40003's reply comes from 10.0.2.2, not a local address: not a REDIRECT of ours.
        assert!(stale(&[change], &parse(LISTING, Family::V4), &local()).is_empty());
        let flow = "udp 17 29 src=10.0.1.2 dst=10.0.1.1 sport=40009 dport=6000 src=10.0.1.1 dst=10.0.1.2 sport=6000 dport=40009 mark=0 use=1";
        assert_eq!(
            ports(&stale(&[change], &parse(flow, Family::V4), &local())),
            vec![40009]
        );
    }
}
