//! Validation tests: every bad input is refused with its field and value named.

use super::*;
use crate::net::Family;
use rstest::rstest;
use serde_json::Value;

fn err(input: &str) -> String {
    match Config::from_json(input) {
        Ok(_) => panic!("accepted: {input}"),
        Err(e) => e.to_string(),
    }
}

#[rstest]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","bogus":1}]}"#,
    "forwards[0].bogus: unknown field `bogus`"
)]
#[case(r#"{"nope":1}"#, "unknown field `nope`")]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","ignore_findings":["reply_bypass","bypass"]}]}"#,
    r#"forwards[0].ignore_findings[1]: "bypass" is not a finding about one entry; use one of backend_unreachable, "#
)]
#[case(
    r#"{"masquerade":[{"name":"m","source":"10.0.0.0/8","ignore_findings":["conn_mark_collision"]}]}"#,
    r#"masquerade[0].ignore_findings[0]: "conn_mark_collision" is not a finding about one entry"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":0,"to":"1.2.3.4"}]}"#,
    "forwards[0].listen_port: 0 is not a port (1-65535)"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":65536,"to":"1.2.3.4"}]}"#,
    "forwards[0].listen_port: 65536 is not a port"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":"9-8","to":"1.2.3.4"}]}"#,
    "is a reversed range"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"10.0.0.300:80"}]}"#,
    r#"forwards[0].to: "10.0.0.300" is not an IP address"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"db.example.com:80"}]}"#,
    "hostnames are refused"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4:0"}]}"#,
    "has an invalid port"
)]
#[case(r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4"},{"name":"a","listen_port":2,"to":"1.2.3.4"}]}"#, r#"forwards[1].name: "a" is a duplicate name"#)]
#[case(
    r#"{"forwards":[{"name":"a\nb","listen_port":1,"to":"1.2.3.4"}]}"#,
    r#"forwards[0].name: "a\nb" must match"#
)]
#[case(
    r#"{"forwards":[{"name":"a\"b","listen_port":1,"to":"1.2.3.4"}]}"#,
    r#"forwards[0].name: "a\"b" must match"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","in_interface":"eth0;reboot"}]}"#,
    r#"forwards[0].in_interface: "eth0;reboot" is not an interface name"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","in_interface":"$(id)"}]}"#,
    "is not an interface name"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","sources":["10.0.0.1/8"]}]}"#,
    "has host bits set (did you mean 10.0.0.0/8?)"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","sources":["::/0"]}]}"#,
    "cannot mix address families"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1}]}"#,
    "forwards[0]: one of `to`, `backends` or `redirect_to_port` is required"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"to":"10.0.0.1","backends":[{"to":"10.0.0.2"}]}]}"#,
    "forwards[0].backends: and `to` are exclusive"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"redirect_to_port":2,"backends":[{"to":"10.0.0.2"}]}]}"#,
    "forwards[0].backends: and `redirect_to_port` are exclusive"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"balance":"source-hash","backends":[{"to":"10.0.0.2"}]}]}"#,
    "forwards[0].balance: is \"source-hash\", which the iptables backend cannot install safely"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"10.0.0.2","persistence":30}]}"#,
    "forwards[0].persistence: applies only to a pool"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"persistence":"0","backends":[{"to":"10.0.0.2"}]}]}"#,
    "forwards[0].persistence: \"0\" is not a number of seconds (1-86400)"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"balance":"source-hash","persistence":5,"backends":[{"to":"10.0.0.2"}]}]}"#,
    "forwards[0].persistence: does not apply to `source-hash`"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"persistence":86400,"backends":[{"to":"10.0.0.2"}]}]}"#,
    "forwards[0].persistence: is not built for the nftables backend yet"
)]
#[case(
    r#"{"backend":"iptables-legacy","forwards":[{"name":"a","listen_port":1,"balance":"round-robin","backends":[{"to":"10.0.0.2","weight":999},{"to":"10.0.0.3","weight":1000}]}]}"#,
    "forwards[0].balance: is \"round-robin\" with weights that take 1000 rules with the iptables-legacy backend (at most 256)"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"backends":[{"to":"10.0.0.2","weight":0},{"to":"10.0.0.3","weight":"0"}]}]}"#,
    "forwards[0].backends: has every weight 0"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"backends":[{"to":"10.0.0.2","weight":1001}]}]}"#,
    "forwards[0].backends[0].weight: 1001 is not a weight (0-1000; 0 drains the backend)"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"backends":[{"to":"10.0.0.2:80"},{"to":"10.0.0.3"}]}]}"#,
    r#"forwards[0].backends[1].to: "10.0.0.3" and backends[0].to differ in giving a port"#
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"backends":[{"to":"10.0.0.2:80"},{"to":"[fd00::3]:80"}]}]}"#,
    r#"forwards[0].backends[1].to: "[fd00::3]:80" is ipv6 but backends[0].to is ipv4"#
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"backends":[{"to":"10.0.0.2:80"},{"to":"10.0.0.2:80","weight":3}]}]}"#,
    r#"forwards[0].backends[1].to: "10.0.0.2:80" is listed twice"#
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"backends":[{"to":"10.0.0.2:80","weigth":3}]}]}"#,
    "unknown field `weigth`"
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"balance":"round-robin","to":"10.0.0.2:80"}]}"#,
    r#"forwards[0].balance: "round-robin" applies only to a pool"#
)]
#[case(
    r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"balance":"least-conn","backends":[{"to":"10.0.0.2:80"}]}]}"#,
    "unknown variant `least-conn`"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","redirect_to_port":2}]}"#,
    "exclusive"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"redirect_to_port":2,"snat":"none"}]}"#,
    "applies only to `to` forwards"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","proto":"icmp"}]}"#,
    "forwards[0].proto: unknown variant `icmp`"
)]
#[case(r#"{"instance":"Web"}"#, r#"instance: "Web" must match"#)]
#[case(r#"{"instance":"waytoolonginstance"}"#, "must match [a-z0-9-]{1,12}")]
#[case(
    r#"{"ip_forward":"sometimes"}"#,
    "ip_forward: \"sometimes\" is not one of true, false, \"auto\""
)]
#[case(
    r#"{"masquerade":[{"name":"m","source":"192.168.0.1/24"}]}"#,
    "masquerade[0].source"
)]
#[case(
    r#"{"masquerade":[{"name":"m","source":"192.168.0.0/24","to_source":"::1"}]}"#,
    "cannot mix"
)]
#[case(r#"[1]"#, "params must be one JSON object, not a list")]
#[case(
    "forwards:\n  - name: web\n",
    "params must be one JSON object; this is not JSON (YAML?"
)]
#[case(r#""web""#, "params must be one JSON object, not a string")]
#[case(
    r#"{"forwards":[{"name":"a","listen_prot":1,"to":"1.2.3.4"}]}"#,
    "forwards[0].listen_prot: unknown field `listen_prot`, expected one of `name`, "
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_prot":1,"to":"1.2.3.4"}]}"#,
    "; did you mean `listen_port`?"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","proto":"tpc"}]}"#,
    "unknown variant `tpc`, expected one of `tcp`, `udp`, `both`; did you mean `tcp`?"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","snat":"masq"}]}"#,
    r#"forwards[0].snat: "masq" is not one of "masquerade" (the default), "none" (the backend sees the client) or an IP address"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":"8000-8010","to":"1.2.3.4:9000-9010"}]}"#,
    r#"forwards[0].to: "1.2.3.4:9000-9010" has a port range: translating a listen range to another range is not supported"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":"80","to":"1.2.3.4:x"}]}"#,
    r#"forwards[0].to: "1.2.3.4:x" has an invalid port (1-65535)"#
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":"0","to":"1.2.3.4"}]}"#,
    r#"forwards[0].listen_port: "0" is not a port"#
)]
#[case(
    r#"{"addresses":[{"address":"10.10.10.10","dev":"eth0"}]}"#,
    "addresses[0].address: \"10.10.10.10\" needs a prefix length"
)]
#[case(
    r#"{"addresses":[{"address":"fd00::1/64","dev":"eth0","label":"eth0:1"}]}"#,
    "applies to IPv4 addresses only"
)]
#[case(
    r#"{"addresses":[{"address":"10.0.0.1/24","dev":"eth0","label":"eth1:1"}]}"#,
    "must start with the device name"
)]
#[case(
    r#"{"policy_routes":[{"from":"10.0.0.1","table":254}]}"#,
    "policy_routes[0].table: 254 is reserved"
)]
#[case(r#"{"policy_routes":[{"from":"10.0.0.1","table":0}]}"#, "is reserved")]
#[case(
    r#"{"policy_routes":[{"from":"10.0.0.1","table":4294967296}]}"#,
    "is not a routing table"
)]
#[case(
    r#"{"policy_routes":[{"from":"10.0.0.1","table":1,"priority":32766}]}"#,
    "is outside 1-32765"
)]
#[case(
    r#"{"policy_routes":[{"from":"10.0.0.1","table":1,"fwmark":"0xzz"}]}"#,
    "is not a firewall mark"
)]
#[case(
    r#"{"policy_routes":[{"from":"10.0.0.1","table":1,"routes":[{"to":"default"}]}]}"#,
    "routes[0]: needs `via`, `dev` or both"
)]
#[case(r#"{"policy_routes":[{"from":"10.0.0.1","table":1,"routes":[{"to":"default","via":"fd00::1"}]}]}"#, "cannot mix address families")]
#[case(r#"{"policy_routes":[{"from":"10.0.0.1","table":1,"routes":[{"to":"default","via":"10.0.0.9"},{"to":"default","dev":"eth0"}]}]}"#, "is listed twice in this table")]
#[case(r#"{"route_protocol":3}"#, "route_protocol: 3 is reserved")]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"listen_address":"127.0.0.1","local":true,"to":"10.0.2.2:1"}]}"#,
    "forwards[0].listen_address: \"127.0.0.1\" with local: true cannot be forwarded to 10.0.2.2, another host"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"listen_address":"::1","local":true,"to":"[fd00::2]:1"}]}"#,
    "the kernel never routes a packet from ::1 off this host"
)]
#[case(
    r#"{"route_protocol":"4321"}"#,
    "route_protocol: invalid value \"4321\" (expected an integer 0-255)"
)]
#[case(
    r#"{"route_protocol":"0x10"}"#,
    "route_protocol: invalid value \"0x10\""
)]
#[case(
    r#"{"persist":"maybe"}"#,
    "persist: invalid value \"maybe\" (expected a boolean"
)]
#[case(
    r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","allow_forward":"2"}]}"#,
    "forwards[0].allow_forward: invalid value \"2\""
)]
#[case(r#"{"#, "params must be one JSON object, and this is not valid JSON")]
fn refuses_bad_input(#[case] input: &str, #[case] needle: &str) {
    let message = err(input);
    assert!(
        message.contains(needle),
        "{message:?} does not contain {needle:?}"
    );
}

