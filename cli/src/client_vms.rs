//! `blx vm ...`, `blx node ...` and `blx image build`.

use std::time::Duration;

use reqwest::Method;

use crate::args::{ApiArgs, DriverArg, NodeRefArgs, Output, RestartArg, VmCreateArgs, VmNameArgs};
use crate::client::{Client, print_table};
use blx::api_vms::{CreateVm, NodeView, VmView};

fn create_body(a: &VmCreateArgs) -> anyhow::Result<CreateVm> {
    let memory_mib = blx::size::mib(a.memory);
    Ok(CreateVm {
        name: a.name.clone(),
        vcpus: Some(a.vcpus),
        memory_mib: Some(memory_mib),
        disk_mib: None,
        driver: a.driver.map(|d| match d {
            DriverArg::Qemu => "qemu".to_string(),
            DriverArg::Process => "process".to_string(),
        }),
        image: a.image.clone(),
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        command: a.command.clone(),
        ready_marker: a.ready_marker.clone(),
        boot_timeout_secs: Some(u32::try_from(a.boot_timeout.as_secs()).unwrap_or(u32::MAX)),
        labels: a.labels.iter().cloned().collect(),
        constraints: a.constraints.clone(),
        preferences: a.preferences.clone(),
        priority: Some(a.priority),
        group: a.group.clone(),
        spread_zones: a.spread_zones,
        restart: Some(
            match a.restart {
                RestartArg::Always => "always",
                RestartArg::OnFailure => "on-failure",
                RestartArg::Never => "never",
            }
            .to_string(),
        ),
    })
}

fn path_segment(name: &str) -> anyhow::Result<&str> {
    if name.is_empty() || name.contains(['/', '?', '#', '%']) {
        anyhow::bail!("{name:?} is not a valid name");
    }
    Ok(name)
}

