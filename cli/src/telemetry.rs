//! OTLP export of traces, metrics and logs, configured only by the standard `OTEL_*`
//! environment variables, and the process's log output.
//!
//! Nothing set means nothing exported: no exporter, no thread, no span context. A signal is
//! exported when its endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the signal's own
//! `OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT`), unless `OTEL_{signal}_EXPORTER=none`
//! or `OTEL_SDK_DISABLED=true` (which the SDK itself ignores). The protocol is `grpc` or
//! `http/protobuf` (the default), per signal or for all. The exporter reads the endpoint,
//! headers, timeout and compression variables; the SDK reads `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and the batch variables.
//!
//! A collector that is down, slow or refusing never holds the agent up: spans and log
//! records wait in bounded queues that the SDK's own threads drain, metrics are read on the
//! exporter's thread, and whatever could not be queued or delivered is counted by signal in
//! `blx_telemetry_dropped_total`.
//!
//! The agent learns who it is (its node id) only once it is admitted, after logging began;
//! the exporters add the node's attributes (`service.instance.id`, `host.name`, `blx.zone`)
//! to their resource at their first export after that ([`identified`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Spans or log records waiting for export, at most.
const QUEUE: usize = 4096;

/// The three OTLP signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Spans.
    Traces,
    /// Metric points.
    Metrics,
    /// Log records.
    Logs,
}

impl Signal {
    const ALL: [Signal; 3] = [Signal::Traces, Signal::Metrics, Signal::Logs];

    /// The signal's name in metrics labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
            Signal::Logs => "LOGS",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How one signal is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    /// Not at all.
    Off,
    /// OTLP over gRPC.
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

/// What the environment asks for, per signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Spans.
    pub traces: Export,
    /// Metrics.
    pub metrics: Export,
    /// Logs.
    pub logs: Export,
}

impl Settings {
    /// Reads the `OTEL_*` variables through `var`. A value blx cannot honour (an unknown
    /// protocol, `http/json`, an `https` endpoint, an exporter other than `otlp` or `none`)
    /// is refused, naming the variable, rather than exporting something else.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let var = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let off = Settings {
            traces: Export::Off,
            metrics: Export::Off,
            logs: Export::Off,
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(off);
        }
        let mut settings = off;
        for signal in Signal::ALL {
            let s = signal.env();
            let exporter_var = format!("OTEL_{s}_EXPORTER");
            match var(&exporter_var).as_deref() {
                None | Some("otlp") => {}
                Some("none") => continue,
                Some(other) => {
                    return Err(format!(
                        "{exporter_var}={other}: blx exports only \"otlp\" (or \"none\")"
                    ));
                }
            }
            let endpoint_var = format!("OTEL_EXPORTER_OTLP_{s}_ENDPOINT");
            let (endpoint_var, endpoint) = match var(&endpoint_var) {
                Some(e) => (endpoint_var, e),
                None => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                    Some(e) => ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), e),
                    None => continue,
                },
            };
            let protocol_var = format!("OTEL_EXPORTER_OTLP_{s}_PROTOCOL");
            let (protocol_var, protocol) = match var(&protocol_var) {
                Some(p) => (protocol_var, p),
                None => (
                    "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
                    var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into()),
                ),
            };
            let export = match protocol.as_str() {
                "grpc" => Export::Grpc,
                "http/protobuf" => Export::HttpProtobuf,
                "http/json" => {
                    return Err(format!(
                        "{protocol_var}=http/json: blx speaks OTLP as grpc or http/protobuf"
                    ));
                }
                other => {
                    return Err(format!(
                        "{protocol_var}={other}: expected grpc or http/protobuf"
                    ));
                }
            };
            if !endpoint.starts_with("http://") {
                return Err(format!(
                    "{endpoint_var}={endpoint}: blx exports over plain http:// only (an https \
                     collector needs a local collector or agent in front of it)"
                ));
            }
            match signal {
                Signal::Traces => settings.traces = export,
                Signal::Metrics => settings.metrics = export,
                Signal::Logs => settings.logs = export,
            }
        }
        Ok(settings)
    }
}