/// Newlines, quotes and NUL in any string field are refused, naming that field.
#[test]
fn hostile_characters_in_any_string_field_are_refused() {
    let base = serde_json::json!({
        "instance": "t",
        "forwards": [{"name": "f", "listen_port": "80", "listen_address": "10.0.0.1", "in_interface": "eth0",
                      "sources": ["10.1.0.0/16"], "to": "10.0.0.2:80", "snat": "10.0.0.1"},
                     {"name": "r", "listen_port": 81, "redirect_to_port": "8080"}],
        "masquerade": [{"name": "m", "source": "10.2.0.0/16", "out_interface": "eth1", "to_source": "10.0.0.1"}],
        "addresses": [{"address": "10.0.0.9/24", "dev": "eth0", "label": "eth0:1"}],
        "policy_routes": [{"from": "10.0.0.9", "to": "10.3.0.0/16", "table": "100", "priority": "1000", "fwmark": "0x10",
                           "iif": "eth0", "routes": [{"to": "default", "via": "10.0.0.1", "dev": "eth0"}]}]
    });
    assert!(
        Config::from_json(&base.to_string()).is_ok(),
        "the base params are valid"
    );
    let fields: &[&[&str]] = &[
        &["instance"],
        &["forwards", "0", "name"],
        &["forwards", "0", "listen_port"],
        &["forwards", "0", "listen_address"],
        &["forwards", "0", "in_interface"],
        &["forwards", "0", "sources", "0"],
        &["forwards", "0", "to"],
        &["forwards", "0", "snat"],
        &["forwards", "1", "redirect_to_port"],
        &["masquerade", "0", "name"],
        &["masquerade", "0", "source"],
        &["masquerade", "0", "out_interface"],
        &["masquerade", "0", "to_source"],
        &["addresses", "0", "address"],
        &["addresses", "0", "dev"],
        &["addresses", "0", "label"],
        &["policy_routes", "0", "from"],
        &["policy_routes", "0", "to"],
        &["policy_routes", "0", "table"],
        &["policy_routes", "0", "priority"],
        &["policy_routes", "0", "fwmark"],
        &["policy_routes", "0", "iif"],
        &["policy_routes", "0", "routes", "0", "to"],
        &["policy_routes", "0", "routes", "0", "via"],
        &["policy_routes", "0", "routes", "0", "dev"],
    ];
    for path in fields {
        for bad in ["\n", "\"", "\u{0}", "'", " -j ACCEPT", "$(reboot)"] {
            let mut params = base.clone();
            let mut slot = &mut params;
            for key in *path {
                slot = match key.parse::<usize>() {
                    Ok(i) => &mut slot[i],
                    Err(_) => &mut slot[*key],
                };
            }
            let value = format!("{}{bad}", slot.as_str().unwrap_or("x"));
            *slot = Value::from(value);
            let shown = path.iter().enumerate().fold(String::new(), |acc, (i, k)| {
                match k.parse::<usize>() {
                    Ok(n) => format!("{acc}[{n}]"),
                    Err(_) if i == 0 => k.to_string(),
                    Err(_) => format!("{acc}.{k}"),
                }
            });
            match Config::from_json(&params.to_string()) {
                Ok(_) => panic!("{shown} accepted {bad:?}"),
                Err(e) => assert!(e.to_string().contains(&shown), "{shown} with {bad:?}: {e}"),
            }
        }
    }
}

