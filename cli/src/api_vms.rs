//! The VM and node routes of the HTTP API.
//!
//! | route | does |
//! |---|---|
//! | `POST /v1/vms` | create a VM (JSON [`CreateVm`]); it is scheduled and started |
//! | `GET /v1/vms` | every VM |
//! | `GET /v1/vms/{name}` | one VM; `?wait=running&timeout_ms=N` answers once it runs, fails or exits |
//! | `DELETE /v1/vms/{name}` | delete; its node stops it |
//! | `POST /v1/vms/{name}/{start,stop,pause,resume}` | change its desired state |
//! | `GET /v1/vms/{name}/logs?bytes=N` | the tail of its serial console, from the node that hosts it |
//! | `GET /v1/nodes` | nodes with capacity, allocation and flags |
//! | `POST /v1/nodes/{node}/{drain,cordon,uncordon}` | scheduling flags (node by id or name) |
//! | `PUT /v1/nodes/{node}/labels` `{"set":{..},"remove":[..]}` | operator labels |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use blx_consensus::state::{Applied, ClusterState, Command};
use blx_consensus::workload::{
    BootSource, NodeRecord, VmPhase, VmRecord, VmSpec, WorkloadApplied, WorkloadCommand,
};
use blx_scheduler::{Constraint, Preference, Resources};
use blx_vmm::{DesiredState, DriverKind, RestartPolicy};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ApiState, cluster_error};

/// The body of `POST /v1/vms`. Unknown fields are refused.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct CreateVm {
    pub name: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
    /// `qemu` or `process`; default `process` when `command` is set, else `qemu`.
    pub driver: Option<String>,
    /// Guest image name (qemu); default `default` when no kernel is given.
    pub image: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// Program and arguments (process).
    pub command: Vec<String>,
    pub ready_marker: Option<String>,
    pub boot_timeout_secs: Option<u32>,
    pub labels: BTreeMap<String, String>,
    /// `key=value`, `key!=value`, `key in a,b`, `key`, `!key`.
    pub constraints: Vec<String>,
    /// A constraint with an optional `:weight`.
    pub preferences: Vec<String>,
    pub priority: Option<u16>,
    pub group: Option<String>,
    pub spread_zones: bool,
    /// `always`, `on-failure` or `never`.
    pub restart: Option<String>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

