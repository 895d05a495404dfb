//! The `blx` binary: parse arguments, set up logging, run one command, map its error to an
//! exit code. The agent is the `blx` library, started here in the real world; the argument
//! parser and the client commands live beside this file.

mod args;
mod client;
mod client_vms;
mod config_file;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// Rust's allocations go to mimalloc rather than the C library's malloc, whose allocating
/// and freeing of each request's small buffers took 8% of a busy leader's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = args::Cli::command().get_matches();
    let mut cli = match args::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The agent's flags, filled in from its config file where the operator set none.
    let agent = match &mut cli.command {
        args::Command::Agent(a) => matches.subcommand_matches("agent").map(|m| (a, m)),
        args::Command::Join { agent, .. } => matches.subcommand_matches("join").map(|m| (agent, m)),
        _ => None,
    };
    if let Some((agent, m)) = agent {
        if let Err(e) = config_file::apply(agent, m) {
            eprintln!("blx: {e}");
            return ExitCode::from(2);
        }
        if agent.print_config {
            if let Err(e) = agent.clone().into_config() {
                eprintln!("blx: {e:#}");
                return ExitCode::from(2);
            }
            print!("{}", config_file::render(agent));
            return ExitCode::SUCCESS;
        }
    }
    if matches!(
        cli.command,
        args::Command::Agent(_) | args::Command::Join { .. }
    ) {
        // Everything the agent creates is its own: RocksDB's files hold the replicated CA
        // and token hashes, and RocksDB creates them with the process's umask.
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
    // One event loop by default: a write's dozen hand-offs between tasks then stay on one
    // thread instead of waking another core for each (docs/benchmarks.md measures the
    // difference). RocksDB, the leader's log syncs, VM supervision and telemetry export keep
    // threads of their own either way.
    let mut builder = match cli.command.threads() {
        Some(n) if n > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blx: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = std::env::var("BLX_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| "warn,blx=info,openraft=error".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Only the agent exports telemetry; a client command just logs.
    let exports = matches!(
        cli.command,
        args::Command::Agent(_) | args::Command::Join { .. }
    );
    let logging = {
        let _in_runtime = runtime.enter();
        if exports {
            blx::telemetry::init(&filter, ansi)
        } else {
            blx::telemetry::init_local(&filter, ansi)
        }
    };
    if let Err(e) = logging {
        eprintln!("blx: {e}");
        return ExitCode::from(2);
    }
    let outcome = runtime.block_on(run(cli));
    // Hand over what is still queued, within a few seconds, before the process ends.
    blx::telemetry::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blx: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

async fn run(cli: args::Cli) -> anyhow::Result<()> {
    match cli.command {
        args::Command::Agent(args) => blx::run(args.into_config()?, blx::World::real()).await,
        args::Command::Join {
            join_token,
            mut agent,
        } => {
            agent.token = Some(join_token);
            blx::run(agent.into_config()?, blx::World::real()).await
        }
        args::Command::Members { api, output } => client::members(&api, output).await,
        args::Command::Leave { api } => client::leave(&api).await,
        args::Command::Token(args::TokenCommand::Create { api, ttl }) => {
            client::token_create(&api, ttl).await
        }
        args::Command::Token(args::TokenCommand::List { api, output }) => {
            client::token_list(&api, output).await
        }
        args::Command::Token(args::TokenCommand::Revoke { api, id }) => {
            client::token_revoke(&api, &id).await
        }
        args::Command::ApiToken(args::ApiTokenCommand::Create {
            api,
            name,
            scope,
            ttl,
        }) => client::api_token_create(&api, &name, scope, ttl).await,
        args::Command::ApiToken(args::ApiTokenCommand::List { api, output }) => {
            client::api_token_list(&api, output).await
        }
        args::Command::ApiToken(args::ApiTokenCommand::Revoke { api, id }) => {
            client::api_token_revoke(&api, &id).await
        }
        args::Command::Status { api, output } => client::status(&api, output).await,
        args::Command::Audit(args::AuditCommand::Tail { api, lines, follow }) => {
            client::audit_tail(&api, lines, follow).await
        }
        args::Command::Kv(args::KvCommand::Put {
            api,
            key,
            value,
            cas,
        }) => client::kv_put(&api, &key, &value, cas).await,
        args::Command::Kv(args::KvCommand::Get { api, key, stale }) => {
            client::kv_get(&api, &key, stale).await
        }
        args::Command::Kv(args::KvCommand::Del { api, key, cas }) => {
            client::kv_del(&api, &key, cas).await
        }
        args::Command::Kv(args::KvCommand::List { api, prefix, stale }) => {
            client::kv_list(&api, &prefix, stale).await
        }
        args::Command::Config(args::ConfigCommand::Get { api }) => client::config_get(&api).await,
        args::Command::Config(args::ConfigCommand::Set {
            api,
            file,
            desired_voters,
            voter_grace_secs,
            stabilization_secs,
            vm_grace_secs,
            standby_servers,
            scheduler,
        }) => {
            let mut fields: Vec<(&str, serde_json::Value)> = Vec::new();
            if let Some(v) = desired_voters {
                fields.push(("desired_voters", v.into()));
            }
            if let Some(v) = voter_grace_secs {
                fields.push(("voter_grace_secs", v.into()));
            }
            if let Some(v) = stabilization_secs {
                fields.push(("stabilization_secs", v.into()));
            }
            if let Some(v) = vm_grace_secs {
                fields.push(("vm_grace_secs", v.into()));
            }
            if let Some(v) = standby_servers {
                fields.push(("standby_servers", v.into()));
            }
            if let Some(v) = scheduler {
                fields.push((
                    "scheduler",
                    match v {
                        args::StrategyArg::Binpack => "Binpack",
                        args::StrategyArg::Spread => "Spread",
                    }
                    .into(),
                ));
            }
            client::config_set(&api, file.as_deref(), &fields).await
        }
        args::Command::Config(args::ConfigCommand::History { api }) => {
            client::config_history(&api).await
        }
        args::Command::Config(args::ConfigCommand::Rollback { api }) => {
            client::config_rollback(&api).await
        }
        args::Command::Operator(args::OperatorCommand::TransferLeader { api, to }) => {
            client::transfer_leader(&api, to).await
        }
        args::Command::Operator(args::OperatorCommand::Snapshot(args::SnapshotCommand::Save {
            api,
            file,
        })) => client::snapshot_save(&api, &file).await,
        args::Command::Operator(args::OperatorCommand::Snapshot(
            args::SnapshotCommand::Restore { api, file },
        )) => client::snapshot_restore(&api, &file).await,
        args::Command::Vm(vm) => {
            use args::VmCommand as V;
            match vm {
                V::Create(a) => client_vms::vm_create(&a, false).await,
                V::Run(a) => client_vms::vm_create(&a, true).await,
                V::List { api, output } => client_vms::vm_list(&api, output).await,
                V::Show(a) => client_vms::vm_show(&a).await,
                V::Logs { vm, bytes } => client_vms::vm_logs(&vm, bytes).await,
                V::Stop(a) => client_vms::vm_action(&a, "stop").await,
                V::Start(a) => client_vms::vm_action(&a, "start").await,
                V::Pause(a) => client_vms::vm_action(&a, "pause").await,
                V::Resume(a) => client_vms::vm_action(&a, "resume").await,
                V::Delete(a) => client_vms::vm_delete(&a).await,
            }
        }
        args::Command::Node(node) => {
            use args::NodeCommand as N;
            match node {
                N::List { api, output } => client_vms::node_list(&api, output).await,
                N::Drain(a) => client_vms::node_action(&a, "drain").await,
                N::Cordon(a) => client_vms::node_action(&a, "cordon").await,
                N::Uncordon(a) => client_vms::node_action(&a, "uncordon").await,
                N::Remove(a) => client_vms::node_action(&a, "remove").await,
                N::Label { node, set, remove } => {
                    client_vms::node_label(&node, &set, &remove).await
                }
            }
        }
        args::Command::Image(args::ImageCommand::Build { out }) => {
            client_vms::image_build(out.as_deref())
        }
        args::Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <args::Cli as clap::CommandFactory>::command(),
                "blx",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// 3: the cluster refused us; 4: no agent or cluster could be reached; 1: anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(join) = e.downcast_ref::<blx_membership::join::JoinError>() {
        return match join {
            blx_membership::join::JoinError::Refused(
                blx_membership::token::JoinRefusal::NoQuorum,
            ) => 4,
            blx_membership::join::JoinError::Refused(_)
            | blx_membership::join::JoinError::WrongCluster(_) => 3,
            _ => 4,
        };
    }
    if e.downcast_ref::<client::Unreachable>().is_some() {
        return 4;
    }
    1
}