/// What each signal dropped, for `blx_telemetry_dropped_total`.
static DROPPED: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// How many items of `signal` were dropped so far in this process.
pub fn dropped(signal: Signal) -> u64 {
    DROPPED[signal.index()].load(Ordering::Relaxed)
}

fn drop_items(signal: Signal, n: usize) {
    DROPPED[signal.index()].fetch_add(n as u64, Ordering::Relaxed);
}

/// The node's own resource attributes, once it knows them.
static NODE: OnceLock<Vec<KeyValue>> = OnceLock::new();

/// The process's pipeline.
struct Pipeline {
    settings: Settings,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    logger: Option<opentelemetry_sdk::logs::SdkLoggerProvider>,
    meter: Mutex<Option<opentelemetry_sdk::metrics::SdkMeterProvider>>,
}

static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// Sets up logging to standard error (filtered by `filter`) and, where the environment asks
/// for it, OTLP export of spans and log records. Must run inside the tokio runtime (the gRPC
/// exporter needs one) and once per process.
pub fn init(filter: &str, ansi: bool) -> Result<(), String> {
    let filter = parse_filter(filter)?;
    let settings = Settings::from_env(|k| std::env::var(k).ok())?;
    let base = base_resource();
    let tracer = match settings.traces {
        Export::Off => None,
        export => Some(tracer_provider(export, &base)?),
    };
    let logger = match settings.logs {
        Export::Off => None,
        export => Some(logger_provider(export, &base)?),
    };
    let traces = tracer.as_ref().map(|tp| {
        tracing_opentelemetry::layer()
            .with_tracer(tp.tracer("blx"))
            // Busy and idle time per span cost two clock reads on every poll of every
            // instrumented future; the span's own start and end are what operators read.
            .with_tracked_inactivity(false)
    });
    let logs = match &logger {
        Some(lp) => {
            Some(opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(lp))
        }
        None => None,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // One filter for the whole stack, not one per layer: the three layers want the same
    // directives, and per-layer filters keep a thread-local record of each event's verdicts
    // that a re-entrant `tracing` call (an event made while another is being filtered or
    // recorded, as the OTel SDK's own logs can be) leaves wrong, so that a layer misses or
    // gets events it should not (tokio-rs/tracing#2704).
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(traces)
        .with(logs)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let _ = PIPELINE.set(Pipeline {
        settings,
        tracer,
        logger,
        meter: Mutex::new(None),
    });
    Ok(())
}

/// Sets up logging to standard error only, for client commands: they export nothing.
pub fn init_local(filter: &str, ansi: bool) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(parse_filter(filter)?)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

/// A log filter in `BLX_LOG`'s syntax (`warn,blx=info`).
fn parse_filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(directives)
        .map_err(|e| format!("BLX_LOG={directives}: {e}"))
}

/// The resource every signal starts from: the SDK's (which reads `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`), named `blx` unless the operator named it.
fn base_resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name("blx").build()
    }
}

/// `base` with the node's attributes, once they are known.
fn with_node(base: &Resource) -> Option<Resource> {
    let node = NODE.get()?;
    let mut attrs: BTreeMap<String, KeyValue> = base
        .iter()
        .map(|(k, v)| (k.to_string(), KeyValue::new(k.clone(), v.clone())))
        .collect();
    for kv in node {
        // What the operator set in OTEL_RESOURCE_ATTRIBUTES wins.
        attrs
            .entry(kv.key.to_string())
            .or_insert_with(|| kv.clone());
    }
    Some(
        Resource::builder_empty()
            .with_attributes(attrs.into_values())
            .build(),
    )
}

/// Who this agent is, for the exporters' resource, and what its metrics are.
pub struct NodeTelemetry {
    /// The node id (`service.instance.id`).
    pub id: String,
    /// The node's name (`host.name`).
    pub name: String,
    /// Its failure zone (`blx.zone`).
    pub zone: Option<String>,
    /// The agent's metrics as Prometheus text, read at each metrics export.
    pub render: Arc<dyn Fn() -> String + Send + Sync>,
}

