//! Params: the user's desired state as JSON, and its validation into a typed [`Config`].
//!
//! Nothing reaches the system unless the whole input is valid: [`Config::from_json`] collects
//! every problem, each naming the field path and the offending value.

use std::collections::HashSet;
use std::net::IpAddr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::net::{Cidr, CidrError, Family, PortRange};
use crate::Error;

/// Whether the instance's objects should exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Present,
    Absent,
}

/// Which iptables flavour to drive: the system default, or one forced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `iptables-save`/`iptables-restore` as installed (whatever the alternatives select).
    #[default]
    Auto,
    /// `iptables-nft-save`/`iptables-nft-restore`.
    Nft,
    /// `iptables-legacy-save`/`iptables-legacy-restore`.
    Legacy,
}

/// Transport protocol of a forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProtoParam {
    #[default]
    Tcp,
    Udp,
    Both,
}

/// One transport protocol as it appears in a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// `true`, `false` or `"auto"` (enable for the families that need it, never disable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpForward {
    #[default]
    Auto,
    On,
    Off,
}

impl Serialize for IpForward {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IpForward::Auto => s.serialize_str("auto"),
            IpForward::On => s.serialize_bool(true),
            IpForward::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for IpForward {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(IpForward::On),
            Value::Bool(false) => Ok(IpForward::Off),
            Value::String(s) if s == "auto" => Ok(IpForward::Auto),
            other => Err(serde::de::Error::custom(format!(
                "{other} is not one of true, false, \"auto\""
            ))),
        }
    }
}

impl JsonSchema for IpForward {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IpForward".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "true, false, or \"auto\": enable forwarding for the families that need it and never disable it",
            "oneOf": [{"type": "boolean"}, {"const": "auto"}],
            "default": "auto"
        })
    }
}

fn port_or_range_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "a port 1-65535, or a range \"FIRST-LAST\"",
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 65535},
            {"type": "string", "pattern": "^[0-9]{1,5}(-[0-9]{1,5})?$"}
        ]
    })
}

fn port_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "a port 1-65535",
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 65535},
            {"type": "string", "pattern": "^[0-9]{1,5}$"}
        ]
    })
}

fn default_instance() -> String {
    "portfwd".to_string()
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The module's params, exactly as the user writes them.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "portfwd params")]
pub struct Params {
    /// `present` makes the listed objects exist; `absent` removes everything the instance owns.
    #[serde(default)]
    pub state: State,
    /// Ownership namespace, `[a-z0-9-]{1,12}`; instances never touch each other's objects.
    #[serde(default = "default_instance")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,12}$"))]
    pub instance: String,
    /// Kernel forwarding switch for the families the forwards use.
    #[serde(default)]
    pub ip_forward: IpForward,
    /// iptables flavour; `auto` uses the system's default tools.
    #[serde(default)]
    pub backend: Backend,
    /// Port forwards (DNAT or REDIRECT), in rule order.
    #[serde(default)]
    pub forwards: Vec<ForwardParams>,
    /// Source NAT for whole subnets (a gateway), in rule order.
    #[serde(default)]
    pub masquerade: Vec<MasqueradeParams>,
    /// Addresses to ensure on interfaces (e.g. the alias a source-preserving forward targets).
    #[serde(default)]
    pub addresses: Vec<AddressParams>,
    /// Policy routing: one `ip rule` per entry, with routes installed in its table.
    #[serde(default)]
    pub policy_routes: Vec<PolicyRouteParams>,
    /// Store the params under the state dir so `portfwd restore` re-applies them at boot.
    #[serde(default, skip_serializing_if = "is_false")]
    pub persist: bool,
    /// Protocol number that marks this instance's ip rules and routes (default: derived from
    /// the instance name, in 200-249). 0-4 are reserved by the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 255))]
    pub route_protocol: Option<u8>,
    /// The one conntrack mark bit that marks portfwd's forwarded flows, so one rule at the top
    /// of the FORWARD chain accepts their established packets (default `0x2000`). Choose
    /// another when other software uses that bit (the run warns when a rule does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "conn_mark_schema")]
    pub conn_mark: Option<Value>,
}

/// The default conntrack mark bit: clear of kube-proxy (0x4000, 0x8000), Calico (the upper
/// 16 bits), Cilium (0x0f00) and Istio (0x539).
pub const DEFAULT_CONN_MARK: u32 = 0x2000;

fn conn_mark_schema(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "description": "One bit: a power of two, as a number or a hex string (\"0x2000\").",
        "anyOf": [
            {"type": "integer", "minimum": 1, "maximum": 2147483648u32},
            {"type": "string", "pattern": "^(0x[0-9a-fA-F]{1,8}|[0-9]{1,10})$"}
        ]
    })
}

