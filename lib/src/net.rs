//! Small typed network values (address family, CIDR, port range) shared by the pipeline.
//!
//! Every value here renders to exactly one text form, so a rule compiled twice from the same
//! params is byte-identical and its ownership key is stable.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One transport protocol as it appears in a rule.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// IPv4 or IPv6: selects `iptables-*` or `ip6tables-*` and the forwarding sysctl.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The name users see in messages and diffs.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The sysctl that turns routing between interfaces on for this family.
    /// `4` / `6`, as in `ip -4`.
    pub fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    }

    /// `ip` / `ip6`, the nftables family of iptables-nft's tables (and the payload protocol
    /// and NAT family keyword in nft rules).
    pub fn nft_family(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The family an nft family word names (`inet`, `bridge`, ...: none).
    pub fn from_nft(word: &str) -> Option<Family> {
        [Family::V4, Family::V6]
            .into_iter()
            .find(|f| f.nft_family() == word)
    }

    pub fn forwarding_sysctl(self) -> &'static str {
        match self {
            Family::V4 => "net/ipv4/ip_forward",
            Family::V6 => "net/ipv6/conf/all/forwarding",
        }
    }

    /// The family as `conntrack -f` names it.
    pub fn conntrack_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// An address with a prefix length whose host bits are zero (`10.0.0.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Why a CIDR string was refused; the caller adds the field name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    Syntax,
    Prefix,
    HostBits(Cidr),
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::Syntax => f.write_str("is not an address or ADDRESS/PREFIX"),
            CidrError::Prefix => f.write_str("has a prefix length out of range"),
            CidrError::HostBits(net) => write!(f, "has host bits set (the network is {net})"),
        }
    }
}

impl Cidr {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// Parses `ADDR` (a host route) or `ADDR/LEN`, refusing set host bits.
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr = IpAddr::from_str(addr_text).map_err(|_| CidrError::Syntax)?;
        let max = Family::of(&addr).host_prefix();
        let prefix = match prefix_text {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| CidrError::Prefix)?
            }
            Some(_) => return Err(CidrError::Prefix),
        };
        if prefix > max {
            return Err(CidrError::Prefix);
        }
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != cidr {
            return Err(CidrError::HostBits(network));
        }
        Ok(cidr)
    }

    /// The same prefix with host bits cleared.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX
                    .checked_shl(32u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX
                    .checked_shl(128u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    /// True when `addr` lies inside this network.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        Family::of(addr) == self.family()
            && Cidr {
                addr: *addr,
                prefix: self.prefix,
            }
            .network()
                == *self
    }

    /// True when the two networks share an address (one contains the other).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let (a, b) = (self.network(), other.network());
        a.contains(&b.addr) || b.contains(&a.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One port or an inclusive range; renders as `80` or `8000:8100` (iptables syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The user-facing form: `80` or `8000-8100`.
    pub fn user_text(&self) -> String {
        if self.is_single() {
            self.first.to_string()
        } else {
            format!("{}-{}", self.first, self.last)
        }
    }

    /// Parses the iptables form `80` or `8000:8100` (as `iptables-save` prints it).
    pub fn parse_iptables(text: &str) -> Option<PortRange> {
        let (a, b) = text.split_once(':').unwrap_or((text, text));
        let first: u16 = a.parse().ok()?;
        let last: u16 = b.parse().ok()?;
        (first >= 1 && first <= last).then_some(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// An address as a number of its family's width.
fn addr_bits(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn addr_of_bits(family: Family, bits: u128) -> IpAddr {
    match family {
        // Only ever called with bits of a V4 address.
        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::from(
            u32::try_from(bits).unwrap_or(u32::MAX),
        )),
        Family::V6 => IpAddr::V6(bits.into()),
    }
}

/// The inclusive interval of addresses a prefix covers.
fn interval_of(cidr: &Cidr) -> (u128, u128) {
    let width = u32::from(cidr.family().host_prefix());
    let size_bits = width - u32::from(cidr.prefix.min(cidr.family().host_prefix()));
    let start = addr_bits(&cidr.network().addr);
    let span = if size_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << size_bits) - 1
    };
    (start, start.saturating_add(span))
}

/// The fewest prefixes that cover exactly the addresses `first..=last`, in order.
pub(crate) fn cover_interval(family: Family, first: u128, last: u128) -> Vec<Cidr> {
    let width = u32::from(family.host_prefix());
    let mut out = Vec::new();
    let mut at = first;
    while at <= last {
        // The largest aligned block starting at `at` that ends within the interval.
        let mut size_bits = if at == 0 {
            width
        } else {
            at.trailing_zeros().min(width)
        };
        while size_bits > 0 {
            let span = if size_bits >= 128 {
                u128::MAX
            } else {
                (1u128 << size_bits) - 1
            };
            if at.checked_add(span).is_some_and(|end| end <= last) {
                break;
            }
            size_bits -= 1;
        }
        out.push(Cidr {
            addr: addr_of_bits(family, at),
            // size_bits <= width <= 128, so this fits.
            prefix: u8::try_from(width - size_bits).unwrap_or(0),
        });
        let span = if size_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << size_bits) - 1
        };
        match at.checked_add(span).and_then(|end| end.checked_add(1)) {
            Some(next) => at = next,
            None => break,
        }
    }
    out
}

/// The same set of addresses as the fewest prefixes, sorted (IPv4 first): overlapping and
/// adjacent networks merge (`10.0.0.0/25` and `10.0.0.128/25` are `10.0.0.0/24`). nft merges
/// the elements of an address set this way, so a rule written from this form reads back as
/// written.
pub(crate) fn minimal_cover(cidrs: &[Cidr]) -> Vec<Cidr> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let mut intervals: Vec<(u128, u128)> = cidrs
            .iter()
            .filter(|c| c.family() == family)
            .map(interval_of)
            .collect();
        intervals.sort_unstable();
        out.extend(
            merged(&intervals)
                .into_iter()
                .flat_map(|(a, b)| cover_interval(family, a, b)),
        );
    }
    out
}

