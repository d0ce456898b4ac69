//! Entry points shared by the fuzz targets (`fuzz/`, cargo-fuzz) and the corpus replay test
//! that CI runs on stable: each drives one parser and what consumes its output, and must never
//! panic whatever the input. Built only with the `fuzzing` feature.

use crate::compile::compile;
use crate::firewall::iptables::observe::{extract_owned, IptablesObserved};
use crate::firewall::iptables::{decompile, plan, save, Iptables};
use crate::model::Config;
use crate::net::Family;
use crate::observe::iproute::{parse_addresses, parse_routes, parse_rules};

/// Params text → validation → compile → rendered rules → planning from nothing.
pub fn params(text: &str) {
    if let Ok((config, _, _)) = Config::from_json(text) {
        let desired = compile(&config, &Iptables::default());
        for chain in desired.firewall.chains.values() {
            for rule in &chain.rules {
                let rendered = rule.render();
                assert!(
                    !rendered.contains('\n'),
                    "a rule rendered a newline: {rendered:?}"
                );
            }
        }
        let _ = plan::plan_rules(
            &config.instance,
            &desired.firewall,
            &IptablesObserved::default(),
        );
    }
}

/// A dump → parse → owned rules of an instance → entries → plan to remove them all.
pub fn iptables_save(text: &str) {
    let dump = save::parse(text);
    let mut observed = IptablesObserved::default();
    extract_owned(&dump, Family::V4, "portfwd", &mut observed);
    let _ = decompile::entries_from_rules(&observed.owned, "portfwd", None);
    let _ = plan::plan_rules("portfwd", &Default::default(), &observed);
}

/// `ip -j` text through every parser, with a protocol taken from the text.
pub fn ip_json(text: &str) {
    let protocol = text.bytes().next().unwrap_or(0);
    for family in [Family::V4, Family::V6] {
        let _ = parse_rules(text, family, protocol);
        let _ = parse_routes(text, family, protocol);
    }
    let _ = parse_addresses(text);
}