impl Default for Params {
    fn default() -> Self {
        Params {
            state: State::Present,
            instance: default_instance(),
            ip_forward: IpForward::Auto,
            backend: Backend::Auto,
            forwards: Vec::new(),
            masquerade: Vec::new(),
            addresses: Vec::new(),
            policy_routes: Vec::new(),
            persist: false,
            route_protocol: None,
            conn_mark: None,
        }
    }
}

/// One port forward as written by the user.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardParams {
    /// Unique name, `[A-Za-z0-9_.-]{1,32}`; it labels the rules and the diff.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{1,32}$"))]
    pub name: String,
    #[serde(default)]
    pub proto: ProtoParam,
    /// Port (or `FIRST-LAST` range) the forward listens on.
    #[schemars(schema_with = "port_or_range_schema")]
    pub listen_port: Value,
    /// Only connections to this address; without it, any local address of this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_address: Option<String>,
    /// Only connections arriving on this interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_interface: Option<String>,
    /// CIDRs allowed to use the forward; empty means everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// DNAT target: `IP:PORT`, `[IPv6]:PORT`, or `IP` (keeps the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// REDIRECT to this local port instead of DNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "port_schema")]
    pub redirect_to_port: Option<Value>,
    /// `masquerade` (default for `to`), `none` (backend sees the client), or an IP for SNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    /// Also forward connections made on this host (nat OUTPUT).
    #[serde(default, skip_serializing_if = "is_false")]
    pub local: bool,
    /// Accept the flow and its replies in filter FORWARD (needed when its policy is DROP).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub allow_forward: bool,
    /// When the forward changes or goes away, also cut its open TCP connections (their
    /// conntrack entries are deleted); by default they finish on the old target. UDP flows
    /// always follow the change.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reset_connections: bool,
}

/// Source NAT for a subnet leaving this host.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MasqueradeParams {
    /// Unique name, `[A-Za-z0-9_.-]{1,32}`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{1,32}$"))]
    pub name: String,
    /// The subnet whose traffic is translated (CIDR, host bits zero).
    pub source: String,
    /// Only traffic leaving through this interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_interface: Option<String>,
    /// SNAT to this address instead of MASQUERADE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_source: Option<String>,
    /// Accept the subnet's traffic and its replies in filter FORWARD.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub allow_forward: bool,
}

/// An address to ensure on an interface.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressParams {
    /// Interface address with its prefix length, e.g. `10.10.10.10/24`.
    pub address: String,
    /// The interface.
    pub dev: String,
    /// IPv4 only: a label starting with the device name, like `eth0:1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// One `ip rule` and the routes of its table.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRouteParams {
    /// Source prefix the rule matches (CIDR, or an address for a single host).
    pub from: String,
    /// Destination prefix the rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Routing table, 1-4294967295 except 253, 254 and 255 (default, main, local).
    #[schemars(schema_with = "table_schema")]
    pub table: Value,
    /// Rule priority 1-32765; a stable one is derived from the rule when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "priority_schema")]
    pub priority: Option<Value>,
    /// Firewall mark to match: `16`, `"0x10"` or `"0x10/0xff"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "fwmark_schema")]
    pub fwmark: Option<Value>,
    /// Incoming interface to match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iif: Option<String>,
    /// Routes installed in `table`.
    #[serde(default)]
    pub routes: Vec<RouteParams>,
}

/// A route inside a policy routing table.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteParams {
    /// `default` or a CIDR.
    pub to: String,
    /// Gateway address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Outgoing interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

fn table_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "routing table 1-4294967295, not 253, 254 or 255",
        "oneOf": [{"type": "integer", "minimum": 1, "maximum": 4294967295u64}, {"type": "string", "pattern": "^[0-9]+$"}]
    })
}

fn priority_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "rule priority 1-32765",
        "oneOf": [{"type": "integer", "minimum": 1, "maximum": 32765}, {"type": "string", "pattern": "^[0-9]+$"}]
    })
}

fn fwmark_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "firewall mark: a number, \"0xVALUE\" or \"0xVALUE/0xMASK\"",
        "oneOf": [{"type": "integer", "minimum": 0, "maximum": 4294967295u64}, {"type": "string", "pattern": "^(0x[0-9a-fA-F]+|[0-9]+)(/(0x[0-9a-fA-F]+|[0-9]+))?$"}]
    })
}

/// A validated interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub addr: IpAddr,
    pub prefix: u8,
    pub dev: String,
    pub label: Option<String>,
}

