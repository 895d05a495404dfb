//! Client commands: talk to an agent's HTTP API and print what it says.

use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;

use crate::args::{ApiArgs, Output};
use blx::api::{CreatedToken, MemberView};

/// The agent's API did not answer at all.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the blx agent API at {addr} ({reason}); is the agent running? (set --api or BLX_API)"
)]
pub(crate) struct Unreachable {
    addr: std::net::SocketAddr,
    reason: String,
}

/// An error and its causes, outermost first: reqwest's own message names only the URL, and
/// the reason (a refused connection, a certificate from another CA) is further down.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

pub(crate) struct Client {
    http: reqwest::Client,
    api: ApiArgs,
    /// `http` on loopback, `https` beyond.
    scheme: &'static str,
    token: String,
}

impl Client {
    pub(crate) fn new(api: &ApiArgs) -> anyhow::Result<Self> {
        Self::with_timeout(api, Duration::from_secs(30))
    }

    /// A client whose requests may take up to `timeout` (long polls).
    pub(crate) fn with_timeout(api: &ApiArgs, timeout: Duration) -> anyhow::Result<Self> {
        let token = credential(api)?;
        let mut builder = reqwest::Client::builder().timeout(timeout);
        let scheme = if api.api.ip().is_loopback() {
            "http"
        } else {
            builder = builder.use_preconfigured_tls(tls_config(api)?);
            "https"
        };
        Ok(Client {
            http: builder.build()?,
            api: api.clone(),
            scheme,
            token,
        })
    }

    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let bytes = self
            .call_raw(method, path, body.map(|b| b.to_string().into_bytes()), true)
            .await?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the agent's answer is not what this blx expects: {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    pub(crate) async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        json: bool,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}://{}{path}", self.scheme, self.api.api);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            if json {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            req = req.body(body);
        }
        let resp = req.send().await.map_err(|e| Unreachable {
            addr: self.api.api,
            reason: causes(&e),
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .context("reading the agent's answer")?
            .to_vec();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or(text);
            anyhow::bail!("the agent refused: {msg} (HTTP {status})");
        }
        Ok(bytes)
    }
}

/// The token to present: `--api-token` (or `BLX_API_TOKEN`) if given, else the agent's local
/// token from its data dir.
fn credential(api: &ApiArgs) -> anyhow::Result<String> {
    if let Some(t) = &api.api_token {
        let t = t.trim();
        anyhow::ensure!(
            !t.is_empty(),
            "the API token is empty: unset BLX_API_TOKEN (or --api-token) to use the local token, or give one"
        );
        return Ok(t.to_string());
    }
    let path = api.data_dir.join(blx::access::LOCAL_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("{} is empty: is the agent running?", path.display()),
        Err(e) => anyhow::bail!(
            "cannot read the local API token {} ({e}): run as the agent's user, point --data-dir \
             (or BLX_DATA_DIR) at the agent's data dir, or pass --api-token",
            path.display()
        ),
    }
}

/// TLS for an HTTPS API: the cluster CA from `--ca-cert`, else from the data dir.
fn tls_config(api: &ApiArgs) -> anyhow::Result<rustls::ClientConfig> {
    let path = api
        .ca_cert
        .clone()
        .unwrap_or_else(|| api.data_dir.join(blx_membership::store::CA_CERT));
    let pem = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the cluster CA certificate {} (needed for the HTTPS API at {}; pass --ca-cert)",
            path.display(),
            api.api
        )
    })?;
    let ca = blx_membership::tls::pem_to_der(&pem)
        .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
    Ok(blx_membership::tls::api_client_config(ca)?)
}

pub(crate) async fn members(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let mut members: Vec<MemberView> = Client::new(api)?
        .call(reqwest::Method::GET, "/v1/members", None)
        .await?;
    members.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&members)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = members
                .iter()
                .map(|m| {
                    let labels: Vec<String> =
                        m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        m.name.clone(),
                        m.id.clone(),
                        m.addr.to_string(),
                        m.state.clone(),
                        m.incarnation.to_string(),
                        labels.join(","),
                    ]
                })
                .collect();
            print_table(&["NAME", "ID", "ADDRESS", "STATE", "INC", "LABELS"], &rows);
        }
    }
    Ok(())
}

pub(crate) async fn leave(api: &ApiArgs) -> anyhow::Result<()> {
    let _: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::POST, "/v1/agent/leave", None)
        .await?;
    eprintln!("blx: the agent is leaving the cluster");
    Ok(())
}

pub(crate) async fn token_create(api: &ApiArgs, ttl: Duration) -> anyhow::Result<()> {
    let created: CreatedToken = Client::new(api)?
        .call(
            reqwest::Method::POST,
            "/v1/tokens",
            Some(serde_json::json!({ "ttl_secs": ttl.as_secs() })),
        )
        .await?;
    println!("{}", created.token);
    Ok(())
}

