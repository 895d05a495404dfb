//! `blx agent --config FILE`: a TOML file whose keys are the agent's flags, without the
//! dashes in front (`bind = "0.0.0.0:7946"`, `seed = ["10.0.0.1:7946"]`, `no-mdns = true`).
//! A flag given on the command line wins, then its `BLX_*` variable, then the file, then the
//! default. Every value in the file goes through the same parser as the flag's, so it is
//! refused for the same reasons, and the error names the file and the key.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::args::{AgentArgs, Cli};

/// Flags that make no sense in the file itself.
const NOT_IN_FILE: [&str; 4] = ["config", "print-config", "help", "version"];

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigFileError {
    /// The file cannot be read.
    #[error("config file {file}: {reason}")]
    Unreadable {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// The file is not TOML.
    #[error("config file {file} is not valid TOML: {reason}")]
    Syntax {
        /// The file.
        file: String,
        /// The parser's message.
        reason: String,
    },
    /// One key is unknown, of the wrong type, or has a bad value.
    #[error("config file {file}: key `{key}`: {reason}")]
    Key {
        /// The file.
        file: String,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The agent's flags as the `agent` subcommand defines them.
fn agent_command() -> clap::Command {
    Cli::command()
        .find_subcommand("agent")
        .cloned()
        .expect("blx has an agent subcommand")
}

/// The command-line words that say what `value` of TOML says for flag `long`.
fn words(long: &str, action: &ArgAction, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let flag = OsString::from(format!("--{long}"));
    let scalar = |v: &toml::Value| -> Result<OsString, String> {
        match v {
            toml::Value::String(s) => Ok(s.into()),
            toml::Value::Integer(i) => Ok(i.to_string().into()),
            other => Err(format!(
                "expected a string or an integer, not {}",
                other.type_str()
            )),
        }
    };
    match action {
        ArgAction::SetTrue => match value {
            toml::Value::Boolean(true) => Ok(vec![flag]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("expected true or false, not {}", other.type_str())),
        },
        ArgAction::Append => {
            let items = match value {
                toml::Value::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            let mut out = Vec::new();
            for item in items {
                out.push(flag.clone());
                out.push(scalar(item)?);
            }
            Ok(out)
        }
        _ => match value {
            toml::Value::Array(_) => Err("expected one value, not a list".into()),
            v => Ok(vec![flag, scalar(v)?]),
        },
    }
}

/// Parses `agent` with these words alone, as clap would from a command line, but blind to
/// `BLX_*` variables: what comes from the file must be judged on its own.
fn parse(words: Vec<OsString>) -> Result<ArgMatches, clap::Error> {
    let argv = ["blx".into(), "agent".into()].into_iter().chain(words);
    Cli::command()
        .mut_subcommand("agent", |agent| {
            let ids: Vec<clap::Id> = agent.get_arguments().map(|a| a.get_id().clone()).collect();
            ids.into_iter().fold(agent, |agent, id| {
                agent.mut_arg(id, |a| a.env(None::<&str>))
            })
        })
        .try_get_matches_from(argv)
        .map(|m| m.subcommand_matches("agent").cloned().unwrap_or_default())
}

/// The reason in a clap error, without its usage text.
fn reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_string()
}

/// Reads `file` and returns the agent flags it sets, parsed, with the matches that say which.
fn load(file: &Path) -> Result<(AgentArgs, ArgMatches), ConfigFileError> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| ConfigFileError::Unreadable {
        file: name.clone(),
        reason: e.to_string(),
    })?;
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                file: name.clone(),
                reason: e.message().to_string(),
            })?;
    let command = agent_command();
    let key_error = |key: &str, reason: String| ConfigFileError::Key {
        file: name.clone(),
        key: key.to_string(),
        reason,
    };
    let mut all = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| {
                let known: Vec<&str> = command
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| !NOT_IN_FILE.contains(l))
                    .collect();
                key_error(
                    key,
                    format!("unknown key; the keys are {}", known.join(", ")),
                )
            })?;
        let these = words(key, arg.get_action(), value).map_err(|r| key_error(key, r))?;
        // Each key alone first, parsed and validated, so a refusal names the key that
        // caused it.
        let alone = parse(these.clone()).map_err(|e| key_error(key, reason(&e)))?;
        AgentArgs::from_arg_matches(&alone)
            .map_err(|e| key_error(key, reason(&e)))?
            .into_config()
            .map_err(|e| key_error(key, format!("{e:#}")))?;
        all.extend(these);
    }
    let matches = parse(all).map_err(|e| ConfigFileError::Syntax {
        file: name.clone(),
        reason: reason(&e),
    })?;
    let args = AgentArgs::from_arg_matches(&matches).map_err(|e| ConfigFileError::Syntax {
        file: name,
        reason: reason(&e),
    })?;
    Ok((args, matches))
}