impl Address {
    /// `10.10.10.10/24`, as iproute2 takes it.
    pub fn cidr_text(&self) -> String {
        format!("{}/{}", self.addr, self.prefix)
    }
}

/// A validated policy route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRoute {
    pub family: Family,
    pub from: Cidr,
    pub to: Option<Cidr>,
    pub table: u32,
    pub priority: Option<u32>,
    /// (mark, mask)
    pub fwmark: Option<(u32, u32)>,
    pub iif: Option<String>,
    pub routes: Vec<Route>,
}

/// A validated route; `to: None` is the default route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub to: Option<Cidr>,
    pub via: Option<IpAddr>,
    pub dev: Option<String>,
}

/// How a DNAT forward rewrites the source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snat {
    Masquerade,
    None,
    To(IpAddr),
}

/// What a forward does with a matching connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// DNAT to `addr`, to `port` or keeping the listen port when `None`.
    Dnat {
        addr: IpAddr,
        port: Option<u16>,
        snat: Snat,
    },
    /// REDIRECT to a local port.
    Redirect { port: u16 },
}

/// A validated forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub name: String,
    pub family: Family,
    pub protos: Vec<Proto>,
    pub listen_port: PortRange,
    pub listen_address: Option<IpAddr>,
    pub in_interface: Option<String>,
    pub sources: Vec<Cidr>,
    pub action: Action,
    pub local: bool,
    pub allow_forward: bool,
    pub reset_connections: bool,
}

impl Forward {
    /// The port range the backend receives on.
    pub fn backend_ports(&self) -> PortRange {
        match self.action {
            Action::Dnat { port: Some(p), .. } => PortRange::single(p),
            Action::Redirect { port } => PortRange::single(port),
            Action::Dnat { port: None, .. } => self.listen_port,
        }
    }

    /// DNAT to 127.0.0.0/8 (needs route_localnet for traffic from other hosts).
    pub fn dnats_to_loopback(&self) -> bool {
        matches!(self.action, Action::Dnat { addr: IpAddr::V4(a), .. } if a.is_loopback())
    }

    /// Does this forward route packets between interfaces (so it needs ip_forward)?
    pub fn needs_forwarding(&self) -> bool {
        matches!(self.action, Action::Dnat { .. })
    }
}

/// A validated masquerade entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masquerade {
    pub name: String,
    pub source: Cidr,
    pub out_interface: Option<String>,
    pub to_source: Option<IpAddr>,
    pub allow_forward: bool,
}

impl Masquerade {
    pub fn family(&self) -> Family {
        self.source.family()
    }
}

/// The whole validated desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub state: State,
    pub instance: String,
    pub ip_forward: IpForward,
    pub backend: Backend,
    pub forwards: Vec<Forward>,
    pub masquerades: Vec<Masquerade>,
    pub addresses: Vec<Address>,
    pub policy_routes: Vec<PolicyRoute>,
    pub persist: bool,
    pub route_protocol: u8,
    /// The conntrack mark bit of forwarded flows (exactly one bit set).
    pub conn_mark: u32,
    /// The params as `persist: true` stores them (None when not persisting).
    pub persisted: Option<String>,
}

/// Options the caller passes next to the params (Ansible's `_ansible_*` keys or CLI flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunMode {
    pub check: bool,
    pub diff: bool,
}

impl Config {
    /// Parses and validates params JSON. Top-level `_ansible_*` keys are read for the run mode
    /// and otherwise ignored, including ones unknown today.
    pub fn from_json(input: &str) -> Result<(Config, Params, RunMode), Error> {
        let mut value: Value = serde_json::from_str(input)
            .map_err(|e| Error::Invalid(vec![format!("params are not valid JSON: {e}")]))?;
        let Value::Object(map) = &mut value else {
            return Err(Error::Invalid(vec![
                "params must be a JSON object".to_string()
            ]));
        };
        let flag = |map: &serde_json::Map<String, Value>, key: &str| {
            matches!(map.get(key), Some(Value::Bool(true)))
        };
        let mode = RunMode {
            check: flag(map, "_ansible_check_mode"),
            diff: flag(map, "_ansible_diff"),
        };
        map.retain(|k, _| !k.starts_with("_ansible_"));
        let params: Params = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                Error::Invalid(vec![inner.to_string()])
            } else {
                Error::Invalid(vec![format!("{path}: {inner}")])
            }
        })?;
        let config = params.validate()?;
        Ok((config, params, mode))
    }
}

