//! Reads a netlink dump of the instance's table ([`NftDump`]) into what a listing would have
//! found, when the dump's shape is the one recorded for what portfwd last wrote: the chains,
//! rules and declarations are then those objects', and only the elements are read, from
//! their bytes. Anything the bytes do not say plainly (an element portfwd would not write,
//! a range's end) makes the run list the table after all.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::observe::NftObserved;
use super::table::{Data, Element, Elements, MapKind, Stage, Table, Target};
use crate::model::Proto;
use crate::net::{Family, PortRange};
use crate::tools::{DumpedElement, NftDump};

/// What a listing would find, given that the table's shape is `last`'s (the caller compared
/// the digests); None when an element cannot be read from its bytes.
pub(crate) fn observed(last: &Table, dump: &NftDump) -> Option<NftObserved> {
    let mut maps = BTreeMap::new();
    for set in &dump.sets {
        // The shape is last's, so every set is one of its maps.
        let kind = MapKind::from_name(&set.name)?;
        last.maps.get(&set.name)?;
        let mut elements = Elements::new();
        for (i, dumped) in set.elements.iter().enumerate() {
            let element = element(kind, dumped)?;
            // An uncommented element is not ours to keep; a unique name lets the plan
            // delete it (by its key, as portfwd writes keys).
            let comment = dumped.comment.clone().unwrap_or_else(|| format!("?{i}"));
            elements.insert(comment, element);
        }
        maps.insert(set.name.clone(), elements);
    }
    if maps.len() != last.maps.len() {
        return None;
    }
    let table = Table {
        maps: Arc::new(maps),
        chains: last.chains.clone(),
    };
    Some(NftObserved::as_written(table))
}

/// One field of a key or of data: its type's width.
#[derive(Clone, Copy)]
enum Field {
    Addr(Family),
    Proto,
    Port,
}

impl Field {
    fn of(name: &str) -> Option<Field> {
        match name {
            "ipv4_addr" => Some(Field::Addr(Family::V4)),
            "ipv6_addr" => Some(Field::Addr(Family::V6)),
            "inet_proto" => Some(Field::Proto),
            "inet_service" => Some(Field::Port),
            _ => None,
        }
    }

    fn width(self) -> usize {
        match self {
            Field::Addr(Family::V4) => 4,
            Field::Addr(Family::V6) => 16,
            Field::Proto => 1,
            Field::Port => 2,
        }
    }
}

/// A value read field by field.
enum Value {
    Addr(IpAddr),
    Proto(Proto),
    Port(u16),
}

/// Splits `bytes` into the fields of `types` (in a concatenation each takes a multiple of
/// four bytes); None unless they fill it exactly.
fn fields(types: &[&str], bytes: &[u8]) -> Option<Vec<Value>> {
    let mut out = Vec::with_capacity(types.len());
    let mut at = 0;
    for name in types {
        let field = Field::of(name)?;
        let width = field.width();
        let value = bytes.get(at..at + width)?;
        out.push(match field {
            Field::Addr(Family::V4) => {
                Value::Addr(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?)))
            }
            Field::Addr(Family::V6) => Value::Addr(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(value).ok()?,
            ))),
            Field::Proto => Value::Proto(match value.first()? {
                6 => Proto::Tcp,
                17 => Proto::Udp,
                _ => return None,
            }),
            Field::Port => Value::Port(u16::from_be_bytes(value.try_into().ok()?)),
        });
        at += if types.len() > 1 {
            width.next_multiple_of(4)
        } else {
            width
        };
    }
    (at == bytes.len()).then_some(out)
}

fn element(kind: MapKind, dumped: &DumpedElement) -> Option<Element> {
    if dumped.other {
        return None;
    }
    let types = kind.key_types();
    let key = fields(&types, &dumped.key)?;
    let mut key = key.into_iter();
    let addr = match kind.by_addr {
        true => match key.next()? {
            Value::Addr(a) => Some(a),
            _ => return None,
        },
        false => None,
    };
    let proto = match kind.stage {
        Stage::Post => None,
        _ => match key.next()? {
            Value::Proto(p) => Some(p),
            _ => return None,
        },
    };
    let Value::Port(first) = key.next()? else {
        return None;
    };
    // A range's end repeats the key but for the last port.
    let last = match (&dumped.key_end, kind.ranged) {
        (None, _) => first,
        (Some(end), true) => range_end(&types, &dumped.key, end)?,
        (Some(_), false) => return None,
    };
    let backend = match kind.data {
        Data::Masq | Data::Snat => match (key.next()?, key.next()?) {
            (Value::Addr(a), Value::Port(p)) => Some((a, p)),
            _ => return None,
        },
        _ => None,
    };
    if key.next().is_some() {
        return None;
    }
    let target = match (kind.data, &dumped.data, &dumped.jump) {
        (Data::Verdict, None, Some(chain)) => Target::Jump(chain.clone()),
        (Data::Nat, Some(bytes), None) => {
            let types = kind.data_type()?.split(" . ").collect::<Vec<_>>();
            match fields(&types, bytes)?.as_slice() {
                [Value::Addr(a), Value::Port(p)] => Target::To(*a, *p),
                _ => return None,
            }
        }
        (Data::Snat, Some(bytes), None) => match fields(&[kind.data_type()?], bytes)?.as_slice() {
            [Value::Addr(a)] => Target::Source(*a),
            _ => return None,
        },
        (Data::Mark | Data::Masq, None, None) => Target::Member,
        _ => return None,
    };
    Some(Element {
        addr,
        proto,
        ports: PortRange { first, last },
        backend,
        target,
    })
}