/// Whether the operator set flag `id` on the command line or through its variable.
fn explicit(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Fills every flag the operator did not set from the config file, if there is one.
pub(crate) fn apply(args: &mut AgentArgs, matches: &ArgMatches) -> Result<(), ConfigFileError> {
    let Some(file) = args.config.clone() else {
        return Ok(());
    };
    let (from_file, in_file) = load(&file)?;
    macro_rules! layer {
        ($($field:ident),* $(,)?) => {$(
            if !explicit(matches, stringify!($field))
                && in_file.value_source(stringify!($field)) == Some(ValueSource::CommandLine)
            {
                args.$field = from_file.$field.clone();
            }
        )*};
    }
    layer!(
        data_dir,
        bind,
        advertise,
        api,
        name,
        seeds,
        token,
        labels,
        no_mdns,
        metrics_need_token,
        raft_snapshot_logs,
        bootstrap_token_ttl,
        cert_validity,
        vcpus,
        memory,
        image_dir,
        accel,
        threads,
    );
    Ok(())
}

/// The effective configuration as a config file (the join token left out).
pub(crate) fn render(args: &AgentArgs) -> String {
    use toml::Value;
    let mut t = toml::Table::new();
    let mut put = |k: &str, v: Value| {
        t.insert(k.into(), v);
    };
    let text = |s: String| Value::String(s);
    put("data-dir", text(args.data_dir.display().to_string()));
    put("bind", text(args.bind.to_string()));
    if let Some(a) = args.advertise {
        put("advertise", text(a.to_string()));
    }
    put("api", text(args.api.to_string()));
    if let Some(n) = &args.name {
        put("name", text(n.clone()));
    }
    put(
        "seed",
        Value::Array(args.seeds.iter().map(|s| text(s.to_string())).collect()),
    );
    put(
        "label",
        Value::Array(
            args.labels
                .iter()
                .map(|(k, v)| text(format!("{k}={v}")))
                .collect(),
        ),
    );
    put("no-mdns", Value::Boolean(args.no_mdns));
    put(
        "metrics-need-token",
        Value::Boolean(args.metrics_need_token),
    );
    put(
        "raft-snapshot-logs",
        Value::Integer(i64::try_from(args.raft_snapshot_logs).unwrap_or(i64::MAX)),
    );
    put(
        "bootstrap-token-ttl",
        text(format!("{}s", args.bootstrap_token_ttl.as_secs())),
    );
    put(
        "cert-validity",
        text(format!("{}s", args.cert_validity.as_secs())),
    );
    if let Some(v) = args.vcpus {
        put("vcpus", Value::Integer(i64::from(v)));
    }
    if let Some(m) = args.memory {
        put("memory", text(format!("{m}B")));
    }
    if let Some(d) = &args.image_dir {
        put("image-dir", text(d.display().to_string()));
    }
    put(
        "accel",
        text(
            clap::ValueEnum::to_possible_value(&args.accel)
                .map(|p| p.get_name().to_string())
                .unwrap_or_default(),
        ),
    );
    if let Some(n) = args.threads {
        put("threads", Value::Integer(i64::from(n)));
    }
    let mut out = String::from("# blx agent: effective configuration\n");
    if args.token.is_some() {
        out.push_str("# token: set, not shown\n");
    }
    out.push_str(&toml::to_string(&t).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blx.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn refusal(text: &str) -> String {
        let (_dir, path) = write(text);
        load(&path).unwrap_err().to_string()
    }

    #[test]
    fn a_file_sets_what_flags_set() {
        let (_dir, path) = write(
            "bind = \"127.0.0.1:9000\"\nseed = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nlabel = \"zone=a\"\nno-mdns = true\nvcpus = 2\ncert-validity = \"7d\"\n",
        );
        let (args, _) = load(&path).unwrap();
        assert_eq!(args.bind.port(), 9000);
        assert_eq!(args.seeds.len(), 2);
        assert_eq!(args.labels, vec![("zone".to_string(), "a".to_string())]);
        assert!(args.no_mdns);
        assert_eq!(args.vcpus, Some(2));
        assert_eq!(args.cert_validity.as_secs(), 7 * 86400);
    }

    #[test]
    fn bad_files_are_refused_with_the_file_the_key_and_the_reason() {
        let e = refusal("bindd = \"127.0.0.1:1\"\n");
        assert!(
            e.contains("blx.toml") && e.contains("`bindd`") && e.contains("unknown key"),
            "{e}"
        );
        let e = refusal("bind = 5\n");
        assert!(e.contains("`bind`") && e.contains("invalid"), "{e}");
        let e = refusal("bind = \"nowhere\"\n");
        assert!(e.contains("`bind`") && e.contains("nowhere"), "{e}");
        let e = refusal("no-mdns = \"yes\"\n");
        assert!(
            e.contains("`no-mdns`") && e.contains("true or false"),
            "{e}"
        );
        let e = refusal("vcpus = 0\n");
        assert!(e.contains("`vcpus`"), "{e}");
        let e = refusal("api = [\"127.0.0.1:1\"]\n");
        assert!(e.contains("`api`") && e.contains("not a list"), "{e}");
        let e = refusal("config = \"other.toml\"\n");
        assert!(e.contains("`config`"), "{e}");
        let e = refusal("bind = \n");
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn rendered_configuration_reads_back_the_same() {
        let (_dir, path) = write("name = \"n1\"\nlabel = [\"zone=b\"]\nmemory = \"2GiB\"\n");
        let (args, _) = load(&path).unwrap();
        let (_dir2, again) = write(&render(&args));
        let (back, _) = load(&again).unwrap();
        assert_eq!(render(&back), render(&args));
        assert_eq!(back.memory, Some(2 << 30));
    }
}