impl Params {
    /// Checks every field and returns the typed config, or every problem found.
    pub fn validate(&self) -> Result<Config, Error> {
        let mut errors = Errors::default();
        if !valid_token(&self.instance, 12, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
        }) {
            errors.push(
                "instance",
                &self.instance,
                "must match [a-z0-9-]{1,12}".into(),
            );
        }
        let mut names = HashSet::new();
        let forwards = self
            .forwards
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let path = format!("forwards[{i}]");
                if !names.insert(f.name.as_str()) {
                    errors.push(
                        &format!("{path}.name"),
                        &f.name,
                        "is a duplicate name".into(),
                    );
                }
                validate_forward(&path, f, &mut errors)
            })
            .collect();
        let mut names = HashSet::new();
        let masquerades = self
            .masquerade
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let path = format!("masquerade[{i}]");
                if !names.insert(m.name.as_str()) {
                    errors.push(
                        &format!("{path}.name"),
                        &m.name,
                        "is a duplicate name".into(),
                    );
                }
                validate_masquerade(&path, m, &mut errors)
            })
            .collect();
        let addresses = validate_addresses(&self.addresses, &mut errors);
        let policy_routes = validate_policy_routes(&self.policy_routes, &mut errors);
        let route_protocol = match self.route_protocol {
            Some(p) if p <= 4 => {
                errors.push(
                    "route_protocol",
                    &p.to_string(),
                    "is reserved by the kernel (use 5-255)".into(),
                );
                0
            }
            Some(p) => p,
            None => default_route_protocol(&self.instance),
        };
        let conn_mark = match &self.conn_mark {
            None => DEFAULT_CONN_MARK,
            Some(v) => match parse_conn_mark(v, &mut errors) {
                Some(bit) if bit.is_power_of_two() => bit,
                Some(bit) => {
                    errors.push(
                        "conn_mark",
                        &format!("{bit:#x}"),
                        "must be exactly one bit (a power of two, like 0x2000)".into(),
                    );
                    DEFAULT_CONN_MARK
                }
                None => DEFAULT_CONN_MARK,
            },
        };
        errors.finish()?;
        Ok(Config {
            state: self.state,
            instance: self.instance.clone(),
            ip_forward: self.ip_forward,
            backend: self.backend,
            forwards,
            masquerades,
            addresses,
            policy_routes,
            persist: self.persist,
            route_protocol,
            conn_mark,
            persisted: (self.persist && self.state == State::Present)
                .then(|| serde_json::to_string_pretty(self).unwrap_or_default()),
        })
    }
}

/// Collected validation errors, each `path: "value" reason`.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn push(&mut self, path: &str, value: &str, reason: String) {
        // Debug formatting escapes quotes, newlines and NULs, so the message itself stays one line.
        self.0.push(format!("{path}: {value:?} {reason}"));
    }

    fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(self.0))
        }
    }
}

fn valid_token(text: &str, max: usize, allowed: impl Fn(char) -> bool) -> bool {
    !text.is_empty() && text.len() <= max && text.chars().all(allowed)
}

fn valid_name(name: &str) -> bool {
    valid_token(name, 32, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
    })
}

/// Linux interface names: at most 15 bytes, no slash or whitespace; we also refuse anything
/// outside `[A-Za-z0-9_.-]` (plus iptables' trailing `+` wildcard) so no shell or restore
/// metacharacter can ever reach a payload.
fn valid_interface(name: &str) -> bool {
    let body = name.strip_suffix('+').unwrap_or(name);
    valid_token(body, 15, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
    }) && body != "."
        && body != ".."
}

fn parse_ip(path: &str, text: &str, errors: &mut Errors) -> Option<IpAddr> {
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            let hint = if text.chars().any(|c| c.is_ascii_alphabetic()) && !text.contains(':') {
                " (hostnames are refused: DNS at apply time is not idempotent)"
            } else {
                ""
            };
            errors.push(path, text, format!("is not an IP address{hint}"));
            None
        }
    }
}

fn parse_cidr(path: &str, text: &str, errors: &mut Errors) -> Option<Cidr> {
    match Cidr::parse(text) {
        Ok(c) => Some(c),
        Err(CidrError::Syntax) => {
            errors.push(path, text, "is not an IP address or CIDR".into());
            None
        }
        Err(CidrError::Prefix) => {
            errors.push(path, text, "has an invalid prefix length".into());
            None
        }
        Err(CidrError::HostBits(net)) => {
            errors.push(
                path,
                text,
                format!("has host bits set (did you mean {net}?)"),
            );
            None
        }
    }
}

fn parse_port_number(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p >= 1)
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_port_value(path: &str, value: &Value, errors: &mut Errors) -> Option<u16> {
    let port = match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|p| *p >= 1),
        Value::String(s) => parse_port_number(s),
        _ => None,
    };
    if port.is_none() {
        errors.push(path, &value_text(value), "is not a port (1-65535)".into());
    }
    port
}

