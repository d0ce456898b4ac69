//! Property tests: what portfwd writes, iptables-save prints and portfwd parses back is the
//! same, for any valid params; comments round-trip whatever they contain; instances never
//! share a chain.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::compile::compile;
use crate::firewall::iptables::decompile;
use crate::firewall::iptables::observe::{extract_owned, IptablesObserved};
use crate::firewall::iptables::plan::plan_rules;
use crate::firewall::iptables::rules::{Hook, Rule};
use crate::firewall::iptables::save::{parse, tokenize};
use crate::firewall::iptables::Iptables;
use crate::model::Config;
use crate::net::Family;
use crate::testing::dump_of;

fn v4() -> impl Strategy<Value = String> {
    (1u8..=223, any::<u8>(), any::<u8>(), 1u8..=254)
        .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}"))
}

fn v6() -> impl Strategy<Value = String> {
    (any::<u16>(), any::<u16>(), 1u16..).prop_map(|(a, b, c)| format!("fd00:{a:x}:{b:x}::{c:x}"))
}

/// A port or range of forward `i`'s own band of 10,000 ports: two forwards on one port are
/// refused.
fn port(i: usize) -> impl Strategy<Value = Value> {
    let base = 10_000 * u16::try_from(i).unwrap_or(0);
    prop_oneof![
        (1u16..10_000).prop_map(move |p| Value::from(base + p)),
        (1u16..5000, 0u16..5000).prop_map(move |(a, n)| Value::from(format!(
            "{}-{}",
            base + a,
            base + a + n
        ))),
    ]
}

/// One forward of either family, with every optional field sometimes set.
fn forward(i: usize) -> impl Strategy<Value = Value> {
    let name = proptest::string::string_regex("[A-Za-z0-9_.-]{1,28}").expect("regex");
    (name, any::<bool>(), port(i), proptest::option::of(1u16..), 0u8..3, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), v4(), v6())
        .prop_map(move |(name, six, listen, to_port, snat, local, allow, with_source, with_listen, a4, a6)| {
            let addr = if six { a6 } else { a4 };
            let target = match (six, to_port) {
                (true, Some(p)) => format!("[{addr}]:{p}"),
                (false, Some(p)) => format!("{addr}:{p}"),
                (_, None) => addr.clone(),
            };
            let proto = ["tcp", "udp", "both"][usize::from(snat)];
            let mut f = json!({"name": format!("{name}{i}"), "listen_port": listen, "to": target, "local": local, "allow_forward": allow,
                               "proto": proto});
            f["snat"] = match snat {
                0 => json!("masquerade"),
                1 => json!("none"),
                _ => json!(addr),
            };
            if with_source {
                f["sources"] = json!([if six { "fd00::/16" } else { "10.0.0.0/8" }]);
            }
            if with_listen {
                f["listen_address"] = json!(if six { "fd00:ffff::1" } else { "192.0.2.1" });
                f["in_interface"] = json!("eth0");
            }
            f
        })
}

/// Forward `i`, or the same forward as a pool of 1-4 backends (`random` or `round-robin`,
/// weights 0-4 with one above 0, sometimes `persistence`) of its family.
fn forward_or_pool(i: usize) -> impl Strategy<Value = Value> {
    let pool = proptest::option::of((
        proptest::collection::vec(0u16..5, 1..5),
        any::<bool>(),
        proptest::option::of(1u32..100),
    ));
    (forward(i), pool).prop_map(move |(mut f, pool)| {
        let Some((mut weights, round_robin, persistence)) = pool else {
            return f;
        };
        if weights.iter().all(|&w| w == 0) {
            weights[0] = 1;
        }
        let to = f["to"].as_str().unwrap_or_default().to_string();
        let six = to.contains(':') && !to.contains('.') || to.starts_with('[');
        let port = to
            .rsplit_once(':')
            .filter(|_| !six || to.starts_with('['))
            .map(|(_, p)| p.to_string());
        let backends: Vec<Value> = (1..)
            .zip(&weights)
            .map(|(j, &w)| {
                let addr = if six {
                    format!("fd00:{i:x}::{j}")
                } else {
                    format!("10.{i}.{j}.1")
                };
                let to = match (&port, six) {
                    (Some(p), true) => format!("[{addr}]:{p}"),
                    (Some(p), false) => format!("{addr}:{p}"),
                    (None, _) => addr,
                };
                json!({"to": to, "weight": w})
            })
            .collect();
        let obj = f.as_object_mut().expect("a forward is an object");
        obj.remove("to");
        obj.insert("backends".into(), json!(backends));
        obj.insert(
            "balance".into(),
            json!(if round_robin { "round-robin" } else { "random" }),
        );
        if let Some(seconds) = persistence {
            obj.insert("persistence".into(), json!(seconds));
        }
        // A fixed SNAT address must be of the pool's family.
        if obj.get("snat").is_some_and(|s| {
            s.as_str()
                .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok())
        }) {
            obj.insert(
                "snat".into(),
                json!(if six { "fd00::1" } else { "192.0.2.9" }),
            );
        }
        f
    })
}

