//! Harness for blx integration tests: real `blx` processes on loopback addresses, driven
//! through the real CLI, with conditions awaited (never slept on).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `blx` binary under test: `$BLX_BIN`, or `blx` beside the test binary's target dir.
pub fn blx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BLX_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("blx");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p blx` first (make test does)",
        bin.display()
    );
    bin
}

/// A distinct 127.x.y.0/24 block per test, so tests can run in parallel on the same ports.
pub fn subnet() -> [u8; 3] {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    [127, 100 + (pid % 100) as u8, n]
}

/// A member as `blx members --output json` prints it.
#[derive(Debug, Clone, Deserialize)]
pub struct MemberView {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub addr: SocketAddr,
    /// alive, suspect, down or left.
    pub state: String,
    /// foca incarnation.
    pub incarnation: u16,
    /// Restart generation.
    pub generation: u64,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The tail of a `blx vm run` for a process VM that prints its readiness line and sleeps.
pub const SLEEPER: [&str; 8] = [
    "--ready-marker",
    "READY",
    "--wait",
    "60s",
    "--",
    "sh",
    "-c",
    "echo READY; exec sleep 600",
];

/// One agent process.
pub struct Agent {
    /// Its name.
    pub name: String,
    /// Gossip address.
    pub gossip: SocketAddr,
    /// HTTP API address.
    pub api: SocketAddr,
    /// Data dir.
    pub data_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// Environment variables the agent starts with, beyond the test's own.
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts `blx agent` with these extra arguments.
    pub fn start(root: &Path, name: &str, ip: Ipv4Addr, extra: &[String]) -> Agent {
        Agent::start_with_env(root, name, ip, extra, &[])
    }

    /// Starts `blx agent` with these extra arguments and environment variables.
    pub fn start_with_env(
        root: &Path,
        name: &str,
        ip: Ipv4Addr,
        extra: &[String],
        env: &[(String, String)],
    ) -> Agent {
        let data_dir = root.join(name);
        let gossip = SocketAddr::from((ip, 7946));
        let api = SocketAddr::from((ip, 7947));
        let log = root.join(format!("{name}.log"));
        let mut agent = Agent {
            name: name.into(),
            gossip,
            api,
            data_dir,
            child: None,
            log,
            env: env.to_vec(),
        };
        agent.spawn(extra);
        agent
    }

    fn spawn(&mut self, extra: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let out = self.log.with_extension("out");
        let child = Command::new(blx_bin())
            .arg("agent")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--bind")
            .arg(self.gossip.to_string())
            .arg("--api")
            .arg(self.api.to_string())
            .arg("--name")
            .arg(&self.name)
            .arg("--no-mdns")
            .args(extra)
            .env("BLX_LOG", "info,blx_membership=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(std::fs::File::create(out).expect("out file"))
            .stderr(log)
            .spawn()
            .expect("spawn blx agent");
        self.child = Some(child);
    }

    /// Runs a process VM named `name` through this agent (`blx vm run --wait`): a shell that
    /// prints its readiness line and sleeps. Panics if it does not come up.
    pub fn run_sleeper(&self, name: &str) {
        let mut args = vec!["vm", "run", name];
        args.extend_from_slice(&SLEEPER);
        let (ok, _, err) = self.run(&args);
        assert!(ok, "vm run {name}: {err}");
    }

    /// Restarts a stopped agent with the same data dir and no token.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Restarts a stopped agent with the same data dir, no token and these flags.
    pub fn restart_with(&mut self, extra: &[String]) {
        assert!(self.child.is_none(), "agent {} still running", self.name);
        self.spawn(extra);
    }

    /// Processes running a workload (QEMU or a process-driver command) of this agent's VMs:
    /// found by this agent's data dir in their command line or environment.
    pub fn workload_pids(&self) -> Vec<u32> {
        workload_pids(&self.data_dir)
    }

    /// `blx vm show NAME -o json`, or None if the agent does not answer or has no such VM.
    pub fn vm(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.cli(&["vm", "show", name, "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `blx vm list -o json`.
    pub fn vms(&self) -> Option<Vec<serde_json::Value>> {
        let out = self.cli(&["vm", "list", "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// What the agent printed on stdout (the bootstrap token).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let exited = self.child.as_mut().is_some_and(|c| exits_within(c, within));
        if exited {
            self.child = None;
        }
        exited
    }

    /// Runs a `blx` client command against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        // `--api` goes before a `--` that starts a workload's command.
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        Command::new(blx_bin())
            .args(&args[..split])
            .arg("--api")
            .arg(self.api.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&args[split..])
            .stdin(Stdio::null())
            .output()
            .expect("run blx")
    }

    /// The member table, or None if the agent does not answer.
    pub fn members(&self) -> Option<Vec<MemberView>> {
        let out = self.cli(&["members", "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The state this agent reports for `name`, if it lists it.
    pub fn state_of(&self, name: &str) -> Option<String> {
        self.members()?
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| m.state)
    }

    /// `blx status -o json`, or None if the agent does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.cli(&["status", "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Runs a `blx` client command and returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.cli(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The local API token this agent wrote at its last start.
    pub fn local_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("api.token"))
            .expect("the agent's local API token")
            .trim()
            .to_string()
    }

    /// One raw request to this agent's API with its local token.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        http(self.api, Some(&self.local_token()), method, path, body)
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Creates a token through this agent's API.
    pub fn token(&self, ttl: &str) -> String {
        let out = self.cli(&["token", "create", "--ttl", ttl]);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        // VMs outlive their agent by design (the next agent adopts them); a test's do not.
        kill_workloads(&self.data_dir);
    }
}

/// One raw HTTP/1.1 request to `addr`, with `token` as its bearer token if given; returns the
/// status code and the body. For feeding the API what the CLI would never send.
pub fn http(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the API");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: blx\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("send");
    conn.write_all(body).expect("send");
    let mut raw = Vec::new();
    if let Err(e) = conn.read_to_end(&mut raw) {
        // A server that answers without reading the whole body resets the connection as it
        // closes it; an answer read before the reset stands.
        assert!(
            e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty(),
            "read: {e}"
        );
    }
    // Binary bodies (a snapshot) come back lossily as text; callers look at JSON and status.
    let reply = String::from_utf8_lossy(&raw).into_owned();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Processes whose command line or environment names `dir`: the workloads of the agent whose
/// data dir it is.
pub fn workload_pids(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.to_string_lossy().trim_end_matches('/'));
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let has = |b: &[u8]| String::from_utf8_lossy(b).contains(&needle);
            // The agent itself names its data dir too; workloads are the others.
            let agent = String::from_utf8_lossy(&cmdline).contains("--data-dir");
            !agent && (has(&cmdline) || has(&environ))
        })
        .collect()
}

/// SIGKILLs every workload of the agent whose data dir is `dir`, with its process group.
pub fn kill_workloads(dir: &Path) {
    for pid in workload_pids(dir) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether `child` exits by itself within `within`; it is left running if not.
pub fn exits_within(child: &mut std::process::Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 50 ms until it holds, or panics after `within` with `what`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster of agents under one temporary directory.
pub struct Cluster {
    /// The agents, first is the bootstrap agent.
    pub agents: Vec<Agent>,
    /// The bootstrap token.
    pub token: String,
    net: [u8; 3],
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// Root of all data dirs (kept on failure for inspection when BLX_KEEP is set).
    pub root: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("BLX_KEEP").is_some() {
            self.root.disable_cleanup(true);
            eprintln!(
                "BLX_KEEP: data dirs and logs kept in {}",
                self.root.path().display()
            );
        }
    }
}

impl Cluster {
    /// Bootstraps one agent and waits for its token.
    pub fn bootstrap() -> Cluster {
        Cluster::bootstrap_with(&[])
    }

    /// Like [`Cluster::bootstrap`], with extra flags for every agent of this cluster.
    pub fn bootstrap_with(extra: &[&str]) -> Cluster {
        Cluster::bootstrap_with_env(extra, &[])
    }

    /// Like [`Cluster::bootstrap_with`], with environment variables for every agent.
    pub fn bootstrap_with_env(extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let root = tempfile::Builder::new()
            .prefix("blx-it-")
            .tempdir()
            .expect("tempdir");
        let net = subnet();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let first = Agent::start_with_env(
            root.path(),
            "n1",
            Ipv4Addr::new(net[0], net[1], net[2], 1),
            &extra,
            &env,
        );
        let mut token = String::new();
        wait_until(
            Duration::from_secs(20),
            "the first agent prints a token",
            || {
                token = first.stdout().trim().to_string();
                !token.is_empty()
            },
        );
        Cluster {
            agents: vec![first],
            token,
            net,
            root,
            extra,
            env,
        }
    }

    /// The IP the agent with this 1-based index uses.
    pub fn ip(&self, index: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], index)
    }

    /// Starts agent `n<k>` joining through the first agent with the bootstrap token.
    pub fn join(&mut self) -> &Agent {
        let token = self.token.clone();
        self.join_through(0, &token)
    }

    /// Starts agent `n<k>` joining through agent `seed` with `token`.
    pub fn join_through(&mut self, seed: usize, token: &str) -> &Agent {
        self.join_with(seed, token, &[])
    }

    /// Like [`Cluster::join_through`], with extra flags for this agent only.
    pub fn join_with(&mut self, seed: usize, token: &str, extra: &[&str]) -> &Agent {
        let k = u8::try_from(self.agents.len() + 1).expect("fewer than 255 agents");
        let mut args = vec![
            "--token".to_string(),
            token.to_string(),
            "--seed".to_string(),
            self.agents[seed].gossip.to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        let agent = Agent::start_with_env(
            self.root.path(),
            &format!("n{k}"),
            self.ip(k),
            &args,
            &self.env,
        );
        self.agents.push(agent);
        self.agents.last().expect("just pushed")
    }

    /// Runs `blx join` for a node that should be refused; returns its output.
    pub fn try_join(&self, name: &str, token: &str) -> Output {
        self.try_join_through(0, name, token)
    }

    /// Like [`Cluster::try_join`], through agent `seed`.
    pub fn try_join_through(&self, seed: usize, name: &str, token: &str) -> Output {
        let ip = self.ip(200);
        Command::new(blx_bin())
            .arg("join")
            .arg(token)
            .arg("--data-dir")
            .arg(self.root.path().join(name))
            .arg("--bind")
            .arg(format!("{ip}:7946"))
            .arg("--api")
            .arg(format!("{ip}:7947"))
            .arg("--name")
            .arg(name)
            .arg("--seed")
            .arg(self.agents[seed].gossip.to_string())
            .arg("--no-mdns")
            .stdin(Stdio::null())
            .output()
            .expect("run blx join")
    }

    /// Waits until every listed agent sees exactly `n` alive members.
    pub fn wait_alive(&self, n: usize, within: Duration) {
        wait_until(within, &format!("every agent sees {n} alive"), || {
            self.agents.iter().filter(|a| a.child.is_some()).all(|a| {
                a.members()
                    .is_some_and(|ms| ms.iter().filter(|m| m.state == "alive").count() == n)
            })
        });
    }

    /// Waits until some running agent reports `voters` voters and `learners` learners, all
    /// agreeing on one leader; returns the leader's index in `agents`.
    pub fn wait_raft(&self, voters: usize, learners: usize, within: Duration) -> usize {
        let mut leader_index = 0;
        self.wait_or_dump(
            within,
            &format!("{voters} voters and {learners} learners"),
            || {
                let running: Vec<(usize, serde_json::Value)> = self
                    .agents
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.is_running())
                    .filter_map(|(i, a)| a.status().map(|s| (i, s)))
                    .collect();
                let Some((i, leader)) = running.iter().find(|(_, s)| s["role"] == "leader") else {
                    return false;
                };
                // Voters counted mid-change include the old ones, which are still needed.
                let ok = leader["changing"] == false
                    && leader["voters"].as_array().map(Vec::len) == Some(voters)
                    && leader["learners"].as_array().map(Vec::len) == Some(learners);
                leader_index = *i;
                ok && running.iter().all(|(_, s)| s["leader"] == leader["id"])
            },
        );
        leader_index
    }

    /// Like [`wait_until`], but a timeout shows the last lines of every agent's log.
    pub fn wait_or_dump(&self, within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !cond() {
            if Instant::now() >= deadline {
                let tails: String = self
                    .agents
                    .iter()
                    .map(|a| {
                        let log = a.log();
                        let lines: Vec<&str> = log.lines().collect();
                        format!(
                            "--- {} (last 30 lines) ---\n{}\n",
                            a.name,
                            lines[lines.len().saturating_sub(30)..].join("\n")
                        )
                    })
                    .collect();
                panic!("timed out after {within:?} waiting for: {what}\n{tails}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `name`, as the agent at `via` shows it, satisfies `cond`; returns it.
    pub fn wait_vm(
        &self,
        via: usize,
        name: &str,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        self.wait_or_dump(within, &format!("VM {name}: {what}"), || {
            match self.agents[via].vm(name) {
                Some(v) => {
                    let ok = cond(&v);
                    last = v;
                    ok
                }
                None => false,
            }
        });
        last
    }

    /// The index in `agents` of the agent with this node id.
    pub fn index_of(&self, node_id: &str) -> Option<usize> {
        self.agents.iter().position(|a| {
            std::fs::read_to_string(a.data_dir.join("node-id"))
                .map(|s| s.trim() == node_id)
                .unwrap_or(false)
        })
    }

    /// Dumps every agent's log (for a failing test).
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {} ---\n{}", a.name, a.log()))
            .collect()
    }
}

/// A network namespace of this test's own, deleted (with every process in it) on drop. Needs
/// root, as CI has.
pub struct Netns(pub String);

impl Netns {
    /// Creates namespace `name`, with its loopback up.
    pub fn new(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        let ns = Netns(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }

    /// A command to run inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.0])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip` with these arguments and asserts that it succeeded.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}
