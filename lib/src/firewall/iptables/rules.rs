//! The shape both sides of the diff share: the rules an instance owns, per family and hook.
//!
//! `compile` builds one from params, `observe` extracts one from `iptables-save`, and `plan`
//! diffs two of them. Keeping one representation is what makes rollback free: a snapshot is
//! just another desired state.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::model::Proto;
use crate::net::Family;

/// The iptables tables portfwd writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Table {
    /// Written first so accepts exist before the NAT that sends traffic through them.
    Filter,
    Nat,
}

impl Table {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

/// A built-in chain that gets one jump into an instance's own chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Hook {
    Forward,
    Prerouting,
    Output,
    Postrouting,
    /// filter INPUT: only the guard that comes with `route_localnet`.
    Input,
}

impl Hook {
    pub(crate) const ALL: [Hook; 5] = [
        Hook::Forward,
        Hook::Prerouting,
        Hook::Output,
        Hook::Postrouting,
        Hook::Input,
    ];

    pub(crate) fn table(self) -> Table {
        match self {
            Hook::Forward | Hook::Input => Table::Filter,
            _ => Table::Nat,
        }
    }

    pub(crate) fn builtin(self) -> &'static str {
        match self {
            Hook::Forward => "FORWARD",
            Hook::Prerouting => "PREROUTING",
            Hook::Output => "OUTPUT",
            Hook::Postrouting => "POSTROUTING",
            Hook::Input => "INPUT",
        }
    }

    /// Upper case, so no lower-case instance name can make another instance's chain name.
    fn suffix(self) -> &'static str {
        match self {
            Hook::Forward => "FWD",
            Hook::Prerouting => "PRE",
            Hook::Output => "OUT",
            Hook::Postrouting => "POST",
            Hook::Input => "IN",
        }
    }

    /// The instance's own chain for this hook: `PFWD-<instance>-PRE` (at most 22 characters).
    pub(crate) fn chain(self, instance: &str) -> String {
        format!("PFWD-{instance}-{}", self.suffix())
    }
}

/// One rule: the arguments after `-A CHAIN`, unquoted, in order. A rule read from a dump keeps
/// its text and is split into arguments only when something needs more than its comment: a
/// no-op over thousands of owned rules compares comments only. A rule portfwd makes is kept
/// as the text it renders to, one allocation instead of one per argument (its arguments took
/// most of a run's memory at 50,000 forwards), and split the same way when needed.
#[derive(Clone)]
pub(crate) struct Rule {
    /// As `iptables-save` printed it (rules read from a dump), or as [`Rule::render`] writes
    /// it (`rendered`).
    text: Option<Box<str>>,
    /// `text` is the rendering of the arguments: equal texts are equal rules, and unequal
    /// ones are not.
    rendered: bool,
    args: OnceLock<Vec<String>>,
    /// The comment: where it is in `text` (known when the rule is made), or as a scan of
    /// `text` found it, without splitting the rest.
    comment: OnceLock<Option<Comment>>,
}

/// A rule's `--comment` value.
#[derive(Clone)]
enum Comment {
    /// Written bare at these bytes of the rule's text: no copy of it (a copy per rule was an
    /// allocation for each of 200,000 rules at 50,000 forwards).
    At(u32, u32),
    Scanned(String),
}

impl Rule {
    /// The rule of these arguments; the value after `--comment`, if any, is noted as the
    /// rule's comment, so it is never scanned for.
    pub(crate) fn new<S, I>(args: I) -> Rule
    where
        S: AsRef<str>,
        I: IntoIterator<Item = S>,
        I::IntoIter: Clone,
    {
        let args = args.into_iter();
        // Sized exactly when nothing is quoted (quotes are rare): growing the text, or
        // shrinking it into its box, cost compiling 50,000 forwards a tenth of its time.
        let size = args.clone().map(|a| a.as_ref().len() + 1).sum::<usize>();
        let mut text = String::with_capacity(size.saturating_sub(1));
        let mut comment = None;
        let mut after_flag = false;
        for (i, arg) in args.enumerate() {
            if i > 0 {
                text.push(' ');
            }
            let (start, arg) = (text.len(), arg.as_ref());
            push_quoted(&mut text, arg);
            if after_flag && comment.is_none() {
                comment = Some(match (u32::try_from(start), u32::try_from(text.len())) {
                    (Ok(a), Ok(b)) if text[start..] == *arg => Comment::At(a, b),
                    _ => Comment::Scanned(arg.to_string()),
                });
            }
            after_flag = arg == "--comment";
        }
        Rule {
            text: Some(text.into()),
            rendered: true,
            args: OnceLock::new(),
            comment: OnceLock::from(comment),
        }
    }

