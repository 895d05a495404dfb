//! Command-line surface: flags, subcommands, and dispatch to the agent or the client.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// blx: run microVMs on a fleet of machines.
#[derive(Parser, Debug)]
#[command(name = "blx", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Every `blx` subcommand.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run an agent in the foreground. With an empty data dir and no token it bootstraps a new
    /// cluster and prints a join token.
    Agent(AgentArgs),
    /// Run an agent that joins the cluster TOKEN names (found by --seed or on the LAN by mDNS).
    Join {
        /// A join token from `blx token create` or from the first agent's output.
        #[arg(value_name = "TOKEN")]
        join_token: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// List the cluster's members as this agent sees them.
    Members {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Make the agent leave the cluster gracefully and stop.
    Leave {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage API tokens: scoped credentials for the HTTP API and the CLI on other machines.
    #[command(subcommand, name = "api-token")]
    ApiToken(ApiTokenCommand),
    /// Read the audit log: who changed what, and when.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show the Raft group: leader, term, indexes, voters and learners.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Read and write the replicated key/value namespace.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Read and change the cluster config (versioned, with rollback).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Operator actions on the Raft group.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Create, inspect and control microVMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// List nodes and change how they are scheduled.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Build guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `blx token ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Create a join token and print it alone on stdout.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// How long the token admits nodes: 90s, 15m, 1h, 7d (at most a year).
        #[arg(long, default_value = "24h", value_parser = blx::duration::parse_ttl)]
        ttl: std::time::Duration,
    },
    /// List join tokens (ids and status; secrets are never stored).
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke a join token by id.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// The token id (16 hex digits, from `blx token list`).
        id: String,
    },
}

/// `blx audit ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Print this node's latest audit records as JSON lines; with --follow, keep printing new
    /// ones. Records are written by the node that was leader when the command was proposed.
    Tail {
        #[command(flatten)]
        api: ApiArgs,
        /// How many of the latest records to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Keep printing records as they are written (until interrupted).
        #[arg(long, short)]
        follow: bool,
    },
}

/// `blx api-token ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum ApiTokenCommand {
    /// Create an API token and print it alone on stdout (it is shown only this once).
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// Who or what it is for (1 to 64 of A-Z a-z 0-9 - _ . @).
        #[arg(long)]
        name: String,
        /// What it allows: read; write (also keys and VMs); operator (everything).
        #[arg(long, value_parser = parse_scope)]
        scope: blx_consensus::access::Scope,
        /// How long it works: 90s, 15m, 1h, 30d (at most a year).
        #[arg(long, default_value = "30d", value_parser = blx::duration::parse_ttl)]
        ttl: std::time::Duration,
    },
    /// List API tokens (ids, names, scopes and status; secrets are never stored).
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke an API token by id: every member refuses it from then on.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// The token id (16 hex digits, from `blx api-token list`).
        id: String,
    },
}

fn parse_scope(s: &str) -> Result<blx_consensus::access::Scope, String> {
    s.parse()
}

/// `blx kv ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum KvCommand {
    /// Set KEY to VALUE (or to standard input with `-`).
    Put {
        #[command(flatten)]
        api: ApiArgs,
        /// The key.
        key: String,
        /// The value; `-` reads standard input.
        value: String,
        /// Only if the key's modify index is INDEX (0: only if absent).
        #[arg(long, value_name = "INDEX")]
        cas: Option<u64>,
    },
    /// Print KEY's value.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// The key.
        key: String,
        /// Read this agent's copy instead of a linearizable read through the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Delete KEY.
    Del {
        #[command(flatten)]
        api: ApiArgs,
        /// The key.
        key: String,
        /// Only if the key's modify index is INDEX.
        #[arg(long, value_name = "INDEX")]
        cas: Option<u64>,
    },
    /// List keys under PREFIX.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// The prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Read this agent's copy.
        #[arg(long)]
        stale: bool,
    },
}