impl CreateVm {
    /// The spec this request asks for, checked against this node's files.
    fn to_spec(&self, images: &std::path::Path) -> Result<VmSpec, ApiError> {
        let driver = match self.driver.as_deref() {
            Some("qemu") => DriverKind::Qemu,
            Some("process") => DriverKind::Process,
            None if !self.command.is_empty() => DriverKind::Process,
            None => DriverKind::Qemu,
            Some(other) => {
                return Err(bad(format!(
                    "unknown driver {other:?}: use qemu or process"
                )));
            }
        };
        let source = match driver {
            DriverKind::Process => {
                if self.image.is_some() || self.kernel.is_some() {
                    return Err(bad(
                        "the process driver runs a command; --image and --kernel are for qemu",
                    ));
                }
                BootSource::Command {
                    argv: self.command.clone(),
                }
            }
            DriverKind::Qemu => {
                if !self.command.is_empty() {
                    return Err(bad("a command needs the process driver"));
                }
                match (&self.kernel, &self.image) {
                    (Some(_), Some(_)) => {
                        return Err(bad("give either an image or a kernel, not both"));
                    }
                    (Some(kernel), None) => {
                        for p in std::iter::once(kernel).chain(&self.initrd) {
                            let path = PathBuf::from(p);
                            if !path.is_absolute() {
                                return Err(bad(format!("{p:?} is not an absolute path")));
                            }
                            if !path.is_file() {
                                return Err(bad(format!("{p} does not exist or is not a file")));
                            }
                        }
                        BootSource::Kernel {
                            kernel: kernel.clone(),
                            initrd: self.initrd.clone(),
                        }
                    }
                    (None, image) => {
                        if self.initrd.is_some() {
                            return Err(bad("--initrd goes with --kernel"));
                        }
                        let name = image.clone().unwrap_or_else(|| "default".into());
                        blx_vmm::image::load(images, &name).map_err(|e| bad(e.to_string()))?;
                        BootSource::Image { name }
                    }
                }
            }
        };
        let parse_all = |exprs: &[String]| -> Result<Vec<Constraint>, ApiError> {
            exprs
                .iter()
                .map(|c| c.parse::<Constraint>().map_err(|e| bad(e.to_string())))
                .collect()
        };
        let preferences = self
            .preferences
            .iter()
            .map(|p| p.parse::<Preference>().map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let restart = match self.restart.as_deref() {
            None | Some("always") => RestartPolicy::Always,
            Some("on-failure") => RestartPolicy::OnFailure,
            Some("never") => RestartPolicy::Never,
            Some(other) => {
                return Err(bad(format!(
                    "unknown restart policy {other:?}: use always, on-failure or never"
                )));
            }
        };
        let spec = VmSpec {
            name: self.name.clone(),
            resources: Resources {
                vcpus: self.vcpus.unwrap_or(1),
                memory_mib: self.memory_mib.unwrap_or(256),
                disk_mib: self.disk_mib.unwrap_or(0),
            },
            driver,
            source,
            cmdline: self.cmdline.clone(),
            ready_marker: self.ready_marker.clone(),
            boot_timeout_secs: self.boot_timeout_secs.unwrap_or(60),
            labels: self.labels.clone(),
            constraints: parse_all(&self.constraints)?,
            preferences,
            priority: self.priority.unwrap_or(0),
            group: self.group.clone(),
            spread_zones: self.spread_zones,
            restart,
        };
        spec.validate().map_err(|e| bad(e.to_string()))?;
        Ok(spec)
    }
}

/// A VM as the API and `blx vm show --output json` show it.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct VmView {
    pub name: String,
    pub phase: String,
    pub desired: String,
    pub reason: Option<String>,
    pub node: Option<String>,
    pub node_name: Option<String>,
    pub incarnation: u64,
    pub boot_ms: Option<u64>,
    pub restarts: u32,
    pub since_ms: u64,
    pub driver: String,
    pub source: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub priority: u16,
    pub group: Option<String>,
    pub constraints: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub restart: String,
    pub create_index: u64,
}

fn desired_name(d: DesiredState) -> &'static str {
    match d {
        DesiredState::Running => "running",
        DesiredState::Paused => "paused",
        DesiredState::Stopped => "stopped",
    }
}

impl VmView {
    fn of(vm: &VmRecord, state: &ClusterState) -> Self {
        let s = &vm.spec;
        VmView {
            name: s.name.clone(),
            phase: vm.status.phase.to_string(),
            desired: desired_name(vm.desired).into(),
            reason: vm.status.reason.clone(),
            node: vm.node.clone(),
            node_name: vm
                .node
                .as_ref()
                .and_then(|n| state.nodes.get(n))
                .map(|n| n.name.clone()),
            incarnation: vm.incarnation,
            boot_ms: vm.status.boot_ms,
            restarts: vm.status.restarts,
            since_ms: vm.status.since_ms,
            driver: match s.driver {
                DriverKind::Qemu => "qemu".into(),
                DriverKind::Process => "process".into(),
            },
            source: match &s.source {
                BootSource::Image { name } => format!("image {name}"),
                BootSource::Kernel { kernel, initrd } => match initrd {
                    Some(i) => format!("kernel {kernel} initrd {i}"),
                    None => format!("kernel {kernel}"),
                },
                BootSource::Command { argv } => argv.join(" "),
            },
            vcpus: s.resources.vcpus,
            memory_mib: s.resources.memory_mib,
            priority: s.priority,
            group: s.group.clone(),
            constraints: s.constraints.iter().map(|c| c.to_string()).collect(),
            labels: s.labels.clone(),
            restart: match s.restart {
                RestartPolicy::Always => "always".into(),
                RestartPolicy::OnFailure => "on-failure".into(),
                RestartPolicy::Never => "never".into(),
            },
            create_index: vm.create_index,
        }
    }
}