/// The last port of a range whose key is `key` and whose end is `end`: the end must repeat
/// every other field of the key.
fn range_end(types: &[&str], key: &[u8], end: &[u8]) -> Option<u16> {
    let port = types.iter().position(|t| *t == "inet_service")?;
    let at: usize = types[..port]
        .iter()
        .map(|t| Field::of(t).map_or(0, |f| f.width().next_multiple_of(4)))
        .sum();
    let width = if types.len() > 1 { 4 } else { 2 };
    let same = |range: std::ops::Range<usize>| key.get(range.clone()) == end.get(range);
    if key.len() != end.len() || !same(0..at) || !same(at + width..key.len()) {
        return None;
    }
    Some(u16::from_be_bytes(end.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(
        stage: Stage,
        by_addr: bool,
        proto: Option<Proto>,
        ranged: bool,
        data: Data,
    ) -> MapKind {
        MapKind {
            stage,
            by_addr,
            family: Family::V4,
            proto,
            ranged,
            data,
        }
    }

    fn bytes(key: &[u8]) -> DumpedElement {
        DumpedElement {
            key: key.to_vec(),
            ..DumpedElement::default()
        }
    }

    const TCP_4321: [u8; 8] = [6, 0, 0, 0, 0x10, 0xe1, 0, 0];

    #[test]
    fn a_dnat_element_reads_as_its_key_and_backend() {
        let nat = kind(Stage::Pre, false, None, false, Data::Nat);
        let dumped = DumpedElement {
            data: Some(vec![10, 0, 2, 2, 0x04, 0xd2, 0, 0]),
            ..bytes(&TCP_4321)
        };
        let element = element(nat, &dumped).expect("a plain forward's element");
        assert_eq!(
            element,
            Element {
                addr: None,
                proto: Some(Proto::Tcp),
                ports: PortRange {
                    first: 4321,
                    last: 4321
                },
                backend: None,
                target: Target::To("10.0.2.2".parse().unwrap(), 1234),
            }
        );
        assert_eq!(element.key(), "tcp . 4321");
    }

    #[test]
    fn a_masquerade_member_reads_its_backend_from_the_key() {
        let masq = kind(Stage::Post, false, Some(Proto::Tcp), false, Data::Masq);
        let dumped = bytes(&[0x10, 0xe1, 0, 0, 10, 0, 2, 2, 0x04, 0xd2, 0, 0]);
        let element = element(masq, &dumped).expect("a masquerade member");
        assert_eq!(element.proto, None);
        assert_eq!(element.backend, Some(("10.0.2.2".parse().unwrap(), 1234)));
        assert_eq!(element.target, Target::Member);
    }

    #[test]
    fn a_single_field_key_has_no_padding() {
        let post = kind(Stage::Post, false, Some(Proto::Udp), false, Data::Verdict);
        let dumped = DumpedElement {
            jump: Some("fwd-dns".into()),
            ..bytes(&[0x14, 0xe9])
        };
        let element = element(post, &dumped).expect("a jump by port");
        assert_eq!(element.ports.first, 5353);
        assert_eq!(element.target, Target::Jump("fwd-dns".into()));
        // Padded, the same port is not a single-field key.
        let padded = DumpedElement {
            jump: Some("fwd-dns".into()),
            ..bytes(&[0x14, 0xe9, 0, 0])
        };
        assert_eq!(super::element(post, &padded), None);
    }

    #[test]
    fn a_range_end_must_repeat_the_rest_of_the_key() {
        let ranged = kind(Stage::Pre, true, None, true, Data::Verdict);
        let key = [10, 0, 1, 1, 6, 0, 0, 0, 0x17, 0x70, 0, 0];
        let end = [10, 0, 1, 1, 6, 0, 0, 0, 0x17, 0x7a, 0, 0];
        let dumped = DumpedElement {
            key_end: Some(end.to_vec()),
            jump: Some("fwd-range".into()),
            ..bytes(&key)
        };
        let element = element(ranged, &dumped).expect("a range by address");
        assert_eq!(element.addr, Some("10.0.1.1".parse().unwrap()));
        assert_eq!(
            element.ports,
            PortRange {
                first: 6000,
                last: 6010
            }
        );
        let mut elsewhere = end;
        elsewhere[3] = 2;
        let odd = DumpedElement {
            key_end: Some(elsewhere.to_vec()),
            ..dumped.clone()
        };
        assert_eq!(super::element(ranged, &odd), None, "another address's end");
        let unranged = kind(Stage::Pre, true, None, false, Data::Verdict);
        assert_eq!(super::element(unranged, &dumped), None, "an end in a hash");
    }

    #[test]
    fn what_portfwd_would_not_write_is_not_read() {
        let nat = kind(Stage::Pre, false, None, false, Data::Nat);
        let good = DumpedElement {
            data: Some(vec![10, 0, 2, 2, 0x04, 0xd2, 0, 0]),
            ..bytes(&TCP_4321)
        };
        assert!(element(nat, &good).is_some());
        let flagged = DumpedElement {
            other: true,
            ..good.clone()
        };
        assert_eq!(element(nat, &flagged), None, "a timeout or flags");
        let icmp = DumpedElement {
            key: vec![1, 0, 0, 0, 0x10, 0xe1, 0, 0],
            ..good.clone()
        };
        assert_eq!(element(nat, &icmp), None, "a protocol portfwd never keys");
        let long = DumpedElement {
            data: Some(vec![10, 0, 2, 2, 0x04, 0xd2, 0, 0, 0, 0, 0, 0]),
            ..good.clone()
        };
        assert_eq!(element(nat, &long), None, "bytes left over");
        let jump = DumpedElement {
            data: None,
            jump: Some("fwd-web".into()),
            ..good
        };
        assert_eq!(element(nat, &jump), None, "a jump in a DNAT map");
    }
}