/// `blx config ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// Print the current config (JSON).
    Get {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace the config with a JSON document (a file, or `-` for standard input), or change
    /// single fields with --desired-voters and friends.
    Set {
        #[command(flatten)]
        api: ApiArgs,
        /// JSON config file, or `-`.
        file: Option<String>,
        /// Voters the autopilot keeps (odd).
        #[arg(long)]
        desired_voters: Option<u8>,
        /// Seconds a voter may be down before it is replaced.
        #[arg(long)]
        voter_grace_secs: Option<u64>,
        /// Seconds a learner must be healthy before promotion.
        #[arg(long)]
        stabilization_secs: Option<u64>,
        /// Seconds a down node keeps its VMs before they are placed elsewhere.
        #[arg(long)]
        vm_grace_secs: Option<u64>,
        /// Standby learners kept beside the voters; every other node is a client.
        #[arg(long)]
        standby_servers: Option<u8>,
        /// Placement strategy.
        #[arg(long, value_enum)]
        scheduler: Option<StrategyArg>,
    },
    /// Print every kept version.
    History {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Restore the previous version.
    Rollback {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `blx operator ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum OperatorCommand {
    /// Hand leadership to another voter (by default, any other voter).
    TransferLeader {
        #[command(flatten)]
        api: ApiArgs,
        /// The voter to hand over to (16 hex digits, from `blx status`).
        #[arg(long)]
        to: Option<String>,
    },
    /// Save or restore the replicated state.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `blx operator snapshot ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum SnapshotCommand {
    /// Write the cluster's state (KV and config) to FILE.
    Save {
        #[command(flatten)]
        api: ApiArgs,
        /// Where to write it.
        file: PathBuf,
    },
    /// Replace the cluster's KV and config with those saved in FILE.
    Restore {
        #[command(flatten)]
        api: ApiArgs,
        /// A file from `blx operator snapshot save`.
        file: PathBuf,
    },
}

/// `blx vm ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum VmCommand {
    /// Create a VM; the cluster places and starts it. Prints it as created.
    Create(VmCreateArgs),
    /// Create a VM and wait until it runs (or fails), then print it.
    Run(VmCreateArgs),
    /// List VMs.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show one VM.
    Show(VmNameArgs),
    /// Print the tail of a VM's serial console.
    Logs {
        #[command(flatten)]
        vm: VmNameArgs,
        /// How many bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// Stop a VM (it keeps its definition; `start` starts it again).
    Stop(VmNameArgs),
    /// Start a stopped VM.
    Start(VmNameArgs),
    /// Pause a VM's vCPUs.
    Pause(VmNameArgs),
    /// Resume a paused VM.
    Resume(VmNameArgs),
    /// Delete a VM; its node stops it.
    Delete(VmNameArgs),
}

/// A VM by name.
#[derive(Args, Debug, Clone)]
pub(crate) struct VmNameArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// The VM's name.
    pub(crate) name: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
}

/// Flags of `blx vm create` and `blx vm run`.
#[derive(Args, Debug, Clone)]
pub(crate) struct VmCreateArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Unique name: a-z, 0-9, '-', '_', '.'.
    pub(crate) name: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub(crate) vcpus: u32,
    /// Guest memory: 256MiB, 1GiB.
    #[arg(long, default_value = "256MiB", value_parser = blx::size::parse_size)]
    pub(crate) memory: u64,
    /// Guest image (qemu); `default` is built by scripts/build-image.sh.
    #[arg(long, conflicts_with = "kernel")]
    pub(crate) image: Option<String>,
    /// Kernel to boot instead of an image (absolute path on the nodes).
    #[arg(long)]
    pub(crate) kernel: Option<String>,
    /// Initramfs for --kernel.
    #[arg(long, requires = "kernel")]
    pub(crate) initrd: Option<String>,
    /// Extra kernel command line.
    #[arg(long)]
    pub(crate) cmdline: Option<String>,
    /// The driver (default: process when a command follows `--`, else qemu).
    #[arg(long, value_enum)]
    pub(crate) driver: Option<DriverArg>,
    /// The line that means "ready" on the console (default: the image's).
    #[arg(long)]
    pub(crate) ready_marker: Option<String>,
    /// How long the VM may take to become ready.
    #[arg(long, default_value = "60s", value_parser = blx::duration::parse_ttl)]
    pub(crate) boot_timeout: std::time::Duration,
    /// VM label `key=value` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// Hard constraint on node labels: `key=value`, `key!=value`, `key in a,b`, `key`, `!key`.
    #[arg(long = "constraint", value_name = "EXPR")]
    pub(crate) constraints: Vec<String>,
    /// Soft preference: a constraint with an optional `:weight` (-100 to 100).
    #[arg(long = "prefer", value_name = "EXPR[:WEIGHT]")]
    pub(crate) preferences: Vec<String>,
    /// Priority 0 to 1000; a higher one may preempt lower ones when nothing fits.
    #[arg(long, default_value_t = 0)]
    pub(crate) priority: u16,
    /// Anti-affinity group: VMs of one group land on different nodes.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Spread the group across zones.
    #[arg(long)]
    pub(crate) spread_zones: bool,
    /// What to do when the VM exits.
    #[arg(long, value_enum, default_value_t = RestartArg::Always)]
    pub(crate) restart: RestartArg,
    /// How long `run` waits for the VM to run.
    #[arg(long, default_value = "120s", value_parser = blx::duration::parse_ttl)]
    pub(crate) wait: std::time::Duration,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    /// The command the process driver runs, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}

/// `--scheduler`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum StrategyArg {
    /// Fill nodes before using empty ones.
    Binpack,
    /// Prefer the emptiest node.
    Spread,
}

/// `--driver`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum DriverArg {
    /// QEMU microvm.
    Qemu,
    /// A plain process.
    Process,
}

