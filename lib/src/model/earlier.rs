//! The config an earlier run applied, rebuilt from this run's: the read cache keeps the params
//! its objects were compiled from, and a change is planned from what they compile to. Parsing
//! and validating those params whole cost a change of one forward among 50,000 as much again
//! as the run's own params; only the forwards whose text differs are parsed here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::config::{Config, Forward};
use super::params::ForwardParams;
use super::validate;

/// Just the name of a forward's params.
#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    name: &'a str,
}

/// The top level of serialized params, each value as text, and the forwards by name.
struct Split<'a> {
    top: BTreeMap<&'a str, &'a RawValue>,
    forwards: Vec<(&'a str, &'a RawValue)>,
}

fn split(source: &str) -> Option<Split<'_>> {
    let mut top: BTreeMap<&str, &RawValue> = serde_json::from_str(source).ok()?;
    let list = top.remove("forwards");
    let raw: Vec<&RawValue> = match list {
        Some(list) => serde_json::from_str(list.get()).ok()?,
        None => Vec::new(),
    };
    let forwards = raw
        .into_iter()
        .map(|f| Some((serde_json::from_str::<Named>(f.get()).ok()?.name, f)))
        .collect::<Option<_>>()?;
    Some(Split { top, forwards })
}

impl Config {
    /// The config whose params serialize to `old` (an earlier run's [`Config::source`]),
    /// and the names of the forwards that differ from this one's (added, removed or changed),
    /// when nothing but forwards differs. Unchanged forwards are taken from this config;
    /// the others are parsed and validated. None when anything else differs or `old` is not
    /// such params.
    pub(crate) fn earlier(&self, old: &str) -> Option<(Config, BTreeSet<String>)> {
        let new = split(&self.source)?;
        let was = split(old)?;
        let same_top = new.top.len() == was.top.len()
            && new
                .top
                .iter()
                .all(|(k, v)| was.top.get(k).is_some_and(|w| w.get() == v.get()));
        if !same_top {
            return None;
        }
        let new_text: HashMap<&str, &str> =
            new.forwards.iter().map(|(n, f)| (*n, f.get())).collect();
        let mine: HashMap<&str, &Forward> =
            self.forwards.iter().map(|f| (f.name.as_str(), f)).collect();
        if new_text.len() != self.forwards.len() || mine.len() != self.forwards.len() {
            return None;
        }
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let mut forwards = Vec::with_capacity(was.forwards.len());
        for (i, (name, text)) in was.forwards.iter().enumerate() {
            match (new_text.get(name), mine.get(name)) {
                (Some(now), Some(f)) if *now == text.get() => forwards.push((*f).clone()),
                _ => {
                    changed.insert(name.to_string());
                    let params: ForwardParams = serde_json::from_str(text.get()).ok()?;
                    forwards.push(validate::forward_of(i, &params)?);
                }
            }
        }
        let old_names: BTreeSet<&str> = was.forwards.iter().map(|(n, _)| *n).collect();
        changed.extend(
            new.forwards
                .iter()
                .filter(|(n, _)| !old_names.contains(n))
                .map(|(n, _)| n.to_string()),
        );
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