/// `blx vm create` and `blx vm run` (which also waits for the VM to run).
pub(crate) async fn vm_create(a: &VmCreateArgs, wait: bool) -> anyhow::Result<()> {
    let body = create_body(a)?;
    let client = Client::new(&a.api)?;
    let created: VmView = client
        .call(Method::POST, "/v1/vms", Some(serde_json::to_value(&body)?))
        .await?;
    if !wait {
        return print_vm(&created, a.output);
    }
    let view = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        watch_vm(&client, &a.name, a.wait).await?
    } else {
        let waiter = Client::with_timeout(&a.api, a.wait + Duration::from_secs(5))?;
        waiter
            .call(
                Method::GET,
                &format!(
                    "/v1/vms/{}?wait=running&timeout_ms={}",
                    path_segment(&a.name)?,
                    a.wait.as_millis()
                ),
                None,
            )
            .await?
    };
    if view.phase != "running" {
        print_vm(&view, a.output)?;
        anyhow::bail!(
            "VM {} is {}{}",
            view.name,
            view.phase,
            view.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    print_vm(&view, a.output)
}

/// One line of what a VM is doing, for progress on a terminal.
fn progress_line(v: &VmView) -> String {
    let on = v
        .node_name
        .as_deref()
        .or(v.node.as_deref())
        .map(|n| format!(" on {n}"))
        .unwrap_or_default();
    let extra = match (v.phase.as_str(), v.boot_ms, v.reason.as_deref()) {
        ("running", Some(ms), _) => format!(" (booted in {:.2} s)", ms as f64 / 1000.0),
        (_, _, Some(r)) => format!(" ({r})"),
        _ => String::new(),
    };
    format!("{}: {}{on}{extra}", v.name, v.phase)
}

/// Follows a VM until it runs, fails or `within` passes, printing each change of phase on
/// standard error: the terminal's progress view of `blx vm run`.
async fn watch_vm(client: &Client, name: &str, within: Duration) -> anyhow::Result<VmView> {
    let path = format!("/v1/vms/{}", path_segment(name)?);
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::new();
    loop {
        let v: VmView = client.call(Method::GET, &path, None).await?;
        let line = progress_line(&v);
        if line != last {
            eprintln!("blx: {line}");
            last = line;
        }
        let settled = matches!(
            v.phase.as_str(),
            "running" | "failed" | "exited" | "stopped"
        );
        if settled || tokio::time::Instant::now() >= deadline {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_vm(v: &VmView, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => {
            let rows = vec![
                ("name", v.name.clone()),
                ("phase", v.phase.clone()),
                ("desired", v.desired.clone()),
                ("reason", v.reason.clone().unwrap_or_else(|| "-".into())),
                (
                    "node",
                    match (&v.node_name, &v.node) {
                        (Some(n), Some(id)) => format!("{n} ({id})"),
                        (None, Some(id)) => id.clone(),
                        _ => "-".into(),
                    },
                ),
                ("driver", v.driver.clone()),
                ("boots", v.source.clone()),
                ("vcpus", v.vcpus.to_string()),
                ("memory", format!("{} MiB", v.memory_mib)),
                ("priority", v.priority.to_string()),
                ("group", v.group.clone().unwrap_or_else(|| "-".into())),
                ("constraints", v.constraints.join(", ")),
                ("restart", v.restart.clone()),
                (
                    "boot time",
                    v.boot_ms
                        .map(|b| format!("{b} ms"))
                        .unwrap_or_else(|| "-".into()),
                ),
                ("restarts", v.restarts.to_string()),
                ("incarnation", v.incarnation.to_string()),
            ];
            for (k, val) in rows {
                println!("{k:<12} {val}");
            }
        }
    }
    Ok(())
}

pub(crate) async fn vm_list(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let vms: Vec<VmView> = Client::new(api)?.call(Method::GET, "/v1/vms", None).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&vms)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = vms
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.phase.clone(),
                        v.node_name.clone().unwrap_or_else(|| "-".into()),
                        v.driver.clone(),
                        v.vcpus.to_string(),
                        format!("{}Mi", v.memory_mib),
                        v.priority.to_string(),
                        v.boot_ms
                            .map(|b| format!("{b}ms"))
                            .unwrap_or_else(|| "-".into()),
                        v.reason.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME", "PHASE", "NODE", "DRIVER", "VCPUS", "MEMORY", "PRIO", "BOOT", "REASON",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

pub(crate) async fn vm_show(a: &VmNameArgs) -> anyhow::Result<()> {
    let v: VmView = Client::new(&a.api)?
        .call(
            Method::GET,
            &format!("/v1/vms/{}", path_segment(&a.name)?),
            None,
        )
        .await?;
    print_vm(&v, a.output)
}

pub(crate) async fn vm_logs(a: &VmNameArgs, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let out = Client::new(&a.api)?
        .call_raw(
            Method::GET,
            &format!("/v1/vms/{}/logs?bytes={bytes}", path_segment(&a.name)?),
            None,
            false,
        )
        .await?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}

pub(crate) async fn vm_action(a: &VmNameArgs, action: &str) -> anyhow::Result<()> {
    let _: serde_json::Value = Client::new(&a.api)?
        .call(
            Method::POST,
            &format!("/v1/vms/{}/{action}", path_segment(&a.name)?),
            None,
        )
        .await?;
    eprintln!("blx: {action} requested for {}", a.name);
    Ok(())
}

pub(crate) async fn vm_delete(a: &VmNameArgs) -> anyhow::Result<()> {
    let _: serde_json::Value = Client::new(&a.api)?
        .call(
            Method::DELETE,
            &format!("/v1/vms/{}", path_segment(&a.name)?),
            None,
        )
        .await?;
    eprintln!("blx: deleted {}", a.name);
    Ok(())
}

pub(crate) async fn node_list(api: &ApiArgs, output: Output) -> anyhow::Result<()> {
    let mut nodes: Vec<NodeView> = Client::new(api)?
        .call(Method::GET, "/v1/nodes", None)
        .await?;
    nodes.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&nodes)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let flags = match (n.draining, n.cordoned) {
                        (true, _) => "draining",
                        (false, true) => "cordoned",
                        _ => "-",
                    };
                    vec![
                        n.name.clone(),
                        n.id.clone(),
                        n.status.clone(),
                        flags.into(),
                        format!("{}/{}", n.allocated.vcpus, n.capacity.vcpus),
                        format!("{}/{}Mi", n.allocated.memory_mib, n.capacity.memory_mib),
                        n.vms.to_string(),
                        n.zone.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "ID",
                    "STATUS",
                    "SCHEDULING",
                    "VCPUS",
                    "MEMORY",
                    "VMS",
                    "ZONE",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

pub(crate) async fn node_action(a: &NodeRefArgs, action: &str) -> anyhow::Result<()> {
    let n: NodeView = Client::new(&a.api)?
        .call(
            Method::POST,
            &format!("/v1/nodes/{}/{action}", path_segment(&a.node)?),
            None,
        )
        .await?;
    eprintln!("blx: {action}: {} ({})", n.name, n.id);
    if action == "drain" && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        watch_drain(&a.api, &n).await?;
    }
    Ok(())
}

/// On a terminal, follows a drain until no VM is left on the node (or a minute passes),
/// printing how many are still there as that changes.
async fn watch_drain(api: &ApiArgs, n: &NodeView) -> anyhow::Result<()> {
    let client = Client::new(api)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let vms: Vec<VmView> = client.call(Method::GET, "/v1/vms", None).await?;
        let left = vms
            .iter()
            .filter(|v| v.node.as_deref() == Some(n.id.as_str()) && v.phase != "stopped")
            .count();
        if last != Some(left) {
            eprintln!("blx: {}: {left} VM(s) still to move", n.name);
            last = Some(left);
        }
        if left == 0 {
            eprintln!("blx: {} is drained", n.name);
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "blx: {} VM(s) are still on {} (no room elsewhere?); `blx vm list` shows them",
                left, n.name
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(crate) async fn node_label(
    a: &NodeRefArgs,
    set: &[(String, String)],
    remove: &[String],
) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "set": set.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "remove": remove,
    });
    let n: NodeView = Client::new(&a.api)?
        .call(
            Method::PUT,
            &format!("/v1/nodes/{}/labels", path_segment(&a.node)?),
            Some(body),
        )
        .await?;
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{}", labels.join(","));
    Ok(())
}

/// `blx image build`: runs the project's image script, found next to the binary's source tree
/// or on PATH.
pub(crate) fn image_build(out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let script = [
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-image.sh"),
        std::path::PathBuf::from("scripts/build-image.sh"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        anyhow::anyhow!("scripts/build-image.sh not found: run this from a blx checkout")
    })?;
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script);
    if let Some(out) = out {
        cmd.arg(out);
    }
    let status = cmd.status()?;
    if !status.success() {
        anyhow::bail!("building the image failed ({status})");
    }
    Ok(())
}