#[test]
fn reports_every_problem_at_once() {
    let message = err(
        r#"{"forwards":[{"name":"a","listen_port":0,"to":"x:1"},{"name":"b b","listen_port":1,"to":"1.2.3.4"}]}"#,
    );
    assert!(message.contains("forwards[0].listen_port"), "{message}");
    assert!(message.contains("forwards[0].to"), "{message}");
    assert!(message.contains("forwards[1].name"), "{message}");
}

#[test]
fn ignores_ansible_keys_and_reads_modes() {
    let (config, _, mode) = Config::from_json(
        r#"{"_ansible_check_mode":true,"_ansible_diff":true,"_ansible_future_key":{"x":1},"forwards":[]}"#,
    )
    .unwrap();
    assert!(mode.check && mode.diff);
    assert_eq!(config.instance, "portfwd");
}

#[test]
fn normalises_a_forward() {
    let (config, _, _) = Config::from_json(
        r#"{"forwards":[{"name":"v6","proto":"both","listen_port":"8000-8100","to":"[2001:db8::2]","sources":["2001:db8:1::/48"]}]}"#,
    )
    .unwrap();
    let f = &config.forwards[0];
    assert_eq!(f.family, Family::V6);
    assert_eq!(f.protos, vec![Proto::Tcp, Proto::Udp]);
    assert_eq!(f.ports_at(None).to_string(), "8000:8100");
    assert_eq!(
        f.action,
        Action::Dnat {
            addr: "2001:db8::2".parse().unwrap(),
            port: None,
            snat: Snat::Masquerade
        }
    );
}