fn parse_port_range(path: &str, value: &Value, errors: &mut Errors) -> Option<PortRange> {
    if let Value::String(s) = value {
        if let Some((a, b)) = s.split_once('-') {
            let range = parse_port_number(a)
                .zip(parse_port_number(b))
                .map(|(first, last)| PortRange { first, last });
            return match range {
                Some(r) if r.first <= r.last => Some(r),
                Some(_) => {
                    errors.push(
                        path,
                        s,
                        "is a reversed range (first port above last)".into(),
                    );
                    None
                }
                None => {
                    errors.push(path, s, "is not a port range FIRST-LAST (1-65535)".into());
                    None
                }
            };
        }
    }
    parse_port_value(path, value, errors).map(PortRange::single)
}

/// Parses `IP:PORT`, `[IPv6]:PORT`, `IP` or `[IPv6]`.
fn parse_target(path: &str, text: &str, errors: &mut Errors) -> Option<(IpAddr, Option<u16>)> {
    let (addr_text, port_text) = if let Some(rest) = text.strip_prefix('[') {
        match rest.split_once(']') {
            Some((a, "")) => (a, None),
            Some((a, p)) if p.starts_with(':') => (a, Some(&p[1..])),
            _ => {
                errors.push(path, text, "is not IP:PORT, [IPv6]:PORT or IP".into());
                return None;
            }
        }
    } else if text.matches(':').count() == 1 {
        let (a, p) = text.split_once(':')?;
        (a, Some(p))
    } else {
        (text, None)
    };
    let addr = parse_ip(path, addr_text, errors)?;
    if text.starts_with('[') && addr.is_ipv4() {
        errors.push(path, text, "uses brackets around an IPv4 address".into());
        return None;
    }
    let port = match port_text {
        None => None,
        Some(p) => match parse_port_number(p) {
            Some(p) => Some(p),
            None => {
                errors.push(path, text, "has an invalid port (1-65535)".into());
                return None;
            }
        },
    };
    Some((addr, port))
}

fn check_interface(path: &str, name: &Option<String>, errors: &mut Errors) {
    if let Some(name) = name {
        if name == "all" || name == "default" {
            errors.push(
                path,
                name,
                "is not an interface: `all` and `default` name every interface in sysctl paths (conf/all, conf/default)".into(),
            );
        } else if !valid_interface(name) {
            errors.push(
                path,
                name,
                "is not an interface name ([A-Za-z0-9_.-], at most 15 characters, optional trailing +)"
                    .into(),
            );
        }
    }
}

/// Records the family each address implies and reports the first one that disagrees.
struct FamilyCheck<'a> {
    path: &'a str,
    seen: Option<(Family, String)>,
}

impl FamilyCheck<'_> {
    fn note(&mut self, field: &str, family: Family, errors: &mut Errors, value: &str) {
        match &self.seen {
            None => self.seen = Some((family, field.to_string())),
            Some((f, first)) if *f != family => errors.push(
                &format!("{}.{field}", self.path),
                value,
                format!(
                    "is {} but {first} is {}: one entry cannot mix address families",
                    family.label(),
                    f.label()
                ),
            ),
            Some(_) => {}
        }
    }
}