/// Called once the agent knows its node id: the exporters put it on everything they send
/// from now on, and metrics export starts.
pub fn identified(node: &NodeTelemetry) {
    let mut attrs = vec![
        KeyValue::new("service.instance.id", node.id.clone()),
        KeyValue::new("host.name", node.name.clone()),
    ];
    if let Some(zone) = &node.zone {
        attrs.push(KeyValue::new("blx.zone", zone.clone()));
    }
    let _ = NODE.set(attrs);
    let Some(pipeline) = PIPELINE.get() else {
        return;
    };
    if pipeline.settings.metrics == Export::Off {
        return;
    }
    let mut meter = pipeline.meter.lock().unwrap_or_else(|e| e.into_inner());
    if meter.is_some() {
        return;
    }
    let resource = with_node(&base_resource()).unwrap_or_else(base_resource);
    match meter_provider(pipeline.settings.metrics, resource, node.render.clone()) {
        Ok(provider) => *meter = Some(provider),
        Err(e) => tracing::warn!(error = %e, "metrics are not exported"),
    }
}

/// Flushes and stops the exporters, each within a few seconds. Blocks: call it from a plain
/// thread (or `spawn_blocking`), not from an async task.
pub fn shutdown() {
    let Some(p) = PIPELINE.get() else {
        return;
    };
    let within = Duration::from_secs(3);
    if let Some(tp) = &p.tracer {
        let _ = tp.shutdown_with_timeout(within);
    }
    if let Some(lp) = &p.logger {
        let _ = lp.shutdown_with_timeout(within);
    }
    if let Some(mp) = p.meter.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = mp.shutdown_with_timeout(within);
    }
}

fn build_error(signal: Signal) -> impl Fn(opentelemetry_otlp::ExporterBuildError) -> String {
    move |e| format!("cannot set up OTLP {} export: {e}", signal.name())
}

fn tracer_provider(
    export: Export,
    base: &Resource,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::SpanExporter;
    let exporter = match export {
        Export::Grpc => SpanExporter::builder().with_tonic().build(),
        _ => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
    }
    .map_err(build_error(Signal::Traces))?;
    let pending = Arc::new(AtomicUsize::new(0));
    let exporter = Counted::new(exporter, Signal::Traces, pending.clone());
    let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE * 2)
                .build(),
        )
        .build();
    let processor = Bounded {
        inner: batch,
        pending,
        signal: Signal::Traces,
    };
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(base.clone())
        .build())
}

fn logger_provider(
    export: Export,
    base: &Resource,
) -> Result<opentelemetry_sdk::logs::SdkLoggerProvider, String> {
    use opentelemetry_otlp::LogExporter;
    let exporter = match export {
        Export::Grpc => LogExporter::builder().with_tonic().build(),
        _ => LogExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
    }
    .map_err(build_error(Signal::Logs))?;
    let pending = Arc::new(AtomicUsize::new(0));
    let exporter = Counted::new(exporter, Signal::Logs, pending.clone());
    let batch = opentelemetry_sdk::logs::BatchLogProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::logs::BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE * 2)
                .build(),
        )
        .build();
    let processor = Bounded {
        inner: batch,
        pending,
        signal: Signal::Logs,
    };
    Ok(opentelemetry_sdk::logs::SdkLoggerProvider::builder()
        .with_log_processor(processor)
        .with_resource(base.clone())
        .build())
}

fn meter_provider(
    export: Export,
    resource: Resource,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<opentelemetry_sdk::metrics::SdkMeterProvider, String> {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_otlp::MetricExporter;
    let exporter = match export {
        Export::Grpc => MetricExporter::builder().with_tonic().build(),
        _ => MetricExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
    }
    .map_err(build_error(Signal::Metrics))?;
    let reader =
        opentelemetry_sdk::metrics::PeriodicReader::builder(CountedMetrics(exporter)).build();
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader)
        .build();
    bridge(&provider.meter("blx"), render);
    Ok(provider)
}

