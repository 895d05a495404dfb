//! `blx agent --config FILE`: a real agent runs from a file alone; flags win over `BLX_*`
//! variables, which win over the file; a bad file is refused with the file, the key and the
//! reason, before the data dir is touched.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use blx_tests::{blx_bin, subnet, wait_until};

/// `blx agent` with a clean environment: no `BLX_*` variable but those given.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(blx_bin());
    cmd.arg("agent").args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BLX_") && k != "BLX_BIN" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

fn print_config(file: &Path, args: &[&str], env: &[(&str, &str)]) -> toml_like::Table {
    let mut all = vec!["--config", file.to_str().unwrap(), "--print-config"];
    all.extend_from_slice(args);
    let out = agent(&all, env).output().unwrap();
    assert!(
        out.status.success(),
        "--print-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml_like::parse(&String::from_utf8_lossy(&out.stdout))
}

/// Just enough of TOML to read `--print-config` back: `key = value` lines, no tables.
mod toml_like {
    use std::collections::BTreeMap;

    pub(super) type Table = BTreeMap<String, String>;

    pub(super) fn parse(text: &str) -> Table {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (k, v) = l
                    .split_once(" = ")
                    .unwrap_or_else(|| panic!("not a key: {l}"));
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect()
    }
}

#[test]
fn flags_win_over_variables_which_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blx.toml");
    std::fs::write(
        &file,
        "bind = \"127.0.0.1:9101\"\napi = \"127.0.0.1:9102\"\nname = \"from-file\"\n\
         label = [\"zone=file\", \"rack=r1\"]\nvcpus = 3\n",
    )
    .unwrap();
    // The file alone.
    let t = print_config(&file, &[], &[]);
    assert_eq!(t["bind"], "\"127.0.0.1:9101\"");
    assert_eq!(t["name"], "\"from-file\"");
    assert_eq!(t["label"], "[\"zone=file\", \"rack=r1\"]");
    assert_eq!(t["vcpus"], "3");
    // What the file does not set keeps its default.
    assert_eq!(t["cert-validity"], format!("\"{}s\"", 30 * 86400));
    // A variable beats the file; a flag beats both.
    let t = print_config(
        &file,
        &["--bind", "127.0.0.1:9301", "--vcpus", "5"],
        &[
            ("BLX_BIND", "127.0.0.1:9201"),
            ("BLX_NAME", "from-env"),
            ("BLX_LABELS", "zone=env"),
        ],
    );
    assert_eq!(
        t["bind"], "\"127.0.0.1:9301\"",
        "flag over variable and file"
    );
    assert_eq!(t["vcpus"], "5", "flag over file");
    assert_eq!(t["name"], "\"from-env\"", "variable over file");
    assert_eq!(t["label"], "[\"zone=env\"]", "variable over file");
    assert_eq!(t["api"], "\"127.0.0.1:9102\"", "file over default");
    // BLX_CONFIG names the file as --config does.
    let out = agent(
        &["--print-config"],
        &[("BLX_CONFIG", file.to_str().unwrap())],
    )
    .output()
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-file"));
}

fn refused(text: &str, key: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let data = dir.path().join("data");
    std::fs::write(&file, text).unwrap();
    let out: Output = agent(
        &[
            "--config",
            file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{text:?} was not refused: {stderr}"
    );
    for part in [file.to_str().unwrap(), &format!("`{key}`"), reason] {
        assert!(
            stderr.contains(part),
            "{text:?}: expected {part:?} in: {stderr}"
        );
    }
    assert!(!data.exists(), "{text:?}: the data dir was created");
}

#[test]
fn a_bad_file_is_refused_with_the_file_the_key_and_the_reason() {
    refused("bnid = \"127.0.0.1:1\"\n", "bnid", "unknown key");
    refused(
        "no-mdns = \"yes\"\n",
        "no-mdns",
        "expected true or false, not string",
    );
    refused("vcpus = [1]\n", "vcpus", "not a list");
    refused(
        "bind = \"10.0.0.300:7946\"\n",
        "bind",
        "invalid socket address",
    );
    refused(
        "advertise = \"0.0.0.0:7946\"\n",
        "advertise",
        "concrete address",
    );
    refused(
        "cert-validity = \"soon\"\n",
        "cert-validity",
        "not a duration",
    );
    // A bad variable is refused by the flag's parser too, naming the flag.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = agent(
        &["--data-dir", data.to_str().unwrap()],
        &[("BLX_VCPUS", "zero")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus"));
    assert!(!data.exists(), "a bad variable created the data dir");
    let out = agent(
        &["--config", dir.path().join("none.toml").to_str().unwrap()],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.toml"));
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_agent_runs_from_its_config_file_alone() {
    let [a, b, c] = subnet();
    let ip = format!("{a}.{b}.{c}.1");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("blx.toml");
    std::fs::write(
        &file,
        format!(
            "data-dir = {data:?}\nbind = \"{ip}:7946\"\napi = \"{ip}:7947\"\n\
             name = \"configured\"\nno-mdns = true\nthreads = 1\nlabel = [\"zone=z9\"]\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let _agent = Running(
        agent(&["--config", file.to_str().unwrap()], &[])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let api: SocketAddr = format!("{ip}:7947").parse().unwrap();
    let members = || {
        Command::new(blx_bin())
            .args(["members", "--output", "json", "--api", &api.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    wait_until(
        Duration::from_secs(60),
        "the configured agent answers",
        || members().is_some(),
    );
    let table = members().unwrap();
    assert!(table.contains("\"configured\""), "{table}");
    assert!(table.contains("z9"), "{table}");
    assert!(
        data.join("api.token").exists(),
        "the data dir from the file is used"
    );
}

#[test]
fn the_example_config_in_dist_is_accepted() {
    // Where cargo runs the test from, not where the binary was built: a target dir shared by
    // two checkouts keeps a binary whose compiled-in path names the other one.
    let manifest = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let example = Path::new(&manifest).join("../dist/blx.toml");
    let t = print_config(&example, &[], &[]);
    assert_eq!(t["data-dir"], "\"/var/lib/blx\"");
    assert_eq!(t["image-dir"], "\"/var/lib/blx/images\"");
}
