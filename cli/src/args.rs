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
        #[arg(long, default_value = "24h", value_parser = crate::duration::parse_ttl)]
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

/// How to print results.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Where the agent's HTTP API is.
#[derive(Args, Debug, Clone)]
pub(crate) struct ApiArgs {
    /// The agent's HTTP API address.
    #[arg(long, env = "BLX_API", default_value = "127.0.0.1:7947")]
    pub(crate) api: SocketAddr,
    /// Bearer token for an agent whose API listens beyond loopback.
    #[arg(long, env = "BLX_API_TOKEN", hide_env_values = true)]
    pub(crate) api_token: Option<String>,
}

/// Flags of `blx agent` and `blx join`.
#[derive(Args, Debug, Clone)]
pub(crate) struct AgentArgs {
    /// Where the agent keeps its identity, certificates and state.
    #[arg(long, env = "BLX_DATA_DIR", default_value = "/var/lib/blx")]
    pub(crate) data_dir: PathBuf,
    /// UDP address of the QUIC endpoint (gossip and cluster traffic).
    #[arg(long, default_value = "0.0.0.0:7946")]
    pub(crate) bind: SocketAddr,
    /// Address other nodes reach this one at, when --bind is a wildcard (default: the first
    /// non-loopback IPv4 address).
    #[arg(long)]
    pub(crate) advertise: Option<SocketAddr>,
    /// HTTP API address. Loopback unless --api-token is set.
    #[arg(long, default_value = "127.0.0.1:7947")]
    pub(crate) api: SocketAddr,
    /// Bearer token required by the HTTP API; needed when --api is not loopback.
    #[arg(long, env = "BLX_API_TOKEN", hide_env_values = true)]
    pub(crate) api_token: Option<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Gossip address of a member to join through (repeatable).
    #[arg(long = "seed", value_name = "IP:PORT")]
    pub(crate) seeds: Vec<SocketAddr>,
    /// Join token, for a data dir that has not joined yet.
    #[arg(long, env = "BLX_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Node label `key=value` (repeatable); `zone=...` sets the failure zone.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// Do not announce or browse over mDNS.
    #[arg(long)]
    pub(crate) no_mdns: bool,
    /// Take a Raft snapshot (and purge the log before it) every this many applied entries.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
    pub(crate) raft_snapshot_logs: u64,
    /// How long a fresh cluster's first join token is valid.
    #[arg(long, default_value = "24h", value_parser = crate::duration::parse_ttl)]
    pub(crate) bootstrap_token_ttl: std::time::Duration,
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