#[test]
fn sysctl_names_are_not_interfaces() {
    for name in ["all", "default"] {
        let input = format!(
            r#"{{"forwards":[{{"name":"l","listen_port":1,"in_interface":"{name}","to":"127.0.0.1:80"}}]}}"#
        );
        let message = err(&input);
        assert!(
            message.contains(&format!(
                "forwards[0].in_interface: \"{name}\" is not an interface"
            )),
            "{message}"
        );
    }
}

/// What the kernel reports must be what the model holds, or every run churns.
#[test]
fn normalises_what_the_kernel_would_show_differently() {
    let (config, _, _) = Config::from_json(
        r#"{"forwards":[{"name":"a","listen_port":1,"to":"10.0.0.2","sources":["10.0.0.0/8","0.0.0.0/0"]}],
            "addresses":[{"address":"10.0.0.1/24","dev":"eth0","label":"eth0"}],
            "policy_routes":[{"from":"10.0.0.1","to":"0.0.0.0/0","table":7,
                "routes":[{"to":"0.0.0.0/0","via":"10.0.0.254"}]}]}"#,
    )
    .unwrap();
    assert!(
        config.forwards[0].sources.is_empty(),
        "0.0.0.0/0 is everyone"
    );
    assert_eq!(
        config.addresses[0].label, None,
        "a label equal to the device is none"
    );
    assert_eq!(
        config.policy_routes[0].to, None,
        "an all-zero `to` is no selector"
    );
    assert_eq!(
        config.policy_routes[0].routes[0].to, None,
        "0.0.0.0/0 is default"
    );
}