/// A node as `blx node list` shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub cordoned: bool,
    pub draining: bool,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub allocated: Resources,
    pub vms: usize,
}

impl NodeView {
    fn of(id: &str, n: &NodeRecord, state: &ClusterState) -> Self {
        let mut allocated = Resources::default();
        let mut vms = 0;
        for vm in state.vms_on(id) {
            if vm.desired != DesiredState::Stopped {
                allocated.vcpus += vm.spec.resources.vcpus;
                allocated.memory_mib += vm.spec.resources.memory_mib;
                allocated.disk_mib += vm.spec.resources.disk_mib;
            }
            vms += 1;
        }
        NodeView {
            id: id.to_string(),
            name: n.name.clone(),
            status: n.status.to_string(),
            cordoned: n.cordoned,
            draining: n.draining,
            zone: n.zone.clone(),
            labels: n.effective_labels(),
            capacity: n.capacity,
            allocated,
            vms,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct VmQuery {
    #[serde(default, deserialize_with = "crate::api::flag")]
    stale: bool,
    /// `running`: answer once the VM runs, fails or exits.
    wait: Option<String>,
    timeout_ms: Option<u64>,
    bytes: Option<u64>,
}

type Query = Result<axum::extract::Query<VmQuery>, axum::extract::rejection::QueryRejection>;

fn query(q: Query) -> Result<VmQuery, ApiError> {
    q.map(|q| q.0)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn workload(state: &ApiState, cmd: WorkloadCommand) -> Result<WorkloadApplied, ApiError> {
    match state
        .cluster
        .write(Command::Workload(cmd))
        .await
        .map_err(cluster_error)?
    {
        Ok(Applied::Workload(w)) => Ok(w),
        Ok(other) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected result {other:?}"),
        )),
        Err(e) => Err(crate::api::refused(e)),
    }
}

#[utoipa::path(post, path = "/v1/vms", summary = "Create a VM (it is placed by the scheduler)", request_body = serde_json::Value, responses((status = 201, body = serde_json::Value)))]
pub(crate) async fn vm_create(
    State(state): State<ApiState>,
    body: Result<Json<CreateVm>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad(e.body_text()))?;
    let spec = body.to_spec(&state.images)?;
    let name = spec.name.clone();
    workload(
        &state,
        WorkloadCommand::VmCreate {
            spec,
            now_ms: state.cluster.clock.now_ms(),
            trace: crate::telemetry::current_traceparent(),
        },
    )
    .await?;
    // Read through the leader: this node may not have applied the create yet.
    let s = read(&state, false).await?;
    let view = s.vms.get(&name).map(|vm| VmView::of(vm, &s));
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(get, path = "/v1/vms", summary = "List VMs", params(("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn vm_list(
    State(state): State<ApiState>,
    q: Query,
) -> Result<Json<Vec<VmView>>, ApiError> {
    let q = query(q)?;
    let s = read(&state, q.stale).await?;
    Ok(Json(s.vms.values().map(|vm| VmView::of(vm, &s)).collect()))
}

async fn read(state: &ApiState, stale: bool) -> Result<ClusterState, ApiError> {
    state.cluster.read(stale).await.map_err(cluster_error)
}

fn no_vm(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no VM named {name}"))
}

/// Phases after which waiting for `running` is over.
fn settled(phase: VmPhase) -> bool {
    matches!(
        phase,
        VmPhase::Running | VmPhase::Failed | VmPhase::Exited | VmPhase::Stopped | VmPhase::Paused
    )
}

#[utoipa::path(get, path = "/v1/vms/{name}", summary = "One VM", params(("name" = String, Path, description = "the VM"), ("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn vm_get(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Query,
) -> Result<Json<VmView>, ApiError> {
    let q = query(q)?;
    match q.wait.as_deref() {
        None => {
            let s = read(&state, q.stale).await?;
            s.vms
                .get(&name)
                .map(|vm| Json(VmView::of(vm, &s)))
                .ok_or_else(|| no_vm(&name))
        }
        Some("running") => {
            // Long poll on this node's copy: it wakes on every applied change.
            let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(60_000).min(600_000));
            let mut applied = state.cluster.node.subscribe_workload();
            let wait = async {
                loop {
                    let view = state.cluster.node.with_local_state(|s| {
                        s.vms
                            .get(&name)
                            .map(|vm| (settled(vm.status.phase), VmView::of(vm, s)))
                    });
                    match view {
                        Some((true, v)) => return Ok(v),
                        Some((false, _)) => {}
                        None => return Err(no_vm(&name)),
                    }
                    if applied.changed().await.is_err() {
                        return Err(ApiError(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "agent stopping".into(),
                        ));
                    }
                }
            };
            match tokio::time::timeout(timeout, wait).await {
                Ok(r) => r.map(Json),
                Err(_) => {
                    let view = state
                        .cluster
                        .node
                        .with_local_state(|s| s.vms.get(&name).map(|vm| VmView::of(vm, s)));
                    Err(ApiError(
                        StatusCode::REQUEST_TIMEOUT,
                        match view {
                            Some(v) => format!(
                                "VM {name} is still {} after {} ms{}",
                                v.phase,
                                timeout.as_millis(),
                                v.reason.map(|r| format!(": {r}")).unwrap_or_default()
                            ),
                            None => format!("no VM named {name}"),
                        },
                    ))
                }
            }
        }
        Some(other) => Err(bad(format!("wait must be running, not {other:?}"))),
    }
}

#[utoipa::path(delete, path = "/v1/vms/{name}", summary = "Delete a VM; its node stops it", params(("name" = String, Path, description = "the VM")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn vm_delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    workload(&state, WorkloadCommand::VmDelete { name: name.clone() }).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

#[utoipa::path(post, path = "/v1/vms/{name}/{action}", summary = "start, stop, pause or resume a VM", params(("name" = String, Path, description = "the VM"), ("action" = String, Path, description = "start, stop, pause or resume")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn vm_action(
    State(state): State<ApiState>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let desired = match action.as_str() {
        "start" | "resume" => DesiredState::Running,
        "stop" => DesiredState::Stopped,
        "pause" => DesiredState::Paused,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("unknown VM action {other:?}: start, stop, pause or resume"),
            ));
        }
    };
    let applied = workload(
        &state,
        WorkloadCommand::VmSetDesired {
            name: name.clone(),
            desired,
            now_ms: state.cluster.clock.now_ms(),
        },
    )
    .await?;
    Ok(Json(
        serde_json::json!({ "vm": name, "desired": desired_name(desired), "result": format!("{applied:?}") }),
    ))
}