fn validate_forward(path: &str, f: &ForwardParams, errors: &mut Errors) -> Option<Forward> {
    let before = errors.0.len();
    if !valid_name(&f.name) {
        errors.push(
            &format!("{path}.name"),
            &f.name,
            "must match [A-Za-z0-9_.-]{1,32}".into(),
        );
    }
    let listen_port = parse_port_range(&format!("{path}.listen_port"), &f.listen_port, errors);
    let mut families = FamilyCheck { path, seen: None };
    let listen_address = f.listen_address.as_ref().and_then(|a| {
        let ip = parse_ip(&format!("{path}.listen_address"), a, errors)?;
        families.note("listen_address", Family::of(&ip), errors, a);
        Some(ip)
    });
    check_interface(&format!("{path}.in_interface"), &f.in_interface, errors);
    let mut sources = Vec::new();
    for (j, s) in f.sources.iter().enumerate() {
        if let Some(c) = parse_cidr(&format!("{path}.sources[{j}]"), s, errors) {
            families.note(&format!("sources[{j}]"), c.family(), errors, s);
            if sources.contains(&c) {
                errors.push(&format!("{path}.sources[{j}]"), s, "is listed twice".into());
            }
            sources.push(c);
        }
    }
    // `0.0.0.0/0` (or `::/0`) lets everyone in, which is what no `sources` says: iptables
    // prints no `-s` for it, so keeping it would make `show` disagree with the params.
    if sources.iter().any(|c| c.prefix == 0) {
        sources.clear();
    }
    let action = match (&f.to, &f.redirect_to_port) {
        (Some(_), Some(_)) => {
            errors.push(
                &format!("{path}.to"),
                f.to.as_deref().unwrap_or_default(),
                "and redirect_to_port are exclusive: give exactly one".into(),
            );
            None
        }
        (None, None) => {
            errors.0.push(format!(
                "{path}: one of `to` or `redirect_to_port` is required"
            ));
            None
        }
        (Some(to), None) => {
            let target = parse_target(&format!("{path}.to"), to, errors);
            if let Some((addr, _)) = target {
                families.note("to", Family::of(&addr), errors, to);
            }
            let snat = match f.snat.as_deref() {
                None | Some("masquerade") => Some(Snat::Masquerade),
                Some("none") => Some(Snat::None),
                Some(ip) => parse_ip(&format!("{path}.snat"), ip, errors).map(|ip| {
                    families.note("snat", Family::of(&ip), errors, &ip.to_string());
                    Snat::To(ip)
                }),
            };
            target
                .zip(snat)
                .map(|((addr, port), snat)| Action::Dnat { addr, port, snat })
        }
        (None, Some(port)) => {
            if let Some(snat) = &f.snat {
                errors.push(
                    &format!("{path}.snat"),
                    snat,
                    "applies only to `to` forwards, not to redirect_to_port".into(),
                );
            }
            parse_port_value(&format!("{path}.redirect_to_port"), port, errors)
                .map(|port| Action::Redirect { port })
        }
    };
    if errors.0.len() != before {
        return None;
    }
    let protos = match f.proto {
        ProtoParam::Tcp => vec![Proto::Tcp],
        ProtoParam::Udp => vec![Proto::Udp],
        ProtoParam::Both => vec![Proto::Tcp, Proto::Udp],
    };
    Some(Forward {
        name: f.name.clone(),
        family: families.seen.map_or(Family::V4, |(f, _)| f),
        protos,
        listen_port: listen_port?,
        listen_address,
        in_interface: f.in_interface.clone(),
        sources,
        action: action?,
        local: f.local,
        allow_forward: f.allow_forward,
        reset_connections: f.reset_connections,
    })
}

fn validate_masquerade(
    path: &str,
    m: &MasqueradeParams,
    errors: &mut Errors,
) -> Option<Masquerade> {
    let before = errors.0.len();
    if !valid_name(&m.name) {
        errors.push(
            &format!("{path}.name"),
            &m.name,
            "must match [A-Za-z0-9_.-]{1,32}".into(),
        );
    }
    let source = parse_cidr(&format!("{path}.source"), &m.source, errors);
    check_interface(&format!("{path}.out_interface"), &m.out_interface, errors);
    let to_source = m
        .to_source
        .as_ref()
        .and_then(|t| parse_ip(&format!("{path}.to_source"), t, errors));
    if let (Some(s), Some(t)) = (source, to_source) {
        if s.family() != Family::of(&t) {
            errors.push(
                &format!("{path}.to_source"),
                &t.to_string(),
                format!(
                    "is {} but source is {}: one entry cannot mix address families",
                    Family::of(&t).label(),
                    s.family().label()
                ),
            );
        }
    }
    if errors.0.len() != before {
        return None;
    }
    Some(Masquerade {
        name: m.name.clone(),
        source: source?,
        out_interface: m.out_interface.clone(),
        to_source,
        allow_forward: m.allow_forward,
    })
}

/// 200-249, from the instance name: stable across runs and releases (FNV-1a).
pub fn default_route_protocol(instance: &str) -> u8 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in instance.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    200 + (hash % 50) as u8
}

/// An interface address: `ADDR/LEN` with host bits allowed (that is the point of it).
fn parse_interface_address(path: &str, text: &str, errors: &mut Errors) -> Option<(IpAddr, u8)> {
    let Some((a, p)) = text.split_once('/') else {
        errors.push(
            path,
            text,
            "needs a prefix length, like 10.10.10.10/24".into(),
        );
        return None;
    };
    let addr = parse_ip(path, a, errors)?;
    match p.parse::<u8>() {
        Ok(prefix)
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && prefix <= Family::of(&addr).host_prefix() =>
        {
            Some((addr, prefix))
        }
        _ => {
            errors.push(path, text, "has an invalid prefix length".into());
            None
        }
    }
}

