//! The config an earlier run applied, rebuilt from this run's: the read cache keeps the params
//! its objects were compiled from, and a change is planned from what they compile to. Parsing
//! and validating those params whole cost a change of one forward among 50,000 as much again
//! as the run's own params; only the forwards whose text differs are parsed here.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::config::Config;
use super::params::ForwardParams;
use super::validate;

/// Just the name of a forward's params.
#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    name: &'a str,
}

/// The top level of serialized params, each value as text, and the forwards' texts.
struct Split<'a> {
    top: BTreeMap<&'a str, &'a RawValue>,
    forwards: Vec<&'a RawValue>,
}

fn split(source: &str) -> Option<Split<'_>> {
    let mut top: BTreeMap<&str, &RawValue> = serde_json::from_str(source).ok()?;
    let forwards = match top.remove("forwards") {
        Some(list) => serde_json::from_str(list.get()).ok()?,
        None => Vec::new(),
    };
    Some(Split { top, forwards })
}

fn name_of(forward: &RawValue) -> Option<&str> {
    Some(serde_json::from_str::<Named>(forward.get()).ok()?.name)
}

impl Config {
    /// The config whose params serialize to `old` (an earlier run's [`Config::source`]),
    /// and the names of the forwards that differ from this one's (added, removed or changed),
    /// when nothing but forwards differs. Unchanged forwards are taken from this config;
    /// the others are parsed and validated. None when anything else differs or `old` is not
    /// such params.
    ///
    /// Forwards are compared by position after the longest common head and tail of the two
    /// lists (a forward's text names it, and `self.forwards[i]` is the one validated from the
    /// text at `i`), so one forward removed or inserted in the middle is the only one named;
    /// between head and tail, where the texts differ, names are read and forwards parsed. A
    /// forward that merely moved there counts as changed: compiled again, it compiles to what
    /// it did.
    pub(crate) fn earlier(&self, old: &str) -> Option<(Config, BTreeSet<String>)> {
        let new = split(&self.source)?;
        let was = split(old)?;
        let same_top = new.top.len() == was.top.len()
            && new
                .top
                .iter()
                .all(|(k, v)| was.top.get(k).is_some_and(|w| w.get() == v.get()));
        if !same_top || new.forwards.len() != self.forwards.len() {
            return None;
        }
        let (old_n, new_n) = (was.forwards.len(), new.forwards.len());
        let same = |i: usize, j: usize| was.forwards[i].get() == new.forwards[j].get();
        let shorter = old_n.min(new_n);
        let head = (0..shorter).take_while(|&i| same(i, i)).count();
        let tail = (0..shorter - head)
            .take_while(|&k| same(old_n - 1 - k, new_n - 1 - k))
            .count();
        let (old_end, new_end) = (old_n - tail, new_n - tail);
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let mut forwards = Vec::with_capacity(old_n);
        forwards.extend_from_slice(&self.forwards[..head]);
        for (i, text) in was.forwards.iter().enumerate().take(old_end).skip(head) {
            match new.forwards.get(i).filter(|_| i < new_end) {
                Some(now) if now.get() == text.get() => forwards.push(self.forwards[i].clone()),
                now => {
                    changed.insert(name_of(text)?.to_string());
                    if let Some(now) = now {
                        changed.insert(name_of(now)?.to_string());
                    }
                    let params: ForwardParams = serde_json::from_str(text.get()).ok()?;
                    forwards.push(validate::forward_of(i, &params)?);
                }
            }
        }
        forwards.extend_from_slice(&self.forwards[new_end..]);
        for now in new.forwards.iter().take(new_end).skip(old_end.max(head)) {
            changed.insert(name_of(now)?.to_string());
        }
        let config = Config {
            forwards,
            source: old.to_string(),
            persisted: None,
            ..self.without_forwards()
        };
        Some((config, changed))
    }

    /// This config with no forwards (the rest cloned).
    fn without_forwards(&self) -> Config {
        Config {
            state: self.state,
            instance: self.instance.clone(),
            ip_forward: self.ip_forward,
            backend: self.backend,
            backend_alias: self.backend_alias,
            forwards: Vec::new(),
            masquerades: self.masquerades.clone(),
            addresses: self.addresses.clone(),
            policy_routes: self.policy_routes.clone(),
            persist: self.persist,
            route_protocol: self.route_protocol,
            conn_mark: self.conn_mark,
            persisted: self.persisted.clone(),
            source: String::new(),
            ignored: self.ignored.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Config {
        Config::from_json(json).expect("valid params").0
    }

    const TWO: &str = r#"{"backend":"nftables","forwards":[{"name":"a","listen_port":1,"to":"10.0.0.1:80"},{"name":"b","listen_port":2,"to":"10.0.0.2:80"}]}"#;

    /// Rebuilt from the new config, the earlier one is what parsing its params gives.
    #[test]
    fn the_earlier_config_is_what_its_params_parse_to() {
        let cases = [
            // b changed, c added, a removed, order changed.
            r#"{"backend":"nftables","forwards":[{"name":"c","listen_port":3,"to":"10.0.0.3:80"},{"name":"b","listen_port":2,"to":"10.0.0.9:80"}]}"#,
            TWO,
        ];
        let old = config(TWO);
        for new in cases {
            let (earlier, changed) = config(new)
                .earlier(&old.source)
                .expect("only forwards differ");
            assert_eq!(earlier.forwards, old.forwards, "{new}");
            assert_eq!(earlier.source, old.source);
            let expected: BTreeSet<String> = if new == TWO {
                BTreeSet::new()
            } else {
                ["a", "b", "c"].map(String::from).into()
            };
            assert_eq!(changed, expected);
        }
    }

    /// Only the forwards whose text differs are named: one dropped from or inserted in the
    /// middle is the only one, the ones after it are matched from the end.
    #[test]
    fn only_differing_forwards_are_named() {
        let three = |b: &str, c: &str| {
            format!(
                r#"{{"backend":"nftables","forwards":[{{"name":"a","listen_port":1,"to":"10.0.0.1:80"}},{b}{c}]}}"#
            )
        };
        let b = r#"{"name":"b","listen_port":2,"to":"10.0.0.2:80"},"#;
        let b2 = r#"{"name":"b","listen_port":2,"to":"10.0.0.9:80"},"#;
        let c = r#"{"name":"c","listen_port":3,"to":"10.0.0.3:80"}"#;
        let old = config(&three(b, c));
        let d = r#"{"name":"d","listen_port":4,"to":"10.0.0.4:80"},"#;
        let cases = [
            (three(b2, c), vec!["b"]),
            (three("", c), vec!["b"]),
            (three(&format!("{b}{d}"), c), vec!["d"]),
            (three(d, c), vec!["b", "d"]),
        ];
        for (new, names) in cases {
            let (earlier, changed) = config(&new).earlier(&old.source).expect("only forwards");
            assert_eq!(earlier.forwards, old.forwards, "{new}");
            let names: BTreeSet<String> = names.into_iter().map(String::from).collect();
            assert_eq!(changed, names, "{new}");
        }
    }

    /// Anything but forwards differing, or text that is not params, is not rebuilt.
    #[test]
    fn other_differences_are_not_rebuilt() {
        let new = config(TWO);
        let other_mark = TWO.replace(
            r#""backend":"nftables""#,
            r#""backend":"nftables","conn_mark":"0x4000""#,
        );
        assert!(new.earlier(&config(&other_mark).source).is_none());
        assert!(new.earlier("not json").is_none());
        assert!(new.earlier(r#"{"forwards":[{"nom":"a"}]}"#).is_none());
    }
}
