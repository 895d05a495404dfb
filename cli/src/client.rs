//! Client commands: talk to an agent's HTTP API and print what it says.

use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;

use crate::api::{CreatedToken, MemberView};
use crate::args::{ApiArgs, Output};

/// The agent's API did not answer at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the blx agent API at {addr} ({reason}); is the agent running? (set --api or BLX_API)")]
pub(crate) struct Unreachable {
    addr: std::net::SocketAddr,
    reason: String,
}

struct Client {
    http: reqwest::Client,
    api: ApiArgs,
}

impl Client {
    fn new(api: &ApiArgs) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(Client { http, api: api.clone() })
    }

    async fn call<T: DeserializeOwned>(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<T> {
        let url = format!("http://{}{path}", self.api.api);
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.api.api_token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| Unreachable { addr: self.api.api, reason: e.to_string() })?;
        let status = resp.status();
        let text = resp.text().await.context("reading the agent's answer")?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or(text);
            anyhow::bail!("the agent refused: {msg} (HTTP {status})");
        }
        serde_json::from_str(&text).with_context(|| format!("the agent's answer is not what this blx expects: {text}"))
    }
}

pub(crate) async fn members(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let mut members: Vec<MemberView> = Client::new(api)?.call(reqwest::Method::GET, "/v1/members", None).await?;
    members.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&members)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = members
                .iter()
                .map(|m| {
                    let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![m.name.clone(), m.id.clone(), m.addr.to_string(), m.state.clone(), m.incarnation.to_string(), labels.join(",")]
                })
                .collect();
            print_table(&["NAME", "ID", "ADDRESS", "STATE", "INC", "LABELS"], &rows);
        }
    }
    Ok(())
}

pub(crate) async fn leave(api: &ApiArgs) -> anyhow::Result<()> {
    let _: serde_json::Value = Client::new(api)?.call(reqwest::Method::POST, "/v1/agent/leave", None).await?;
    eprintln!("blx: the agent is leaving the cluster");
    Ok(())
}

pub(crate) async fn token_create(api: &ApiArgs, ttl: Duration) -> anyhow::Result<()> {
    let created: CreatedToken = Client::new(api)?
        .call(reqwest::Method::POST, "/v1/tokens", Some(serde_json::json!({ "ttl_secs": ttl.as_secs() })))
        .await?;
    println!("{}", created.token);
    Ok(())
}

pub(crate) async fn token_list(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let tokens: Vec<blx_membership::token::TokenInfo> = Client::new(api)?.call(reqwest::Method::GET, "/v1/tokens", None).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
        Output::Table => {
            let now = crate::control::now_unix();
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    let left = t.expires_unix.saturating_sub(now);
                    vec![t.id.clone(), t.status.clone(), if t.status == "valid" { format!("{left}s") } else { "-".into() }]
                })
                .collect();
            print_table(&["ID", "STATUS", "EXPIRES IN"], &rows);
        }
    }
    Ok(())
}

pub(crate) async fn token_revoke(api: &ApiArgs, id: &str) -> anyhow::Result<()> {
    let id: blx_membership::token::TokenId = id.parse()?;
    let _: serde_json::Value = Client::new(api)?.call(reqwest::Method::DELETE, &format!("/v1/tokens/{id}"), None).await?;
    eprintln!("blx: revoked token {id}");
    Ok(())
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