#[test]
fn ports_may_be_strings_as_templating_produces() {
    let (config, _, _) = Config::from_json(
        r#"{"forwards":[{"name":"r","listen_port":"2222","redirect_to_port":"1111"}]}"#,
    )
    .unwrap();
    assert_eq!(config.forwards[0].action, Action::Redirect { port: 1111 });
    assert_eq!(config.forwards[0].family, Family::V4);
}

#[test]
fn two_forwards_on_one_listen_key_are_refused_on_both_backends() {
    for backend in ["nftables", "iptables", "iptables-legacy"] {
        let err = Config::from_json(
            &r#"{"backend":"BACKEND","forwards":[
            {"name":"a","listen_port":"8000-8010","to":"10.0.0.1"},
            {"name":"b","listen_port":8005,"to":"10.0.0.2:80","sources":["10.1.0.0/16"]},
            {"name":"c","listen_port":8005,"proto":"udp","to":"10.0.0.2:80"},
            {"name":"d","listen_address":"10.9.9.9","listen_port":8005,"to":"10.0.0.2:80"}]}"#
                .replace("BACKEND", backend),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("forwards[1].listen_port") && err.contains("overlaps forward \"a\""),
            "{err}"
        );
        assert_eq!(
            err.matches("overlaps").count(),
            1,
            "udp and another address are apart: {err}"
        );
    }
    let same_port = Config::from_json(
        r#"{"forwards":[{"name":"a","listen_port":8080,"to":"10.0.0.1"},
            {"name":"b","listen_port":8080,"to":"10.0.0.2"}]}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        same_port.contains("forwards[1].listen_port: \"8080\"") && same_port.contains("\"a\""),
        "{same_port}"
    );
}

#[test]
fn old_backend_names_still_work_and_say_they_are_deprecated() {
    for (old, new) in [
        ("auto", "iptables"),
        ("nft", "iptables-nft"),
        ("legacy", "iptables-legacy"),
    ] {
        let (config, _, _) = Config::from_json(&format!(r#"{{"backend":"{old}"}}"#)).unwrap();
        assert_eq!(config.backend().name(), new);
        let desired =
            crate::compile::compile(&config, &crate::firewall::iptables::Iptables::default());
        assert!(
            desired.warnings.iter().any(|w| w.contains(&format!(
                "backend: \"{old}\" is deprecated; write \"{new}\""
            ))),
            "{:?}",
            desired.warnings
        );
    }
    let (config, _, _) = Config::from_json(r#"{"backend":"nftables"}"#).unwrap();
    let desired = crate::compile::compile(&config, &crate::firewall::iptables::Iptables::default());
    assert!(desired.warnings.is_empty(), "{:?}", desired.warnings);
}

/// A bare IPv6 address whose last group reads as a port is refused, saying how to write
/// each meaning; one that cannot be read so is taken as the address.
#[test]
fn an_ipv6_target_that_may_hold_a_port_is_refused() {
    let err =
        Config::from_json(r#"{"forwards":[{"name":"a","listen_port":80,"to":"fd10:2::2:1234"}]}"#)
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("forwards[0].to: \"fd10:2::2:1234\"")
            && err.contains("write \"[fd10:2::2]:1234\" for an IPv6 address with a port"),
        "{err}"
    );
    for fine in [
        "fd00:2::2",
        "[fd10:2::2:1234]",
        "[fd10:2::2]:1234",
        "fd00::1234",
    ] {
        let json = format!(r#"{{"forwards":[{{"name":"a","listen_port":80,"to":"{fine}"}}]}}"#);
        assert!(Config::from_json(&json).is_ok(), "{fine}");
    }
}

/// Ansible hands `-e` and INI inventory values to a binary module as strings; the spellings its
/// own argument spec takes for `bool` and `int` mean what they mean there.
#[test]
fn ansible_string_spellings_of_booleans_and_integers_are_taken() {
    let spelled = Config::from_json(
        r#"{"persist":"yes","ip_forward":"True","route_protocol":"210",
            "forwards":[{"name":"a","listen_port":"80","to":"1.2.3.4","local":"on",
                         "allow_forward":"No","reset_connections":"1"}],
            "masquerade":[{"name":"m","source":"10.0.0.0/8","allow_forward":"false"}]}"#,
    )
    .expect("Ansible's spellings are valid");
    let typed = Config::from_json(
        r#"{"persist":true,"ip_forward":true,"route_protocol":210,
            "forwards":[{"name":"a","listen_port":"80","to":"1.2.3.4","local":true,
                         "allow_forward":false,"reset_connections":true}],
            "masquerade":[{"name":"m","source":"10.0.0.0/8","allow_forward":false}]}"#,
    )
    .expect("typed params are valid");
    assert_eq!(format!("{spelled:?}"), format!("{typed:?}"));
}

/// A pool's backends keep their order, drained ones moved last (as its map lists them back);
/// a weight may be written as a string (Ansible's extra vars).
#[test]
fn validates_a_pool_with_its_drained_backends_last() {
    let (config, _, _) = Config::from_json(
        r#"{"backend":"nftables","forwards":[{"name":"p","listen_port":80,"balance":"source-hash","snat":"none",
            "backends":[{"to":"10.0.0.1:8080","weight":"0"},{"to":"10.0.0.2:8080"},{"to":"10.0.0.3:8081","weight":3}]}]}"#,
    )
    .unwrap();
    let member = |addr: &str, port, weight| PoolMember {
        addr: addr.parse().unwrap(),
        port: Some(port),
        weight,
    };
    assert_eq!(
        config.forwards[0].action,
        Action::Pool {
            pool: std::sync::Arc::new(Pool {
                backends: vec![
                    member("10.0.0.2", 8080, 1),
                    member("10.0.0.3", 8081, 3),
                    member("10.0.0.1", 8080, 0)
                ],
                balance: Balance::SourceHash,
                persistence: None,
            }),
            snat: Snat::None,
        }
    );
    assert!(config.forwards[0].needs_forwarding());
}