    /// A rule as `iptables-save` printed it after `-A CHAIN`; split when first needed.
    pub(crate) fn from_text(text: &str) -> Rule {
        Rule {
            text: Some(text.into()),
            rendered: false,
            args: OnceLock::new(),
            comment: OnceLock::new(),
        }
    }

    /// The arguments, unquoted (none when the text's quotes do not close).
    pub(crate) fn args(&self) -> &[String] {
        self.args.get_or_init(|| {
            self.text
                .as_deref()
                .and_then(super::save::tokenize)
                .unwrap_or_default()
        })
    }

    /// The value of `--comment`, where portfwd keeps its ownership key.
    pub(crate) fn comment(&self) -> Option<&str> {
        match (&self.text, self.args.get()) {
            (Some(text), None) => {
                let comment = self
                    .comment
                    .get_or_init(|| super::save::comment_of(text).map(Comment::Scanned));
                match comment.as_ref()? {
                    Comment::At(a, b) => text.get(*a as usize..*b as usize),
                    Comment::Scanned(c) => Some(c),
                }
            }
            _ => self.option("--comment"),
        }
    }

    /// The value following `flag`, e.g. `-j` gives the target.
    pub(crate) fn option(&self, flag: &str) -> Option<&str> {
        let args = self.args();
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    }

    /// The identity used by the diff: the comment when there is one (portfwd's keys embed a
    /// hash of the whole rule), else the rule text.
    pub(crate) fn key(&self) -> String {
        match self.comment() {
            Some(c) => c.to_string(),
            None => self.args().join(" "),
        }
    }

    /// Whether two rules say the same, argument by argument: a comment that matches is only a
    /// label (a rule edited in place with `iptables -R` keeps it). Texts equal as printed is
    /// the cheap case; otherwise both are put in `iptables-save`'s spelling and compared.
    pub(crate) fn same_body(&self, other: &Rule) -> bool {
        let text = |r: &Rule| r.text.as_deref().map(str::to_string);
        let (a, b) = (
            text(self).unwrap_or_else(|| self.render()),
            text(other).unwrap_or_else(|| other.render()),
        );
        a == b || saved_spelling(self.args()) == saved_spelling(other.args())
    }

    /// The arguments as `iptables-restore` reads them, quoting what needs it.
    pub(crate) fn render(&self) -> String {
        if let (true, Some(text)) = (self.rendered, &self.text) {
            return text.to_string();
        }
        let mut out = String::new();
        for (i, arg) in self.args().iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            push_quoted(&mut out, arg);
        }
        out
    }
}

impl PartialEq for Rule {
    fn eq(&self, other: &Rule) -> bool {
        if let (Some(a), Some(b)) = (&self.text, &other.text) {
            if a == b {
                return true;
            }
            if self.rendered && other.rendered {
                return false;
            }
        }
        self.args() == other.args()
    }
}

impl Eq for Rule {}

impl std::hash::Hash for Rule {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.args().hash(state);
    }
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule").field("args", &self.args()).finish()
    }
}

