//! The command line of `portfwd`, shared by the binary and by `portfwd-assets` (which renders
//! the man page and shell completions from it, so they cannot drift from `--help`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "portfwd",
    version,
    about = "Declarative NAT port forwarding for Linux: desired state in, minimal atomic change out",
    long_about = "Declarative NAT port forwarding for Linux: iptables NAT and FORWARD rules (or, with \
        backend nftables, a table of the instance's own, inet portfwd-<instance>, written with one nft -f \
        transaction), interface addresses, policy routing (ip rule / ip route) and forwarding sysctls.\n\n\
        Reads the current state (iptables-save, ip6tables-save, ip -j rule/route/addr, /proc/sys), diffs it \
        against the desired state given as JSON params, and applies the minimal change: ip -batch additions, \
        one iptables-restore --noflush transaction per table, sysctl writes, ip -batch removals, rolling \
        everything back if any step fails. After a committed change it deletes the conntrack entries the \
        change made stale (UDP flows; TCP connections of forwards with reset_connections), so live flows \
        follow the change. A run with nothing to change skips the iptables read while the nf_tables \
        ruleset generation proves it unchanged since the last full read. Other filters on the host (other \
        nftables tables, iptables-legacy) are read for warnings: a drop at the forward hook or a NAT rule \
        that takes a forward's port first.\n\n\
        As an Ansible binary module it is run as `portfwd ARGS_FILE`; ARGS_FILE holds the params plus \
        Ansible's _ansible_* keys (check and diff mode are honoured).\n\n\
        Exit codes: 0 success (changed or not), 1 the run failed (the JSON says failed: true and why), \
        2 usage error, or with plan --detailed-exitcode changes pending.",
    after_help = "Environment: PORTFWD_LOCK_FILE (default /run/portfwd.lock), PORTFWD_STATE_DIR (default /etc/portfwd), PORTFWD_RUN_DIR (default /run/portfwd: the record of what portfwd created), PORTFWD_NO_NETNS_COOKIE=1 (key that record as on kernels before 5.14), PORTFWD_PHASES=1 (a converging run's result also gives `phases`: its seconds per phase, for benchmarks). Tools are found on PATH (conntrack is optional: without it stale flows are only warned about)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Converge the host to the params (JSON from --file, or stdin) and print the result JSON.
    Apply {
        #[command(flatten)]
        input: Input,
        /// Report what would change without touching anything.
        #[arg(long)]
        check: bool,
        /// Include a before/after diff keyed by entry names.
        #[arg(long)]
        diff: bool,
    },
    /// Show what apply would change, as a readable diff (or the result JSON with --json).
    Plan {
        #[command(flatten)]
        input: Input,
        /// Print the result JSON (as `apply --check --diff`) instead of text.
        #[arg(long)]
        json: bool,
        /// Exit 2 when there are changes to apply (0: none, 1: an error), so CI can gate on
        /// drift (a usage error also exits 2, before anything is read).
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Print the instance's current managed state as params JSON (applying it is a no-op), in
    /// the installed order; exit 1, naming the instances there are, when the host has nothing
    /// of it.
    Show {
        /// The instance to read.
        #[arg(long, default_value = "portfwd")]
        instance: String,
        /// The backend holding the instance (`iptables` reads an nftables one too when its
        /// record says it moved there).
        #[arg(long, value_enum, default_value = "iptables")]
        backend: BackendArg,
        /// The instance's route_protocol, when it set one.
        #[arg(long)]
        route_protocol: Option<u8>,
    },
    /// List every instance on this host: its backend, entry counts, persist, and whether
    /// applying its stored params (or else its installed state) would change nothing.
    /// Found by the names portfwd reserves, the records and the stored params; changes nothing.
    List {
        /// Print `{"instances": [{"instance", "backend", "forwards", "masquerade", "addresses",
        /// "policy_routes", "persist", "converged", "compared_with", "msg"}]}`.
        #[arg(long)]
        json: bool,
        /// Where stored params are looked for [default: $PORTFWD_STATE_DIR or /etc/portfwd].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Re-apply every instance stored with `persist: true` (run at boot by portfwd-restore.service).
    Restore {
        /// Directory of stored params [default: $PORTFWD_STATE_DIR or /etc/portfwd].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds to wait for another portfwd run to finish.
        #[arg(long, default_value_t = 30)]
        lock_timeout: u64,
    },
    /// Find what keeps forwards from working (changes nothing): params from --file or stdin,
    /// else the instance's stored params, else what it has installed. Exit 1 when a finding is
    /// an error.
    Doctor {
        /// Params JSON file; else stdin when it is not a terminal.
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// Print `{"ok", "findings": [{"id", "severity", "entry", "msg", "fix"}], "ignored": [...]}`
        /// (`ignored`: what the params' `ignore_findings` silenced).
        #[arg(long)]
        json: bool,
        /// The instance to diagnose when no params are given.
        #[arg(long, default_value = "portfwd")]
        instance: String,
        /// Where stored params are looked for [default: $PORTFWD_STATE_DIR or /etc/portfwd].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Also connect from this host to every TCP backend (sends traffic).
        #[arg(long)]
        probe: bool,
    },
    /// Show the path of real packets through netfilter while you make a connection: a
    /// temporary nftables table marks matching packets for tracing, and every table, chain,
    /// rule and verdict they meet is printed (portfwd's rules labelled with their entry).
    /// Exit 0 when at least one packet was seen, 1 otherwise; the table is removed on exit,
    /// Ctrl-C and SIGTERM.
    Trace {
        /// tcp or udp.
        #[arg(long, value_parser = ["tcp", "udp"], required_unless_present = "clean")]
        proto: Option<String>,
        /// Destination port of the packets to trace.
        #[arg(long, required_unless_present = "clean")]
        dport: Option<u16>,
        /// Only packets from this source (CIDR).
        #[arg(long)]
        src: Option<String>,
        /// Only packets to this destination address.
        #[arg(long)]
        dst: Option<String>,
        /// Stop after this many packets.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// One JSON object per packet per line: {"packet", "summary", "hops": [{"table", "chain", "rule", "verdict", "entry"}], "nat", "verdict", "backend"} (backend: where the flow went, from conntrack; a pool's choice).
        #[arg(long)]
        json: bool,
        /// The instance whose entries label its rules.
        #[arg(long, default_value = "portfwd")]
        instance: String,
        /// Remove the tables of traces that died, and nothing else.
        #[arg(long)]
        clean: bool,
    },
    /// Print the JSON Schema of the params.
    Schema,
}

#[derive(Args)]
pub struct Input {
    /// Params JSON file; stdin when omitted.
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Seconds to wait for another portfwd run to finish.
    #[arg(long, default_value_t = 30)]
    pub lock_timeout: u64,
    /// Where `persist: true` stores params [default: $PORTFWD_STATE_DIR or /etc/portfwd].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// The backend whose state `show` reads (`auto`, `nft` and `legacy` are the old names).
#[derive(Clone, Copy, ValueEnum)]
pub enum BackendArg {
    #[value(alias = "auto")]
    Iptables,
    #[value(alias = "nft")]
    IptablesNft,
    #[value(alias = "legacy")]
    IptablesLegacy,
    Nftables,
}