/// Runs `connections` new connections through a pool's nth cascade as the kernel's
/// `statistic --mode nth` counters would (each counts what reaches it and takes the first of
/// every `every`), and counts each backend's share.
fn through_cascade(pool: &Pool, connections: u32) -> Vec<u32> {
    let steps = pool.nth_cascade();
    let mut seen = vec![0u32; steps.len()];
    let mut got = vec![0u32; pool.backends.len()];
    for _ in 0..connections {
        for (k, step) in steps.iter().enumerate() {
            let first_of_every = seen[k].is_multiple_of(step.every);
            seen[k] += 1;
            if first_of_every != step.invert {
                got[step.backend] += 1;
                break;
            }
        }
    }
    got
}

fn weighted(weights: &[u16]) -> Pool {
    Pool {
        backends: (0u8..)
            .zip(weights)
            .map(|(i, &weight)| PoolMember {
                addr: std::net::IpAddr::from([10, 0, 0, i]),
                port: Some(80),
                weight,
            })
            .collect(),
        balance: Balance::RoundRobin,
        persistence: None,
    }
}

/// 1:1:2 takes one rule per backend; 2:3 (neither 1/k nor (k-1)/k of what reaches the
/// first) one per unit of weight; a common divisor shortens the cycle.
#[test]
fn a_round_robin_cascade_is_short_where_the_weights_allow() {
    let steps = |w: &[u16]| -> Vec<(usize, u32, bool)> {
        (weighted(w).nth_cascade().into_iter())
            .map(|s| (s.backend, s.every, s.invert))
            .collect()
    };
    assert_eq!(
        steps(&[1, 1, 2]),
        [(0, 4, false), (1, 3, false), (2, 1, false)]
    );
    assert_eq!(steps(&[3, 1]), [(0, 4, true), (1, 1, false)]);
    assert_eq!(
        steps(&[2, 3]),
        [(0, 5, false), (0, 4, false), (1, 1, false)]
    );
    assert_eq!(steps(&[20, 0, 20]), [(0, 2, false), (2, 1, false)]);
    assert_eq!(through_cascade(&weighted(&[2, 3]), 5), [2, 3]);
}

proptest::proptest! {
    /// Over every cycle each backend gets exactly its weight (divided by the weights'
    /// common divisor), drained ones nothing.
    #[test]
    fn a_round_robin_cascade_is_exact_over_every_cycle(
        weights in proptest::collection::vec(0u16..=12, 1..7),
        cycles in 1u32..4,
    ) {
        proptest::prop_assume!(weights.iter().any(|&w| w > 0));
        let pool = weighted(&weights);
        let gcd = weights.iter().fold(0, |g, &w| gcd(g, w));
        let cycle: u32 = weights.iter().map(|&w| u32::from(w / gcd)).sum();
        let got = through_cascade(&pool, cycle * cycles);
        let want: Vec<u32> = weights.iter().map(|&w| u32::from(w / gcd) * cycles).collect();
        proptest::prop_assert_eq!(got, want);
    }
}

fn gcd(a: u16, b: u16) -> u16 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