/// Exports the agent's Prometheus metrics as OTLP instruments of the same names: counters
/// as counters (without Prometheus's `_total`), gauges as gauges, and histograms as their
/// `_count` and `_sum` counters. Each export renders the metrics once.
fn bridge(meter: &opentelemetry::metrics::Meter, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let cache = Arc::new(Snapshot {
        render,
        last: Mutex::new(None),
    });
    for family in parse(&(cache.render)()).families {
        let (kind, name) = family;
        let sample_names: Vec<String> = match kind.as_str() {
            "histogram" => vec![format!("{name}_count"), format!("{name}_sum")],
            _ => vec![name.clone()],
        };
        for sample in sample_names {
            let cache = cache.clone();
            let wanted = sample.clone();
            let callback = move |obs: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
                for s in cache.get().samples.iter().filter(|s| s.name == wanted) {
                    let attrs: Vec<KeyValue> = s
                        .labels
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                        .collect();
                    obs.observe(s.value, &attrs);
                }
            };
            let otel_name = sample.strip_suffix("_total").unwrap_or(&sample).to_string();
            if kind == "gauge" {
                meter
                    .f64_observable_gauge(otel_name)
                    .with_callback(callback)
                    .build();
            } else {
                meter
                    .f64_observable_counter(otel_name)
                    .with_callback(callback)
                    .build();
            }
        }
    }
}

/// The latest rendering of the metrics, reused within one export.
struct Snapshot {
    render: Arc<dyn Fn() -> String + Send + Sync>,
    last: Mutex<Option<(std::time::Instant, Arc<Parsed>)>>,
}

impl Snapshot {
    fn get(&self) -> Arc<Parsed> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((at, p)) if at.elapsed() < Duration::from_millis(500) => p.clone(),
            _ => {
                let p = Arc::new(parse(&(self.render)()));
                *last = Some((std::time::Instant::now(), p.clone()));
                p
            }
        }
    }
}

/// The agent's own Prometheus text, read back.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    /// (type, name) of each family.
    families: Vec<(String, String)>,
    samples: Vec<Sample>,
}

#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Reads the 0.0.4 text format as the agent writes it: `# TYPE name kind` lines, and
/// `name{k="v",...} value` samples, label values escaped with backslashes.
fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                out.families.push((kind.to_string(), name.to_string()));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = parse_sample(line) {
            out.samples.push(s);
        }
    }
    out
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut key = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '}' => {
                    let (i, _) = chars.next()?;
                    rest = &after[i..];
                    break;
                }
                ',' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A span or log processor that keeps at most [`QUEUE`] items waiting for export and counts
/// the rest as dropped, in front of the SDK's batch processor (whose own queue is larger, so
/// it never drops uncounted).
#[derive(Debug)]
struct Bounded<P> {
    inner: P,
    pending: Arc<AtomicUsize>,
    signal: Signal,
}

impl<P> Bounded<P> {
    /// Takes a place in the queue, or counts the item as dropped.
    fn admit(&self) -> bool {
        let taken = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < QUEUE).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            drop_items(self.signal, 1);
        }
        taken
    }
}