#[utoipa::path(get, path = "/v1/vms/{name}/logs", summary = "The tail of a VM's console, from the node that runs it", params(("name" = String, Path, description = "the VM"), ("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader")), responses((status = 200, body = String, content_type = "text/plain")))]
pub(crate) async fn vm_logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let node = state
        .cluster
        .node
        .with_local_state(|s| s.vms.get(&name).map(|vm| vm.node.clone()));
    let node = match node {
        None => return Err(no_vm(&name)),
        Some(None) => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("VM {name} is not placed on any node yet"),
            ));
        }
        Some(Some(n)) => n,
    };
    let max = q.bytes.unwrap_or(64 * 1024).min(crate::raft::MAX_LOG_TAIL);
    let bytes = state
        .cluster
        .console_log(&node, &name, max)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(([("content-type", "text/plain; charset=utf-8")], bytes).into_response())
}

#[utoipa::path(get, path = "/v1/nodes", summary = "List nodes", params(("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn node_list(
    State(state): State<ApiState>,
    q: Query,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    let q = query(q)?;
    let s = read(&state, q.stale).await?;
    Ok(Json(
        s.nodes
            .iter()
            .map(|(id, n)| NodeView::of(id, n, &s))
            .collect(),
    ))
}

/// A node by id or by name; an ambiguous name is refused.
fn find_node(s: &ClusterState, node: &str) -> Result<String, ApiError> {
    if s.nodes.contains_key(node) {
        return Ok(node.to_string());
    }
    let by_name: Vec<&String> = s
        .nodes
        .iter()
        .filter(|(_, n)| n.name == node)
        .map(|(id, _)| id)
        .collect();
    match by_name.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no node with id or name {node:?}"),
        )),
        _ => Err(bad(format!(
            "{} nodes are named {node:?}: use the id",
            by_name.len()
        ))),
    }
}