/// `--restart`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum RestartArg {
    /// Whatever the exit.
    Always,
    /// After a failure only.
    OnFailure,
    /// Never.
    Never,
}

/// `blx node ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum NodeCommand {
    /// List nodes with capacity, allocation and scheduling flags.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Move every VM off a node, and place nothing new on it.
    Drain(NodeRefArgs),
    /// Place nothing new on a node.
    Cordon(NodeRefArgs),
    /// Undo cordon and drain.
    Uncordon(NodeRefArgs),
    /// Remove a node for good: its certificate is revoked on every member (it can come back
    /// only with an empty data dir and a new join token), and its VMs move elsewhere.
    Remove(NodeRefArgs),
    /// Set or remove operator labels on a node.
    Label {
        #[command(flatten)]
        node: NodeRefArgs,
        /// `key=value` to set.
        #[arg(value_name = "KEY=VALUE", value_parser = parse_label)]
        set: Vec<(String, String)>,
        /// Label key to remove (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
}

/// A node by id or name.
#[derive(Args, Debug, Clone)]
pub(crate) struct NodeRefArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Node id (16 hex digits) or name.
    pub(crate) node: String,
}

/// `blx image ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum ImageCommand {
    /// Build the default guest image (Debian's cloud kernel and a busybox initramfs).
    Build {
        /// Where to put it (default: $BLX_IMAGE_DIR/default or ~/.cache/blx/images/default).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// How to print results.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Where the agent's HTTP API is, and how to prove who is asking.
#[derive(Args, Debug, Clone)]
pub(crate) struct ApiArgs {
    /// The agent's HTTP API address. Loopback: plain HTTP; beyond: HTTPS, checked against
    /// the cluster CA.
    #[arg(long, env = "BLX_API", default_value = "127.0.0.1:7947")]
    pub(crate) api: SocketAddr,
    /// API token (from `blx api-token create`). Default: the local token in the data dir.
    #[arg(long, env = "BLX_API_TOKEN", hide_env_values = true)]
    pub(crate) api_token: Option<String>,
    /// The agent's data dir, for its local API token and CA certificate.
    #[arg(long, env = "BLX_DATA_DIR", default_value = "/var/lib/blx")]
    pub(crate) data_dir: PathBuf,
    /// The cluster CA certificate (PEM) to check an HTTPS API against (default: the data
    /// dir's ca.crt).
    #[arg(long, env = "BLX_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
}

/// Flags of `blx agent` and `blx join`.
#[derive(Args, Debug, Clone)]
pub(crate) struct AgentArgs {
    /// A TOML file with any of these flags as keys (`bind = "0.0.0.0:7946"`, `label = ["zone=a"]`).
    /// Flags win over `BLX_*` variables, which win over the file.
    #[arg(long, env = "BLX_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Print the effective configuration (as a config file) and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Where the agent keeps its identity, certificates and state.
    #[arg(long, env = "BLX_DATA_DIR", default_value = "/var/lib/blx")]
    pub(crate) data_dir: PathBuf,
    /// UDP address of the QUIC endpoint (gossip and cluster traffic).
    #[arg(long, env = "BLX_BIND", default_value = "0.0.0.0:7946")]
    pub(crate) bind: SocketAddr,
    /// Address other nodes reach this one at, when --bind is a wildcard (default: the first
    /// non-loopback IPv4 address).
    #[arg(long, env = "BLX_ADVERTISE")]
    pub(crate) advertise: Option<SocketAddr>,
    /// HTTP API address. Beyond loopback it speaks HTTPS with this node's certificate;
    /// every request but /v1/health and /v1/ready needs a token either way.
    #[arg(long, env = "BLX_API", default_value = "127.0.0.1:7947")]
    pub(crate) api: SocketAddr,
    /// Node name (default: the host name).
    #[arg(long, env = "BLX_NAME")]
    pub(crate) name: Option<String>,
    /// Gossip address of a member to join through (repeatable).
    #[arg(
        long = "seed",
        value_name = "IP:PORT",
        env = "BLX_SEEDS",
        value_delimiter = ','
    )]
    pub(crate) seeds: Vec<SocketAddr>,
    /// Join token, for a data dir that has not joined yet.
    #[arg(long, env = "BLX_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Node label `key=value` (repeatable); `zone=...` sets the failure zone.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, env = "BLX_LABELS", value_delimiter = ',')]
    pub(crate) labels: Vec<(String, String)>,
    /// Do not announce or browse over mDNS.
    #[arg(long, env = "BLX_NO_MDNS")]
    pub(crate) no_mdns: bool,
    /// Ask for an API token (read scope) on `GET /v1/metrics` too; by default it answers
    /// anyone who can reach the API, as etcd's `/metrics` does.
    #[arg(long, env = "BLX_METRICS_NEED_TOKEN")]
    pub(crate) metrics_need_token: bool,
    /// Take a Raft snapshot (and purge the log before it) every this many applied entries.
    #[arg(long, env = "BLX_RAFT_SNAPSHOT_LOGS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
    pub(crate) raft_snapshot_logs: u64,
    /// How long a fresh cluster's first join token is valid.
    #[arg(long, env = "BLX_BOOTSTRAP_TOKEN_TTL", default_value = "24h", value_parser = blx::duration::parse_ttl)]
    pub(crate) bootstrap_token_ttl: std::time::Duration,
    /// How long the node certificates this agent signs are valid; nodes renew theirs two
    /// thirds of the way through.
    #[arg(long, env = "BLX_CERT_VALIDITY", default_value = "30d", value_parser = blx::duration::parse_ttl)]
    pub(crate) cert_validity: std::time::Duration,
    /// vCPUs this node offers to VMs (default: the host's).
    #[arg(long, env = "BLX_VCPUS", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) vcpus: Option<u32>,
    /// Memory this node offers to VMs: 512MiB, 8GiB (default: the host's).
    #[arg(long, env = "BLX_MEMORY", value_parser = blx::size::parse_size)]
    pub(crate) memory: Option<u64>,
    /// Folder of named guest images (default: $BLX_IMAGE_DIR or ~/.cache/blx/images).
    #[arg(long, env = "BLX_IMAGE_DIR")]
    pub(crate) image_dir: Option<PathBuf>,
    /// QEMU acceleration: probe KVM with a test boot and fall back to TCG (auto), or force one.
    #[arg(long, env = "BLX_ACCEL", value_enum, default_value_t = AccelArg::Auto)]
    pub(crate) accel: AccelArg,
    /// Threads for the agent's async work (default 1: one event loop, which spends the least
    /// CPU per request). More spread API and Raft work over cores, at the cost of handing
    /// each request between them. RocksDB, log syncs and VMs have threads of their own.
    #[arg(long, env = "BLX_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) threads: Option<u16>,
}