impl<P: opentelemetry_sdk::trace::SpanProcessor> opentelemetry_sdk::trace::SpanProcessor
    for Bounded<P>
{
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        if self.admit() {
            self.inner.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Targets whose events are never exported as logs: the exporter's own stack, whose
/// complaints about a missing collector would otherwise be queued for that collector.
fn exporter_internal(target: &str) -> bool {
    ["opentelemetry", "hyper", "h2", "tonic", "tower", "reqwest"]
        .iter()
        .any(|t| target.starts_with(t))
}

impl<P: opentelemetry_sdk::logs::LogProcessor> opentelemetry_sdk::logs::LogProcessor
    for Bounded<P>
{
    fn emit(
        &self,
        record: &mut opentelemetry_sdk::logs::SdkLogRecord,
        scope: &opentelemetry::InstrumentationScope,
    ) {
        if record.target().is_some_and(|t| exporter_internal(t)) {
            return;
        }
        if self.admit() {
            self.inner.emit(record, scope);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn event_enabled(
        &self,
        level: opentelemetry::logs::Severity,
        target: &str,
        name: Option<&str>,
    ) -> bool {
        !exporter_internal(target) && self.inner.event_enabled(level, target, name)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// An exporter that frees [`Bounded`]'s places as batches leave, counts batches that could
/// not be delivered as dropped, and adds the node's attributes to the resource once known.
#[derive(Debug)]
struct Counted<E> {
    inner: Arc<tokio::sync::Mutex<E>>,
    signal: Signal,
    pending: Arc<AtomicUsize>,
    base: Arc<Mutex<Resource>>,
    with_node: Arc<std::sync::atomic::AtomicBool>,
}

impl<E> Counted<E> {
    fn new(inner: E, signal: Signal, pending: Arc<AtomicUsize>) -> Self {
        Counted {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            signal,
            pending,
            base: Arc::new(Mutex::new(Resource::builder_empty().build())),
            with_node: Default::default(),
        }
    }

    /// The resource to switch to before this export, if the node became known.
    fn node_resource(&self) -> Option<Resource> {
        if self.with_node.load(Ordering::Acquire) {
            return None;
        }
        let base = self.base.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let resource = with_node(&base)?;
        self.with_node.store(true, Ordering::Release);
        Some(resource)
    }

    fn settle(&self, n: usize, result: &OTelSdkResult) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
        if result.is_err() {
            drop_items(self.signal, n);
        }
    }
}

/// The span and log exporters' traits have the same shape; one body serves both.
macro_rules! counted_exporter {
    ($exporter:path, $batch:ty, $len:expr) => {
        impl<E: $exporter> $exporter for Counted<E> {
            async fn export(&self, batch: $batch) -> OTelSdkResult {
                let n = $len(&batch);
                let mut inner = self.inner.lock().await;
                if let Some(r) = self.node_resource() {
                    inner.set_resource(&r);
                }
                let result = inner.export(batch).await;
                self.settle(n, &result);
                result
            }

            fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
                match self.inner.try_lock() {
                    Ok(inner) => inner.shutdown_with_timeout(timeout),
                    Err(_) => Ok(()),
                }
            }

            fn set_resource(&mut self, resource: &Resource) {
                *self.base.lock().unwrap_or_else(|e| e.into_inner()) = resource.clone();
                if let Ok(mut inner) = self.inner.try_lock() {
                    inner.set_resource(resource);
                }
            }
        }
    };
}

counted_exporter!(
    opentelemetry_sdk::trace::SpanExporter,
    Vec<opentelemetry_sdk::trace::SpanData>,
    |b: &Vec<_>| b.len()
);
counted_exporter!(
    opentelemetry_sdk::logs::LogExporter,
    opentelemetry_sdk::logs::LogBatch<'_>,
    |b: &opentelemetry_sdk::logs::LogBatch<'_>| b.iter().count()
);

/// A metric exporter that counts exports that could not be delivered.
struct CountedMetrics<E>(E);

impl<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>
    opentelemetry_sdk::metrics::exporter::PushMetricExporter for CountedMetrics<E>
{
    async fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> OTelSdkResult {
        let result = self.0.export(metrics).await;
        if result.is_err() {
            drop_items(Signal::Metrics, 1);
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.0.temporality()
    }
}

/// The W3C `traceparent` of the current span, if it is being exported.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Sends one OTLP log record straight to the SDK's logger, when logs are exported: `body`
/// under `target`, at info, with `attributes`, and with the trace of the current span if
/// `traced` (without, the record names no trace, whatever span it leaves from). For records
/// that leave often (audit records), where a `tracing` event would be filtered, visited and
/// copied on its way to the same logger.
pub fn emit_log<const N: usize>(
    target: &'static str,
    body: impl Into<opentelemetry::logs::AnyValue>,
    attributes: [(&'static str, opentelemetry::logs::AnyValue); N],
    traced: bool,
) {
    use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _};
    static LOGGER: OnceLock<Option<opentelemetry_sdk::logs::SdkLogger>> = OnceLock::new();
    let logger = LOGGER.get_or_init(|| {
        PIPELINE
            .get()
            .and_then(|p| p.logger.as_ref())
            .map(|lp| lp.logger("blx"))
    });
    let Some(logger) = logger else {
        return;
    };
    let mut r = logger.create_log_record();
    r.set_target(target);
    r.set_severity_number(opentelemetry::logs::Severity::Info);
    r.set_severity_text("INFO");
    r.set_body(body.into());
    r.add_attributes(attributes);
    // The SDK takes the trace from the current context: an empty one names none.
    let _untraced = (!traced).then(|| opentelemetry::Context::new().attach());
    logger.emit(r);
}

/// Whether log records leave for a collector.
pub fn logs_exported() -> bool {
    PIPELINE.get().is_some_and(|p| p.logger.is_some())
}

/// Whether the current span is part of a trace that leaves for a collector. Reads the
/// OpenTelemetry context that entering the span made current (a thread-local), which costs
/// far less than asking the span for its context.
pub fn in_exported_trace() -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    traces_exported()
        && opentelemetry::Context::map_current(|cx| cx.span().span_context().is_sampled())
}

/// Whether spans leave for a collector.
pub fn traces_exported() -> bool {
    PIPELINE.get().is_some_and(|p| p.tracer.is_some())
}

/// Whether spans are exported and the sampler left `span` out of them: the caller can then
/// run without it. Spans that are not exported still serve the log lines on standard error.
pub fn sampled_out(span: &tracing::Span) -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    traces_exported() && !span.context().span().span_context().is_sampled()
}

/// Names the exported span behind `span` (its `otel.name`), after it has started.
pub fn rename(span: &tracing::Span, name: String) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if traces_exported() {
        span.context().span().update_name(name);
    }
}

/// Whether a span should be opened for work that a peer asked for with `traceparent`: always
/// when spans are not exported (they serve the log lines), and otherwise only as part of the
/// peer's trace, since a peer that sent none had its own request sampled out.
pub fn wants_remote_span(traceparent: Option<&str>) -> bool {
    traceparent.is_some() || !traces_exported()
}

/// Makes `traceparent` (W3C trace context from a request or a message) the parent of
/// `span`. Ignored when it does not parse or nothing is exported.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Some(tp) = traceparent else {
        return;
    };
    if tp.len() > 128 {
        return;
    }
    let carrier = std::collections::HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, String> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_env(|k| vars.get(k).cloned())
    }

    #[test]
    fn nothing_set_exports_nothing() {
        let s = settings(&[]).unwrap();
        assert_eq!(
            (s.traces, s.metrics, s.logs),
            (Export::Off, Export::Off, Export::Off)
        );
    }

    #[test]
    fn the_generic_endpoint_turns_on_every_signal_and_per_signal_settings_win() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc"),
            ("OTEL_LOGS_EXPORTER", "none"),
        ])
        .unwrap();
        assert_eq!(s.traces, Export::HttpProtobuf);
        assert_eq!(s.metrics, Export::Grpc);
        assert_eq!(s.logs, Export::Off);
        let s = settings(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4317/v1/traces",
        )])
        .unwrap();
        assert_eq!((s.traces, s.metrics), (Export::HttpProtobuf, Export::Off));
    }

    #[test]
    fn sdk_disabled_wins_over_everything() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])
        .unwrap();
        assert_eq!(s.traces, Export::Off);
        // Anything but "true" leaves the SDK on, as the specification says.
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "no"),
        ])
        .unwrap();
        assert_eq!(s.traces, Export::HttpProtobuf);
    }

    #[test]
    fn what_blx_cannot_honour_is_refused_by_name() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for (vars, named) in [
            (
                vec![base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![base, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp")],
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![base, ("OTEL_METRICS_EXPORTER", "prometheus")],
                "OTEL_METRICS_EXPORTER",
            ),
        ] {
            let e = settings(&vars).unwrap_err();
            assert!(e.starts_with(named), "{e}");
        }
    }

    #[test]
    fn the_agents_own_text_reads_back() {
        let text = "# HELP blx_x_total X.\n# TYPE blx_x_total counter\n\
                    blx_x_total{route=\"/v1/kv/{*key}\",method=\"PUT\",status=\"200\"} 3\n\
                    # TYPE blx_g gauge\nblx_g 1.5\nblx_q{v=\"a\\\"b\"} +Inf\n";
        let p = parse(text);
        assert_eq!(
            p.families,
            vec![
                ("counter".to_string(), "blx_x_total".to_string()),
                ("gauge".to_string(), "blx_g".to_string())
            ]
        );
        assert_eq!(
            p.samples[0].labels[0],
            ("route".into(), "/v1/kv/{*key}".into())
        );
        assert_eq!(p.samples[0].labels.len(), 3);
        assert_eq!(p.samples[0].value, 3.0);
        assert_eq!(p.samples[1].value, 1.5);
        assert_eq!(p.samples[2].labels[0].1, "a\"b");
        assert!(p.samples[2].value.is_infinite());
    }
}