#[utoipa::path(post, path = "/v1/nodes/{node}/{action}", summary = "cordon, uncordon, drain or remove a node", params(("node" = String, Path, description = "the node id or name"), ("action" = String, Path, description = "cordon, uncordon, drain or remove")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn node_action(
    State(state): State<ApiState>,
    Path((node, action)): Path<(String, String)>,
) -> Result<Json<NodeView>, ApiError> {
    let (cordoned, draining) = match action.as_str() {
        "drain" => (None, Some(true)),
        "cordon" => (Some(true), None),
        "uncordon" => (Some(false), Some(false)),
        "remove" => (Some(true), Some(true)),
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("unknown node action {other:?}: drain, cordon, uncordon or remove"),
            ));
        }
    };
    let s = read(&state, false).await?;
    let id = find_node(&s, &node)?;
    if action == "remove" {
        // Revoke first: once that commits, every member refuses the node's certificate, and
        // draining it moves its VMs elsewhere.
        let node_id: blx_membership::NodeId = id
            .parse()
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("bad node id {id}")))?;
        if node_id == state.self_id {
            return Err(ApiError(
                StatusCode::CONFLICT,
                "a node cannot remove itself: ask another member's API".into(),
            ));
        }
        let cmd = blx_consensus::state::Command::Authority(
            blx_consensus::authority::AuthorityCommand::NodeRevoke(node_id),
        );
        match state.cluster.write(cmd).await {
            Ok(Ok(_)) => tracing::info!(node = %id, "node removed: its certificate is revoked"),
            Ok(Err(e)) => return Err(ApiError(StatusCode::CONFLICT, e.to_string())),
            Err(e) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
    }
    workload(
        &state,
        WorkloadCommand::NodeSet {
            id: id.clone(),
            cordoned,
            draining,
            labels_set: BTreeMap::new(),
            labels_remove: Vec::new(),
        },
    )
    .await?;
    node_view(&state, &id).await
}

async fn node_view(state: &ApiState, id: &str) -> Result<Json<NodeView>, ApiError> {
    let s = read(state, false).await?;
    s.nodes
        .get(id)
        .map(|n| Json(NodeView::of(id, n, &s)))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no node {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LabelChange {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[utoipa::path(put, path = "/v1/nodes/{node}/labels", summary = "Change a node's labels", request_body = serde_json::Value, params(("node" = String, Path, description = "the node id or name")), responses((status = 200, body = serde_json::Value)))]
pub(crate) async fn node_labels(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    body: Result<Json<LabelChange>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let Json(body) = body.map_err(|e| bad(e.body_text()))?;
    let s = read(&state, false).await?;
    let id = find_node(&s, &node)?;
    workload(
        &state,
        WorkloadCommand::NodeSet {
            id: id.clone(),
            cordoned: None,
            draining: None,
            labels_set: body.set,
            labels_remove: body.remove,
        },
    )
    .await?;
    node_view(&state, &id).await
}