fn params() -> impl Strategy<Value = Value> {
    (0usize..6, any::<bool>()).prop_flat_map(|(n, masq)| {
        let forwards: Vec<_> = (0..n).map(forward_or_pool).collect();
        (forwards, Just(masq)).prop_map(|(forwards, masq)| {
            let mut p = json!({"forwards": forwards});
            if masq {
                p["masquerade"] = json!([{"name": "lan", "source": "192.168.0.0/24", "out_interface": "eth1"},
                                         {"name": "lan6", "source": "fd00:1::/64", "to_source": "fd00::1"}]);
            }
            p
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// parse(render(compile(params))) == compile(params), and planning against it is empty.
    #[test]
    fn compiled_rules_survive_save_and_parse(p in params()) {
        let (config, _, _) = Config::from_json(&p.to_string()).expect("generated params are valid");
        let desired = compile(&config, &Iptables::default());
        let mut observed = IptablesObserved::default();
        for family in [Family::V4, Family::V6] {
            let text = dump_of(&desired.firewall, &config.instance, family);
            let dump = parse(&text);
            extract_owned(&dump, family, &config.instance, &mut observed);
        }
        prop_assert_eq!(&observed.owned, &desired.firewall);
        let plan = plan_rules(&config.instance, &desired.firewall, &observed);
        prop_assert!(plan.tables.is_empty(), "{:?}", plan.tables);
    }

    /// What `show` gives back of the installed rules (pools, their weights, draws and
    /// persistence included) compiles to the same rules: applying it changes nothing.
    #[test]
    fn shown_params_compile_to_the_installed_rules(p in params()) {
        let (config, _, _) = Config::from_json(&p.to_string()).expect("generated params are valid");
        let desired = compile(&config, &Iptables::default());
        let shown = decompile::entries_from_rules(&desired.firewall, &config.instance, None);
        let again = json!({"instance": config.instance, "forwards": shown.forwards,
                           "masquerade": shown.masquerade});
        let (reparsed, _, _) = Config::from_json(&again.to_string())
            .unwrap_or_else(|e| panic!("{e:?}: {again}"));
        let recompiled = compile(&reparsed, &Iptables::default());
        let observed = IptablesObserved { owned: desired.firewall.clone(), ..IptablesObserved::default() };
        let plan = plan_rules(&config.instance, &recompiled.firewall, &observed);
        prop_assert!(plan.tables.is_empty(), "{again}\n{:?}", plan.tables);
    }

    /// Any comment iptables can hold (no newline, no NUL) renders and tokenizes back intact.
    #[test]
    fn any_comment_round_trips(comment in "[^\n\r\u{0}]{0,256}") {
        let rule = Rule::new(["-m", "comment", "--comment", comment.as_str(), "-j", "RETURN"]);
        prop_assert_eq!(tokenize(&rule.render()), Some(rule.args().to_vec()));
    }

    /// Two different valid instances never name the same chain.
    #[test]
    fn instances_never_share_a_chain(a in "[a-z0-9-]{1,12}", b in "[a-z0-9-]{1,12}") {
        prop_assume!(a != b);
        for ha in Hook::ALL {
            for hb in Hook::ALL {
                prop_assert_ne!(ha.chain(&a), hb.chain(&b));
            }
        }
    }
}