impl AgentArgs {
    /// The agent's configuration from these flags; a token that does not parse is refused
    /// here, the rest by [`blx::AgentConfig::validate`].
    pub(crate) fn into_config(self) -> anyhow::Result<blx::AgentConfig> {
        let token = self
            .token
            .as_deref()
            .map(str::parse::<blx_membership::token::JoinToken>)
            .transpose()?;
        let mut config = blx::AgentConfig::new(self.data_dir);
        config.bind = self.bind;
        config.advertise = self.advertise;
        config.api = self.api;
        config.name = self.name;
        config.seeds = self.seeds;
        config.token = token;
        config.labels = self.labels.into_iter().collect();
        config.mdns = !self.no_mdns;
        config.metrics_need_token = self.metrics_need_token;
        config.raft_snapshot_logs = self.raft_snapshot_logs;
        config.bootstrap_token_ttl = self.bootstrap_token_ttl;
        config.cert_validity = self.cert_validity;
        config.vcpus = self.vcpus;
        config.memory_bytes = self.memory;
        if let Some(dir) = self.image_dir {
            config.image_dir = dir;
        }
        config.accel = self.accel.into();
        config.validate()?;
        Ok(config)
    }
}

impl Command {
    /// The async worker threads this command asks for, if it says.
    pub(crate) fn threads(&self) -> Option<usize> {
        match self {
            Command::Agent(a) | Command::Join { agent: a, .. } => a.threads.map(usize::from),
            _ => None,
        }
    }
}

/// `--accel`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum AccelArg {
    /// KVM when a probe boot works, TCG otherwise.
    Auto,
    /// KVM.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl From<AccelArg> for blx_vmm::qemu::Accel {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => blx_vmm::qemu::Accel::Auto,
            AccelArg::Kvm => blx_vmm::qemu::Accel::Kvm,
            AccelArg::Tcg => blx_vmm::qemu::Accel::Tcg,
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    blx_membership::meta::parse_label(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