fn validate_addresses(list: &[AddressParams], errors: &mut Errors) -> Vec<Address> {
    let mut out: Vec<Address> = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let path = format!("addresses[{i}]");
        let before = errors.0.len();
        let parsed = parse_interface_address(&format!("{path}.address"), &a.address, errors);
        check_interface(&format!("{path}.dev"), &Some(a.dev.clone()), errors);
        if a.dev.ends_with('+') {
            errors.push(
                &format!("{path}.dev"),
                &a.dev,
                "must name one interface, not a wildcard".into(),
            );
        }
        if let Some(label) = &a.label {
            let ok = label.starts_with(a.dev.as_str())
                && valid_token(label, 15, |c| {
                    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':')
                });
            if !ok {
                errors.push(&format!("{path}.label"), label, "must start with the device name and use [A-Za-z0-9_.:-], at most 15 characters (like eth0:1)".into());
            }
            if parsed.is_some_and(|(addr, _)| addr.is_ipv6()) {
                errors.push(
                    &format!("{path}.label"),
                    label,
                    "applies to IPv4 addresses only".into(),
                );
            }
        }
        if errors.0.len() != before {
            continue;
        }
        let Some((addr, prefix)) = parsed else {
            continue;
        };
        if out.iter().any(|o| o.addr == addr && o.dev == a.dev) {
            errors.push(
                &format!("{path}.address"),
                &a.address,
                "is listed twice on the same device".into(),
            );
            continue;
        }
        out.push(Address {
            addr,
            prefix,
            dev: a.dev.clone(),
            // The kernel labels an address with its device name by default: the same thing.
            label: a.label.clone().filter(|l| *l != a.dev),
        });
    }
    out
}

fn parse_u32(path: &str, value: &Value, what: &str, errors: &mut Errors) -> Option<u32> {
    let n = match value {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s)
            if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok()
        }
        _ => None,
    };
    if n.is_none() {
        errors.push(path, &value_text(value), format!("is not {what}"));
    }
    n
}

fn parse_mark_number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 8 => u32::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty()
            && text.len() <= 10
            && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            text.parse().ok()
        }
        None => None,
    }
}

fn parse_conn_mark(value: &Value, errors: &mut Errors) -> Option<u32> {
    let bit = match value {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => parse_mark_number(s),
        _ => None,
    };
    if bit.is_none() {
        errors.push(
            "conn_mark",
            &value_text(value),
            "is not a mark bit (8192 or \"0x2000\")".into(),
        );
    }
    bit
}

fn parse_fwmark(path: &str, value: &Value, errors: &mut Errors) -> Option<(u32, u32)> {
    let mark = match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|m| (m, u32::MAX)),
        Value::String(s) => match s.split_once('/') {
            Some((m, k)) => parse_mark_number(m).zip(parse_mark_number(k)),
            None => parse_mark_number(s).map(|m| (m, u32::MAX)),
        },
        _ => None,
    };
    if mark.is_none() {
        errors.push(
            path,
            &value_text(value),
            "is not a firewall mark (16, \"0x10\" or \"0x10/0xff\")".into(),
        );
    }
    mark
}