/// Arguments as `iptables-save` prints them: the basic matches first in its order (`-s -d -i
/// -o -p`, each with its `!`), a match of everything (`-s 0.0.0.0/0`) left out, a bare address
/// with its host prefix (`10.0.2.2/32`), `--ctproto` as a number. What portfwd compiles says
/// the same things in the order and words the user would write.
fn saved_spelling(args: &[String]) -> Vec<String> {
    const BASIC: [&str; 5] = ["-s", "-d", "-i", "-o", "-p"];
    let mut basic: Vec<(usize, Vec<String>)> = Vec::new();
    let mut rest = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let negated =
            args[i] == "!" && args.get(i + 1).is_some_and(|a| BASIC.contains(&a.as_str()));
        let at = if negated { i + 1 } else { i };
        if let (Some(rank), Some(value)) =
            (BASIC.iter().position(|b| *b == args[at]), args.get(at + 1))
        {
            let value = match BASIC[rank] {
                "-s" | "-d" if !value.contains('/') => match value.parse::<std::net::IpAddr>() {
                    Ok(addr) if addr.is_ipv4() => format!("{value}/32"),
                    Ok(_) => format!("{value}/128"),
                    Err(_) => value.clone(),
                },
                _ => value.clone(),
            };
            let everything = matches!(value.as_str(), "0.0.0.0/0" | "::/0") && rank < 2;
            if !everything || negated {
                let mut words = Vec::new();
                if negated {
                    words.push("!".to_string());
                }
                words.push(args[at].clone());
                words.push(value);
                basic.push((rank, words));
            }
            i = at + 2;
            continue;
        }
        let spelled = match (i.checked_sub(1).map(|p| args[p].as_str()), args[i].as_str()) {
            (Some("--ctproto"), "tcp") => "6".to_string(),
            (Some("--ctproto"), "udp") => "17".to_string(),
            _ => args[i].clone(),
        };
        rest.push(spelled);
        i += 1;
    }
    basic.sort_by_key(|(rank, _)| *rank);
    basic.into_iter().flat_map(|(_, w)| w).chain(rest).collect()
}

/// Quotes like `iptables-save`: bare when only `[A-Za-z0-9_./:,!+=@%-]`, else in double quotes
/// with `"`, `\` and `'` backslash-escaped.
fn push_quoted(out: &mut String, arg: &str) {
    // By bytes: every byte of a multi-byte character is outside the set. (By characters,
    // this check was a tenth of compiling 50,000 forwards.)
    let bare = !arg.is_empty()
        && arg.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'_' | b'.'
                        | b'/'
                        | b':'
                        | b','
                        | b'!'
                        | b'+'
                        | b'='
                        | b'@'
                        | b'%'
                        | b'-'
                        | b'['
                        | b']'
                )
        });
    if bare {
        out.push_str(arg);
        return;
    }
    out.push('"');
    for c in arg.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A jump from a built-in chain into an owned chain, with its 1-based position there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Jump {
    pub position: usize,
    pub rule: Rule,
}

/// One owned chain: its rules in order, the jumps that reach it, and its dispatch
/// sub-chains (nat: the DNAT rules of one protocol and 256-port bucket each, named
/// `<chain>-T<bucket>` / `<chain>-U<bucket>`, reached from a rule of this chain).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OwnedChain {
    pub rules: Vec<Rule>,
    pub jumps: Vec<Jump>,
    /// Shared, not copied: the objects last written, rebuilt from this run's for a change,
    /// share every sub-chain but the changed forwards', and the plan skips the shared ones.
    pub subchains: Subchains,
}

/// An owned chain's sub-chains by name.
pub(crate) type Subchains = BTreeMap<String, std::sync::Arc<Vec<Rule>>>;

impl OwnedChain {
    /// The chain's own rules, then those of its sub-chains.
    pub(crate) fn all_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .chain(self.subchains.values().flat_map(|rules| rules.iter()))
    }
}

/// Ports per dispatch bucket: a new connection visits the bucket rules, then only the
/// forwards of its own bucket, instead of every forward.
pub(crate) const BUCKET_PORTS: u16 = 256;

/// The sub-chain of `chain` for one protocol and bucket: `PFWD-web-PRE-T78`.
pub(crate) fn subchain_name(chain: &str, proto: Proto, bucket: u16) -> String {
    let letter = match proto {
        Proto::Tcp => 'T',
        Proto::Udp => 'U',
    };
    format!("{chain}-{letter}{bucket}")
}

/// Everything an instance owns in iptables (for desired state, or as observed).
///
/// Shared, not copied (see [`crate::firewall::nftables::table::Table`]); edits go through
/// [`std::sync::Arc::make_mut`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OwnedRules {
    pub chains: std::sync::Arc<BTreeMap<(Family, Hook), OwnedChain>>,
}