/// Sorted inclusive intervals with the overlapping and adjacent ones joined.
pub(crate) fn merged(sorted: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for &(a, b) in sorted {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The inclusive interval `first..=last` of one family, as numbers (nft lists merged address
/// sets as ranges).
pub(crate) fn interval_bits(first: &IpAddr, last: &IpAddr) -> Option<(Family, u128, u128)> {
    let family = Family::of(first);
    (family == Family::of(last)).then(|| (family, addr_bits(first), addr_bits(last)))
}

/// The interval of a prefix, as numbers.
pub(crate) fn cidr_bits(cidr: &Cidr) -> (Family, u128, u128) {
    let (a, b) = interval_of(cidr);
    (cidr.family(), a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("10.0.0.0/24", Ok("10.0.0.0/24"))]
    #[case("10.0.0.7", Ok("10.0.0.7/32"))]
    #[case("0.0.0.0/0", Ok("0.0.0.0/0"))]
    #[case("2001:db8::/32", Ok("2001:db8::/32"))]
    #[case("2001:db8::1", Ok("2001:db8::1/128"))]
    #[case("10.0.0.1/24", Err(CidrError::HostBits(Cidr::parse("10.0.0.0/24").unwrap())))]
    #[case("10.0.0.0/33", Err(CidrError::Prefix))]
    #[case("10.0.0.0/", Err(CidrError::Prefix))]
    #[case("10.0.0.0/+8", Err(CidrError::Prefix))]
    #[case("10.0.0.300/8", Err(CidrError::Syntax))]
    #[case("example.com", Err(CidrError::Syntax))]
    fn cidr_parsing(#[case] input: &str, #[case] expected: Result<&str, CidrError>) {
        assert_eq!(
            Cidr::parse(input).map(|c| c.to_string()),
            expected.map(str::to_string)
        );
    }

    #[test]
    fn contains_respects_prefix_and_family() {
        let net = Cidr::parse("192.168.0.0/16").unwrap();
        assert!(net.contains(&"192.168.200.1".parse().unwrap()));
        assert!(!net.contains(&"192.169.0.1".parse().unwrap()));
        assert!(!net.contains(&"::1".parse().unwrap()));
    }

    #[rstest]
    #[case("80", Some((80, 80)))]
    #[case("8000:8100", Some((8000, 8100)))]
    #[case("0", None)]
    #[case("9:8", None)]
    #[case("x", None)]
    fn iptables_port_ranges(#[case] input: &str, #[case] expected: Option<(u16, u16)>) {
        assert_eq!(
            PortRange::parse_iptables(input).map(|r| (r.first, r.last)),
            expected
        );
    }

    #[test]
    fn adjacent_and_overlapping_networks_merge_into_the_fewest_prefixes() {
        let cover = |items: &[&str]| -> Vec<String> {
            let cidrs: Vec<Cidr> = items.iter().map(|c| Cidr::parse(c).unwrap()).collect();
            minimal_cover(&cidrs)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(cover(&["10.0.0.128/25", "10.0.0.0/25"]), ["10.0.0.0/24"]);
        assert_eq!(cover(&["10.1.0.0/16", "10.0.0.0/8"]), ["10.0.0.0/8"]);
        assert_eq!(
            cover(&["10.0.0.0/25", "10.0.0.128/26"]),
            ["10.0.0.0/25", "10.0.0.128/26"]
        );
        assert_eq!(
            cover(&["10.0.1.0/24", "10.0.2.0/24"]),
            ["10.0.1.0/24", "10.0.2.0/24"]
        );
        assert_eq!(cover(&["10.0.0.5", "10.0.0.4"]), ["10.0.0.4/31"]);
        assert_eq!(
            cover(&["9.9.9.9", "fd00::/65", "fd00:0:0:0:8000::/65"]),
            ["9.9.9.9/32", "fd00::/64"]
        );
        let (f, a, b) =
            interval_bits(&"10.0.0.0".parse().unwrap(), &"10.0.0.191".parse().unwrap()).unwrap();
        let range: Vec<String> = cover_interval(f, a, b)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(range, ["10.0.0.0/25", "10.0.0.128/26"]);
        let all: Vec<String> = cover_interval(Family::V6, 0, u128::MAX)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(all, ["::/0"]);
    }
}