pub(crate) async fn token_list(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let tokens: Vec<blx_membership::token::TokenInfo> = Client::new(api)?
        .call(reqwest::Method::GET, "/v1/tokens", None)
        .await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
        Output::Table => {
            let now = blx::world::WallClock::now_unix(&blx::world::SystemClock);
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.status.clone(),
                        expires_in(&t.status, t.expires_unix, now),
                    ]
                })
                .collect();
            print_table(&["ID", "STATUS", "EXPIRES IN"], &rows);
        }
    }
    Ok(())
}

pub(crate) async fn audit_tail(api: &ApiArgs, lines: usize, follow: bool) -> anyhow::Result<()> {
    let client = Client::new(api)?;
    let mut after = 0;
    let mut limit = lines;
    loop {
        let records: Vec<blx::audit::AuditRecord> = client
            .call(
                reqwest::Method::GET,
                &format!("/v1/audit?after={after}&limit={limit}"),
                None,
            )
            .await?;
        for r in &records {
            println!("{}", serde_json::to_string(r)?);
            after = after.max(r.seq);
        }
        if !follow {
            return Ok(());
        }
        limit = 10_000;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

pub(crate) async fn token_revoke(api: &ApiArgs, id: &str) -> anyhow::Result<()> {
    let id: blx_membership::token::TokenId = id.parse()?;
    let _: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await?;
    eprintln!("blx: revoked token {id}");
    Ok(())
}

pub(crate) async fn api_token_create(
    api: &ApiArgs,
    name: &str,
    scope: blx_consensus::access::Scope,
    ttl: Duration,
) -> anyhow::Result<()> {
    let created: blx::api::CreatedApiToken = Client::new(api)?
        .call(
            reqwest::Method::POST,
            "/v1/api-tokens",
            Some(serde_json::json!({ "name": name, "scope": scope, "ttl_secs": ttl.as_secs() })),
        )
        .await?;
    eprintln!(
        "blx: API token {} ({scope}) created; it is shown only now",
        created.id
    );
    println!("{}", created.token);
    Ok(())
}

pub(crate) async fn api_token_list(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let tokens: Vec<blx_consensus::access::ApiTokenInfo> = Client::new(api)?
        .call(reqwest::Method::GET, "/v1/api-tokens", None)
        .await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
        Output::Table => {
            let now = blx::world::WallClock::now_unix(&blx::world::SystemClock);
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.name.clone(),
                        t.scope.to_string(),
                        t.status.clone(),
                        expires_in(&t.status, t.expires_unix, now),
                    ]
                })
                .collect();
            print_table(&["ID", "NAME", "SCOPE", "STATUS", "EXPIRES IN"], &rows);
        }
    }
    Ok(())
}

pub(crate) async fn api_token_revoke(api: &ApiArgs, id: &str) -> anyhow::Result<()> {
    let id: blx_membership::token::TokenId = id.parse()?;
    let _: serde_json::Value = Client::new(api)?
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/api-tokens/{id}"),
            None,
        )
        .await?;
    eprintln!("blx: revoked API token {id}");
    Ok(())
}

/// A token's EXPIRES IN cell: seconds left while it is valid, `-` once not.
fn expires_in(status: &str, expires_unix: u64, now: u64) -> String {
    if status == "valid" {
        format!("{}s", expires_unix.saturating_sub(now))
    } else {
        "-".into()
    }
}

pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Percent-encodes a key for a URL path, keeping `/` so prefixes read naturally.
fn key_path(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) async fn status(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let s: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::GET, "/v1/status", None)
        .await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => {
            let ids = |v: &serde_json::Value| {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(serde_json::Value::as_str)
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default()
            };
            println!("leader    {}", s["leader"].as_str().unwrap_or("none"));
            println!(
                "this node {} ({})",
                s["id"].as_str().unwrap_or(""),
                s["role"].as_str().unwrap_or("")
            );
            println!("term      {}", s["term"]);
            println!("applied   {}", s["applied_index"]);
            let changing = if s["changing"] == true {
                " (changing)"
            } else {
                ""
            };
            println!("voters    {}{changing}", ids(&s["voters"]));
            println!("learners  {}", ids(&s["learners"]));
        }
    }
    Ok(())
}

pub(crate) async fn kv_put(
    api: &ApiArgs,
    key: &str,
    value: &str,
    cas: Option<u64>,
) -> anyhow::Result<()> {
    let body = if value == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .context("reading standard input")?;
        buf
    } else {
        value.as_bytes().to_vec()
    };
    let path = match cas {
        Some(i) => format!("/v1/kv/{}?cas={i}", key_path(key)),
        None => format!("/v1/kv/{}", key_path(key)),
    };
    let bytes = Client::new(api)?
        .call_raw(reqwest::Method::PUT, &path, Some(body), false)
        .await?;
    let r: serde_json::Value = serde_json::from_slice(&bytes)?;
    eprintln!("blx: {key} written at index {}", r["index"]);
    Ok(())
}