fn validate_policy_routes(list: &[PolicyRouteParams], errors: &mut Errors) -> Vec<PolicyRoute> {
    let mut out: Vec<PolicyRoute> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let path = format!("policy_routes[{i}]");
        let before = errors.0.len();
        let mut families = FamilyCheck {
            path: &path,
            seen: None,
        };
        let from = parse_cidr(&format!("{path}.from"), &p.from, errors);
        if let Some(c) = from {
            families.note("from", c.family(), errors, &p.from);
        }
        // An all-zero `to` selects everything: the kernel stores it as no selector at all.
        let to = p.to.as_ref().and_then(|t| {
            let c = parse_cidr(&format!("{path}.to"), t, errors)?;
            families.note("to", c.family(), errors, t);
            (c.prefix != 0).then_some(c)
        });
        let table = parse_u32(
            &format!("{path}.table"),
            &p.table,
            "a routing table (1-4294967295)",
            errors,
        )
        .and_then(|t| {
            if t == 0 || (253..=255).contains(&t) {
                errors.push(
                    &format!("{path}.table"),
                    &t.to_string(),
                    "is reserved (0 unspec, 253 default, 254 main, 255 local)".into(),
                );
                None
            } else {
                Some(t)
            }
        });
        let priority = p.priority.as_ref().and_then(|v| {
            let n = parse_u32(
                &format!("{path}.priority"),
                v,
                "a rule priority (1-32765)",
                errors,
            )?;
            if (1..=32765).contains(&n) {
                Some(n)
            } else {
                errors.push(
                    &format!("{path}.priority"),
                    &n.to_string(),
                    "is outside 1-32765 (0 is the local table's rule, 32766+ main and default)"
                        .into(),
                );
                None
            }
        });
        let fwmark = p
            .fwmark
            .as_ref()
            .and_then(|v| parse_fwmark(&format!("{path}.fwmark"), v, errors));
        check_interface(&format!("{path}.iif"), &p.iif, errors);
        let mut routes: Vec<Route> = Vec::new();
        for (j, r) in p.routes.iter().enumerate() {
            let rpath = format!("{path}.routes[{j}]");
            let dest = if r.to == "default" {
                Some(None)
            } else {
                parse_cidr(&format!("{rpath}.to"), &r.to, errors).map(Some)
            };
            if let Some(Some(c)) = dest {
                families.note(&format!("routes[{j}].to"), c.family(), errors, &r.to);
            }
            // `0.0.0.0/0` and `::/0` are the default route: the kernel shows them as such.
            let dest = dest.map(|d| d.filter(|c| c.prefix != 0));
            let via = r.via.as_ref().and_then(|v| {
                let ip = parse_ip(&format!("{rpath}.via"), v, errors)?;
                families.note(&format!("routes[{j}].via"), Family::of(&ip), errors, v);
                Some(ip)
            });
            check_interface(&format!("{rpath}.dev"), &r.dev, errors);
            if r.via.is_none() && r.dev.is_none() {
                errors
                    .0
                    .push(format!("{rpath}: needs `via`, `dev` or both"));
            }
            if let Some(to) = dest {
                if routes.iter().any(|o| o.to == to) {
                    errors.push(
                        &format!("{rpath}.to"),
                        &r.to,
                        "is listed twice in this table".into(),
                    );
                }
                routes.push(Route {
                    to,
                    via,
                    dev: r.dev.clone(),
                });
            }
        }
        if errors.0.len() != before {
            continue;
        }
        let (Some(from), Some(table)) = (from, table) else {
            continue;
        };
        let family = families.seen.map_or(Family::V4, |(f, _)| f);
        let entry = PolicyRoute {
            family,
            from,
            to,
            table,
            priority,
            fwmark,
            iif: p.iif.clone(),
            routes,
        };
        for other in &out {
            if other.table == entry.table && other.family == entry.family {
                for r in &entry.routes {
                    if other.routes.iter().any(|o| o.to == r.to && o != r) {
                        errors.0.push(format!("{path}.routes: a different route to {} in table {} is already given by another entry", r.to.map_or("default".to_string(), |c| c.to_string()), entry.table));
                    }
                }
            }
            if (
                other.family,
                other.from,
                other.to,
                other.table,
                other.priority,
                other.fwmark,
                &other.iif,
            ) == (
                entry.family,
                entry.from,
                entry.to,
                entry.table,
                entry.priority,
                entry.fwmark,
                &entry.iif,
            ) {
                errors
                    .0
                    .push(format!("{path}: the same rule is listed twice"));
            }
        }
        out.push(entry);
    }
    out
}

/// The JSON Schema of [`Params`], for `portfwd schema`.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Params)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

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
        r#"{"forwards":[{"name":"a","listen_port":0,"to":"1.2.3.4"}]}"#,
        r#"forwards[0].listen_port: "0" is not a port (1-65535)"#
    )]
    #[case(
        r#"{"forwards":[{"name":"a","listen_port":65536,"to":"1.2.3.4"}]}"#,
        r#"forwards[0].listen_port: "65536" is not a port"#
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
    #[case(r#"{"forwards":[{"name":"a","listen_port":1,"to":"1.2.3.4","in_interface":"eth0;reboot"}]}"#, r#"forwards[0].in_interface: "eth0;reboot" is not an interface name"#)]
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
        "one of `to` or `redirect_to_port` is required"
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
        r#"{"ip_forward":"yes"}"#,
        "ip_forward: \"yes\" is not one of true, false, \"auto\""
    )]
    #[case(
        r#"{"masquerade":[{"name":"m","source":"192.168.0.1/24"}]}"#,
        "masquerade[0].source"
    )]
    #[case(
        r#"{"masquerade":[{"name":"m","source":"192.168.0.0/24","to_source":"::1"}]}"#,
        "cannot mix"
    )]
    #[case(r#"[1]"#, "params must be a JSON object")]
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
        "policy_routes[0].table: \"254\" is reserved"
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
    #[case(r#"{"route_protocol":3}"#, "route_protocol: \"3\" is reserved")]
    #[case(r#"{"#, "params are not valid JSON")]
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
                let shown = path
                    .iter()
                    .enumerate()
                    .fold(String::new(), |acc, (i, k)| match k.parse::<usize>() {
                        Ok(n) => format!("{acc}[{n}]"),
                        Err(_) if i == 0 => k.to_string(),
                        Err(_) => format!("{acc}.{k}"),
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
        assert_eq!(f.backend_ports().to_string(), "8000:8100");
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
}