impl OwnedRules {
    #[cfg(test)]
    pub(crate) fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.all_rules().count()).sum()
    }

    /// A readable listing, one `-A CHAIN ...` per rule, used by snapshots and `--diff`.
    #[cfg(test)]
    pub(crate) fn listing(&self, instance: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for ((family, hook), chain) in self.chains.iter() {
            let _ = writeln!(
                out,
                "# {} {} {}",
                family.label(),
                hook.table().name(),
                hook.chain(instance)
            );
            for rule in &chain.rules {
                let _ = writeln!(out, "-A {} {}", hook.chain(instance), rule.render());
            }
            for (name, rules) in &chain.subchains {
                for rule in rules.iter() {
                    let _ = writeln!(out, "-A {name} {}", rule.render());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            proptest::strategy::Just("--comment".to_string()),
            "[ -~\\t]{0,12}",
        ]
    }

    proptest::proptest! {
        /// A rule portfwd makes is kept as its rendering: split again it gives back exactly
        /// its arguments, its comment scan agrees, and equality follows the arguments.
        #[test]
        fn a_made_rule_splits_back_into_its_arguments(
            args in proptest::collection::vec(arg(), 0..8),
            other in proptest::collection::vec(arg(), 0..8),
        ) {
            let split = args.iter().position(|a| a == "--comment").and_then(|i| args.get(i + 1));
            let scanned = Rule::new(&args);
            proptest::prop_assert_eq!(scanned.comment(), split.map(String::as_str));
            let rule = Rule::new(&args);
            proptest::prop_assert_eq!(rule.args(), &args[..]);
            proptest::prop_assert_eq!(rule == Rule::new(&other), args == other);
            let dumped = Rule::from_text(&rule.render());
            proptest::prop_assert!(dumped == rule);
        }
    }

    /// What portfwd compiles and what iptables-save prints for it compare equal; an edited
    /// rule does not.
    #[test]
    fn compiled_rules_compare_equal_to_their_saved_spelling() {
        let pairs = [
            (
                "-i eth0 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
                "-d 127.0.0.0/8 -i eth0 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            ),
            ("-s 0.0.0.0/0 -o eth1 -j ACCEPT", "-o eth1 -j ACCEPT"),
            (
                "-d 10.0.2.2 -p tcp -m tcp --dport 1234 -j MASQUERADE",
                "-d 10.0.2.2/32 -p tcp -m tcp --dport 1234 -j MASQUERADE",
            ),
            (
                "-m conntrack --ctstate DNAT --ctproto tcp -j RETURN",
                "-m conntrack --ctstate DNAT --ctproto 6 -j RETURN",
            ),
        ];
        for (compiled, saved) in pairs {
            let a = Rule::new(compiled.split(' '));
            assert!(a.same_body(&Rule::from_text(saved)), "{compiled} / {saved}");
        }
        let a = Rule::new("-d 10.0.2.2 -p tcp -j DNAT --to-destination 10.0.2.2:80".split(' '));
        let edited = Rule::from_text("-d 10.0.2.2/32 -p tcp -j DNAT --to-destination 10.0.2.2:9");
        assert!(!a.same_body(&edited));
        let negated =
            Rule::from_text("! -d 10.0.2.2/32 -p tcp -j DNAT --to-destination 10.0.2.2:80");
        assert!(!a.same_body(&negated));
    }

    #[test]
    fn renders_like_iptables_save() {
        let rule = Rule::new(["-m", "comment", "--comment", "we\"ir'\\d s", "-j", "ACCEPT"]);
        assert_eq!(
            rule.render(),
            r#"-m comment --comment "we\"ir\'\\d s" -j ACCEPT"#
        );
        assert_eq!(Rule::new(["--comment", ""]).render(), r#"--comment """#);
    }

    /// The comment noted when a rule is made is its value unquoted, the same a scan of the
    /// printed text finds, quoted or bare.
    #[test]
    fn a_made_rules_comment_is_its_unquoted_value() {
        for comment in ["t:fwd:web:0badc0de", "we\"ir'\\d s", ""] {
            let rule = Rule::new([
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                "ACCEPT",
            ]);
            assert_eq!(rule.comment(), Some(comment));
            assert_eq!(Rule::from_text(&rule.render()).comment(), Some(comment));
        }
        assert_eq!(Rule::new(["-j", "ACCEPT"]).comment(), None);
    }

    #[test]
    fn chain_names_fit_iptables_limit() {
        for hook in Hook::ALL {
            let chain = hook.chain("abcdefghijkl");
            assert!(chain.len() <= 28);
            let last_bucket = u16::MAX / BUCKET_PORTS;
            assert!(subchain_name(&chain, Proto::Udp, last_bucket).len() <= 28);
        }
    }
}