pub(crate) async fn kv_get(api: &ApiArgs, key: &str, stale: bool) -> anyhow::Result<()> {
    let path = format!(
        "/v1/kv/{}{}",
        key_path(key),
        if stale { "?stale" } else { "" }
    );
    let bytes = Client::new(api)?
        .call_raw(reqwest::Method::GET, &path, None, false)
        .await?;
    std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!();
    }
    Ok(())
}

pub(crate) async fn kv_del(api: &ApiArgs, key: &str, cas: Option<u64>) -> anyhow::Result<()> {
    let path = match cas {
        Some(i) => format!("/v1/kv/{}?cas={i}", key_path(key)),
        None => format!("/v1/kv/{}", key_path(key)),
    };
    let r: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::DELETE, &path, None)
        .await?;
    if r["deleted"] != true {
        eprintln!("blx: {key} did not exist");
    }
    Ok(())
}

pub(crate) async fn kv_list(api: &ApiArgs, prefix: &str, stale: bool) -> anyhow::Result<()> {
    let path = format!(
        "/v1/kv/{}?recurse{}",
        key_path(prefix),
        if stale { "&stale" } else { "" }
    );
    let items: Vec<serde_json::Value> = Client::new(api)?
        .call(reqwest::Method::GET, &path, None)
        .await?;
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                i["key"].as_str().unwrap_or("").to_string(),
                i["modify_index"].to_string(),
                i["value"].as_str().unwrap_or("").chars().take(60).collect(),
            ]
        })
        .collect();
    print_table(&["KEY", "INDEX", "VALUE"], &rows);
    Ok(())
}

pub(crate) async fn config_get(api: &ApiArgs) -> anyhow::Result<()> {
    let c: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::GET, "/v1/config", None)
        .await?;
    println!("{}", serde_json::to_string_pretty(&c)?);
    Ok(())
}

pub(crate) async fn config_set(
    api: &ApiArgs,
    file: Option<&str>,
    fields: &[(&str, serde_json::Value)],
) -> anyhow::Result<()> {
    let client = Client::new(api)?;
    let mut config: serde_json::Value = match file {
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            serde_json::from_str(&text).context("the config on standard input is not JSON")?
        }
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        )
        .with_context(|| format!("{path} is not JSON"))?,
        None => client
            .call::<serde_json::Value>(reqwest::Method::GET, "/v1/config", None)
            .await?["config"]
            .clone(),
    };
    for (field, value) in fields {
        config[*field] = value.clone();
    }
    let r: serde_json::Value = client
        .call(reqwest::Method::PUT, "/v1/config", Some(config))
        .await?;
    eprintln!("blx: config is now version {}", r["version"]);
    Ok(())
}

pub(crate) async fn config_history(api: &ApiArgs) -> anyhow::Result<()> {
    let h: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::GET, "/v1/config/history", None)
        .await?;
    println!("{}", serde_json::to_string_pretty(&h)?);
    Ok(())
}

pub(crate) async fn config_rollback(api: &ApiArgs) -> anyhow::Result<()> {
    let r: serde_json::Value = Client::new(api)?
        .call(reqwest::Method::POST, "/v1/config/rollback", None)
        .await?;
    eprintln!("blx: config rolled back; now version {}", r["version"]);
    Ok(())
}

pub(crate) async fn transfer_leader(api: &ApiArgs, to: Option<String>) -> anyhow::Result<()> {
    let body = serde_json::json!({ "to": to });
    let r: serde_json::Value = Client::new(api)?
        .call(
            reqwest::Method::POST,
            "/v1/operator/transfer-leader",
            Some(body),
        )
        .await?;
    eprintln!("blx: {} now leads", r["leader"].as_str().unwrap_or("?"));
    Ok(())
}

/// On a terminal, says what a long command is waiting for.
fn progress(what: &str) {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("blx: {what}...");
    }
}

pub(crate) async fn snapshot_save(api: &ApiArgs, file: &std::path::Path) -> anyhow::Result<()> {
    progress(&format!("saving the cluster's state from {}", api.api));
    let bytes = Client::new(api)?
        .call_raw(reqwest::Method::GET, "/v1/operator/snapshot", None, false)
        .await?;
    let tmp = file.with_extension("partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    eprintln!("blx: saved {} bytes to {}", bytes.len(), file.display());
    Ok(())
}

pub(crate) async fn snapshot_restore(api: &ApiArgs, file: &std::path::Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    progress(&format!(
        "restoring {} bytes through {} (the leader replicates them to every member)",
        bytes.len(),
        api.api
    ));
    let out = Client::new(api)?
        .call_raw(
            reqwest::Method::PUT,
            "/v1/operator/snapshot",
            Some(bytes),
            false,
        )
        .await?;
    let r: serde_json::Value = serde_json::from_slice(&out)?;
    eprintln!("blx: restored {} keys", r["restored_keys"]);
    Ok(())
}
