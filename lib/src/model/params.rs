//! The params exactly as the user writes them: serde wire types with `deny_unknown_fields`,
//! and the JSON Schema `portfwd schema` prints. Nothing here checks values; see
//! [`super::validate`].

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::tools::Backend;

use super::spelling::{bool_schema, boolean_of, de_bool, de_opt_u8, u8_schema};

/// Whether the instance's objects should exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Present,
    Absent,
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

/// How a pool picks the backend of a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each new connection picks a backend with probability weight / sum of weights.
    #[default]
    Random,
    /// Weighted and exact: over every sum-of-weights new connections each backend gets its
    /// weight.
    RoundRobin,
    /// A client address always reaches the same backend while the pool is unchanged; adding
    /// or removing one backend of N moves about 1/N of the clients.
    SourceHash,
}

impl Balance {
    pub fn name(self) -> &'static str {
        match self {
            Balance::Random => "random",
            Balance::RoundRobin => "round-robin",
            Balance::SourceHash => "source-hash",
        }
    }
}

fn is_random(b: &Balance) -> bool {
    *b == Balance::Random
}

/// One backend of a pool as written by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendParams {
    /// `IP:PORT`, `[IPv6]:PORT`, or `IP` (keeps the listen port).
    pub to: String,
    /// 0-1000 (default 1): the backend's share of new connections; 0 drains it (no new
    /// connections, its open ones continue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "weight_schema")]
    pub weight: Option<Value>,
}

fn persistence_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "seconds of client affinity, 1-86400",
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 86400},
            {"type": "string", "pattern": "^\\s*\\+?[0-9]{1,5}\\s*$"}
        ]
    })
}

fn weight_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "a weight 0-1000 (default 1; 0 drains the backend)",
        "oneOf": [
            {"type": "integer", "minimum": 0, "maximum": 1000},
            {"type": "string", "pattern": "^\\s*\\+?[0-9]{1,4}\\s*$"}
        ]
    })
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
        let value = Value::deserialize(d)?;
        match (&value, boolean_of(&value)) {
            (_, Some(true)) => Ok(IpForward::On),
            (_, Some(false)) => Ok(IpForward::Off),
            (Value::String(s), None) if s.trim().eq_ignore_ascii_case("auto") => {
                Ok(IpForward::Auto)
            }
            _ => Err(serde::de::Error::custom(format!(
                "{value} is not one of true, false, \"auto\""
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
            "oneOf": [
                {"type": "boolean"},
                {"const": "auto"},
                {"type": "string", "pattern": "^\\s*([yY]([eE][sS])?|[nN][oO]?|[oO][nN]|[oO][fF][fF]|[tT]([rR][uU][eE])?|[fF]([aA][lL][sS][eE])?|[01])\\s*$"},
                {"type": "integer", "enum": [0, 1]}
            ],
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
            {"type": "string", "pattern": "^\\s*\\+?[0-9]{1,5}\\s*$"}
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
    /// `iptables` (default: the flavour installed), `iptables-nft`, `iptables-legacy`, or
    /// `nftables` (a table of the instance's own). `auto`, `nft` and `legacy` still work, with a
    /// deprecation warning. Applying with another backend than the one holding the instance
    /// moves it.
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
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "de_bool"
    )]
    #[schemars(schema_with = "bool_schema", extend("default" = false))]
    pub persist: bool,
    /// Protocol number that marks this instance's ip rules and routes (default: derived from
    /// the instance name, in 200-249). 0-4 are reserved by the kernel.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_u8"
    )]
    #[schemars(schema_with = "u8_schema")]
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
pub(crate) const DEFAULT_CONN_MARK: u32 = 0x2000;

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
            backend: Backend::Iptables,
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
    /// A pool instead of one `to` (any backend): 1-256 backends of one address
    /// family, each `{"to": ..., "weight": 0-1000}`, all with a port or none; `balance` says
    /// how a new connection picks one. Weight 0 drains a backend: no new connections, its open
    /// ones continue. At least one weight must be above 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendParams>,
    /// How a pool picks a backend: `random` (default), `round-robin`, `source-hash` (only
    /// with `backend: nftables`).
    #[serde(default, skip_serializing_if = "is_random")]
    #[schemars(extend("default" = "random"))]
    pub balance: Balance,
    /// Client affinity of a `random` or `round-robin` pool, in seconds (1-86400): a client
    /// address that opened a connection through the forward within that time (each new
    /// connection restarts it) reaches the backend it reached then, while that backend is live.
    /// The iptables backends only for now (`backend: nftables` refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "persistence_schema")]
    pub persistence: Option<Value>,
    /// REDIRECT to this local port instead of DNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "port_schema")]
    pub redirect_to_port: Option<Value>,
    /// `masquerade` (default for `to`), `none` (backend sees the client), or an IP for SNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    /// Also forward connections made on this host (nat OUTPUT).
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "de_bool"
    )]
    #[schemars(schema_with = "bool_schema", extend("default" = false))]
    pub local: bool,
    /// Accept the flow and its replies in filter FORWARD (needed when its policy is DROP).
    #[serde(
        default = "default_true",
        skip_serializing_if = "is_true",
        deserialize_with = "de_bool"
    )]
    #[schemars(schema_with = "bool_schema", extend("default" = true))]
    pub allow_forward: bool,
    /// When the forward changes or goes away, also cut its open TCP connections (their
    /// conntrack entries are deleted); by default they finish on the old target. UDP flows
    /// always follow the change.
    #[serde(
        default,
        skip_serializing_if = "is_false",
        deserialize_with = "de_bool"
    )]
    #[schemars(schema_with = "bool_schema", extend("default" = false))]
    pub reset_connections: bool,
    /// Findings about this entry the operator has judged and wants silenced (`reply_bypass`,
    /// ...): apply no longer warns about them and doctor lists them as ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ignore_findings_schema")]
    pub ignore_findings: Vec<String>,
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
    #[serde(
        default = "default_true",
        skip_serializing_if = "is_true",
        deserialize_with = "de_bool"
    )]
    #[schemars(schema_with = "bool_schema", extend("default" = true))]
    pub allow_forward: bool,
    /// Findings about this entry to silence (see the forwards' `ignore_findings`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ignore_findings_schema")]
    pub ignore_findings: Vec<String>,
}

fn ignore_findings_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "ids of findings about this entry to silence",
        "type": "array",
        "items": {"enum": super::config::ENTRY_FINDINGS},
        "uniqueItems": true
    })
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

/// The JSON Schema of [`Params`], for `portfwd schema`.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Params)).unwrap_or(Value::Null)
}
