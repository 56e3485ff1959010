//! `potluck monitor`: joins a run as a reader, gathers every peer's metrics record
//! ([`potluck_train::metrics`]) and the swarm's reports of banned peers, draws with the newest
//! checkpoint ([`samples`]), keeps the history on disk ([`store`]: SQLite, a restart loses
//! nothing) and serves it over HTTP: a dashboard with everything embedded (no outside assets),
//! a JSON API behind it, Prometheus `/metrics`, sample images, a prompt form and a join page.

mod samples;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::{Json, Router, routing};
use potluck_core::{clock, lock};
use potluck_net::host::ClientMode;
use potluck_train::metrics;
use serde::Deserialize;

use crate::cmd::joining::{NetArgs, start_dht};
use samples::{Drawing, Slot};
use store::Store;
use watch::Watch;

/// A prompt from the form: at most this many bytes.
const MAX_PROMPT: usize = 300;
/// Prompt-form requests drawing or waiting to, at most; more are told to come back.
const MAX_DRAWING: usize = 4;
/// A prompt-form request gives up waiting for the model after this long.
const DRAW_WAIT: Duration = Duration::from_secs(120);
/// A connection to the dashboard lives this long at most (its page reconnects as browsers do;
/// longer than a drawing may wait).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck monitor --run-id shapes1 --initial-peers \
                  /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW… --http 127.0.0.1:8080 --data monitor \
                  --checkpoints runs/aux\n\
                  Then open http://127.0.0.1:8080 (JSON at /api/status, Prometheus at /metrics, \
                  the join page at /join)"
)]
pub(crate) struct Args {
    /// The run to watch.
    #[arg(long)]
    pub(crate) run_id: String,
    #[command(flatten)]
    pub(crate) net: NetArgs,
    /// Where to serve the dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) http: SocketAddr,
    /// Where the history is kept (created if missing): DIR/history.sqlite.
    #[arg(long, default_value = "monitor")]
    pub(crate) data: PathBuf,
    /// Seconds between reads of the run's records.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) every: f64,
    /// Draw sample images with the newest checkpoint here: an aux peer's --checkpoint-dir (the
    /// newest of its epoch-NNNNNNN) or one checkpoint directory. Also answers the dashboard's
    /// prompt form.
    #[arg(long)]
    pub(crate) checkpoints: Option<PathBuf>,
    /// Prompts of the sample images (repeat) [default: eight prompts of the `shapes` grammar].
    #[arg(long = "prompt")]
    pub(crate) prompts: Vec<String>,
    /// Prompts of the `shapes` grammar each new checkpoint is scored on (0: none); only for
    /// runs on `shapes`.
    #[arg(long, default_value_t = 32)]
    pub(crate) eval_prompts: usize,
    /// Seconds between looks for a newer checkpoint.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) samples_every: f64,
    /// Sampling temperature of the samples, the scored prompts and the prompt form (lower
    /// draws more conservatively).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f64,
    /// CPU threads for drawing.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// A host name the dashboard is reached by (repeat), besides IP addresses and localhost:
    /// the prompt form answers only requests addressed to these (a page elsewhere cannot make
    /// this monitor draw for it).
    #[arg(long = "allow-host")]
    pub(crate) allow_hosts: Vec<String>,
}

const DASHBOARD: &str = include_str!("dashboard.html");

pub(crate) fn run(mut args: Args) -> Result<()> {
    for (flag, v, min) in [
        ("--every", args.every, 0.1),
        ("--samples-every", args.samples_every, 1.0),
    ] {
        if !v.is_finite() || v < min {
            bail!("{flag} must be at least {min} seconds");
        }
    }
    if args.prompts.len() > store::MAX_SAMPLES || args.prompts.iter().any(|p| p.len() > MAX_PROMPT)
    {
        bail!(
            "at most {} --prompt of at most {MAX_PROMPT} bytes each",
            store::MAX_SAMPLES
        );
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!("--temperature must be above 0");
    }
    if args.eval_prompts > 1000 {
        bail!("--eval-prompts: at most 1000");
    }
    crate::cmd::train::set_threads(Some(args.threads));
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let path = args.data.join("history.sqlite");
    let store = Store::open(&path)?;
    let loaded = store.load()?;
    if loaded.damaged > 0 {
        tracing::warn!(
            "{}: {} damaged rows skipped",
            path.display(),
            loaded.damaged
        );
    }
    let mut watch = Watch::default();
    for line in loaded.lines {
        watch.take(line);
    }
    watch.samples = loaded.samples;
    let watch = Arc::new(Mutex::new(watch));
    let store = Arc::new(Mutex::new(store));
    // A monitor reads the run: it serves nobody.
    args.net.client_mode = ClientMode::On;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = crate::cmd::http::bind(args.http, CONNECTION_LIFETIME).await?;
        let (dht, _) = start_dht(&args.run_id, &args.net).await?;
        let join = join_command(&args);
        println!(
            "monitor for run {}: http://{} (history in {})",
            args.run_id,
            listener.local_addr()?,
            path.display()
        );
        let slot: Slot = Arc::default();
        let shared = Arc::new(Shared {
            watch: watch.clone(),
            run: args.run_id.clone(),
            join,
            slot: slot.clone(),
            drawing: tokio::sync::Semaphore::new(MAX_DRAWING),
            temperature: args.temperature,
            drawer: args.checkpoints.is_some(),
            allow_hosts: args.allow_hosts.clone(),
        });
        if let Some(dir) = &args.checkpoints {
            let prompts = if args.prompts.is_empty() {
                crate::cmd::run::SAMPLE_PROMPTS
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect()
            } else {
                args.prompts.clone()
            };
            let d = Drawing {
                checkpoints: dir.clone(),
                prompts,
                eval_prompts: args.eval_prompts,
                temperature: args.temperature,
                every: Duration::from_secs_f64(args.samples_every),
            };
            tokio::spawn(samples::keep_drawing(d, slot, watch.clone(), store.clone()));
        }
        let server = axum::serve(listener, router(shared)).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let poll = poll(dht, args.run_id.clone(), watch, store, args.every);
        tokio::select! {
            served = server => served.context("serving HTTP"),
            polled = poll => polled,
        }
    })
}

/// Reads the run's records every `every` seconds and keeps what is new in the history.
async fn poll(
    dht: potluck_net::dht::Dht,
    run: String,
    watch: Arc<Mutex<Watch>>,
    store: Arc<Mutex<Store>>,
    every: f64,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let records = match metrics::fetch(&dht, &run).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("reading the run's metrics: {e}");
                continue;
            }
        };
        let reports = potluck_train::reports::fetch(&dht, &run)
            .await
            .unwrap_or_default();
        let records = records
            .into_iter()
            .map(|(p, m)| (p.to_string(), m))
            .collect();
        let new = {
            let mut w = lock(&watch);
            w.reports = reports
                .into_iter()
                .map(|(by, who, why)| (by.to_string(), who.to_string(), why))
                .collect();
            w.update(records, clock::now())
        };
        lock(&store).append(&new)?;
    }
}

/// The command a newcomer runs to join (the join page).
fn join_command(args: &Args) -> String {
    let peers = if args.net.initial_peers.is_empty() {
        "ADDRESS_OF_A_PEER".to_owned()
    } else {
        args.net.initial_peers.join(",")
    };
    let (auth, how) = match &args.net.auth.authority {
        Some(key) => (
            format!(" --authority {key} --identity id.key --token my.token"),
            "   # a token from the run's organiser: potluck authority request --url … --invite \
             CODE --identity id.key --out my.token",
        ),
        None => (String::new(), ""),
    };
    // The data is encoded with the run's tokenizers, downloaded from its peers: data encoded
    // with tokenizers of its own would be refused.
    let run = &args.run_id;
    format!(
        "potluck prepare --from-run {run} --initial-peers {peers}{auth} --dataset shapes \
         --out data/{run} && potluck train --run-id {run} --initial-peers {peers} --data \
         data/{run} --config small --out my-checkpoint{auth}{how}"
    )
}

/// What the handlers share.
struct Shared {
    watch: Arc<Mutex<Watch>>,
    run: String,
    join: String,
    slot: Slot,
    /// Prompt-form requests drawing or waiting to.
    drawing: tokio::sync::Semaphore,
    /// The monitor was given checkpoints to draw with.
    drawer: bool,
    temperature: f64,
    /// Host names the prompt form answers to, besides IP addresses and localhost.
    allow_hosts: Vec<String>,
}

/// The header the dashboard's prompt form sends with every drawing request.
const DRAW_HEADER: &str = "x-potluck";

/// Whether a drawing request comes from this monitor's own dashboard. Drawing costs seconds of
/// CPU, and any web page can make a visitor's browser GET any URL (an `<img>`): but it cannot
/// add a header to it without this server's CORS consent (never given), so the form's header
/// must be there; an `Origin` must be this host; and the `Host` must be an IP address,
/// localhost or an allowed name, so a name that someone else's DNS points here (rebinding)
/// does not make the page this monitor's own.
fn from_the_dashboard(headers: &header::HeaderMap, allow_hosts: &[String]) -> Result<(), String> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
    };
    if text(DRAW_HEADER) != Some("draw") {
        return Err(format!(
            "drawing answers the dashboard's prompt form only (send the header `{DRAW_HEADER}: draw`)"
        ));
    }
    let host = text(header::HOST.as_str()).unwrap_or_default();
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let known = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(name));
    if !known {
        return Err(format!(
            "this monitor answers drawing requests addressed to {name:?} only if started with \
             --allow-host {name}"
        ));
    }
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(format!("a page of {origin} cannot draw here"));
        }
    }
    Ok(())
}

/// The prompt form's request.
#[derive(Debug, Deserialize)]
struct Prompt {
    prompt: String,
    #[serde(default)]
    seed: u64,
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, why.into()).into_response()
}

fn png(bytes: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        bytes,
    )
        .into_response()
}

/// `GET /api/generate?prompt=…&seed=…`: one image for a prompt, drawn with the newest
/// checkpoint, as a PNG.
async fn generate(
    State(s): State<Arc<Shared>>,
    headers: header::HeaderMap,
    Query(q): Query<Prompt>,
) -> Response {
    if let Err(why) = from_the_dashboard(&headers, &s.allow_hosts) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    let prompt = q.prompt.trim().to_owned();
    if prompt.is_empty() || prompt.len() > MAX_PROMPT {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("a prompt is 1 to {MAX_PROMPT} bytes"),
        );
    }
    if !s.drawer {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this monitor draws nothing: start it with --checkpoints DIR (an aux peer's \
             checkpoint directory)",
        );
    }
    let Ok(_permit) = s.drawing.try_acquire() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "busy drawing for others: try again in a few seconds",
        );
    };
    let Ok(guard) = tokio::time::timeout(DRAW_WAIT, s.slot.clone().lock_owned()).await else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is busy: try again in a minute",
        );
    };
    let temperature = s.temperature;
    let job = tokio::task::spawn_blocking(move || {
        let model = guard.as_ref().ok_or_else(|| {
            anyhow::anyhow!("no checkpoint to draw with yet: it comes with the run's first one")
        })?;
        samples::draw_one(model, &prompt, q.seed, temperature)
    });
    match job.await {
        Ok(Ok(bytes)) => png(bytes),
        Ok(Err(e)) => refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", routing::get(|| async { Html(DASHBOARD) }))
        .route(
            "/api/status",
            routing::get(|State(s): State<Arc<Shared>>| async move {
                let value = lock(&s.watch).status(&s.run, &s.join, clock::now());
                Json(value)
            }),
        )
        .route("/api/generate", routing::get(generate))
        .route(
            "/samples/{epoch}/{i}",
            routing::get(
                |State(s): State<Arc<Shared>>, UrlPath((epoch, i)): UrlPath<(u64, usize)>| async move {
                    match samples::sample_png(&lock(&s.watch), epoch, i) {
                        Some(bytes) => png(bytes),
                        None => refuse(StatusCode::NOT_FOUND, "no such sample (a newer set replaced it?)"),
                    }
                },
            ),
        )
        .route(
            "/metrics",
            routing::get(|State(s): State<Arc<Shared>>| async move {
                let text = lock(&s.watch).prometheus(&s.run, clock::now());
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
            }),
        )
        .route(
            "/join",
            routing::get(|State(s): State<Arc<Shared>>| async move {
                format!(
                    "Join run {}\n\n\
                     What it takes: a 64-bit Linux machine with 2 CPU cores and 4 GB of memory \
                     or more (`small` trains at about 25 samples/s a core; a GPU does far more: \
                     add --device cuda to a CUDA build), 2 GB of disk, and an outgoing Internet \
                     connection (behind a NAT the peer joins as a client by itself).\n\n\
                     With potluck built (`make build`), run:\n\n{}\n\n\
                     It encodes the data with the run's tokenizers (downloaded from its peers), \
                     downloads the swarm's state, trains with the others and writes its \
                     checkpoint to my-checkpoint; stop it any time with Ctrl-C.\n",
                    s.run, s.join
                )
            }),
        )
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> header::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    header::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    /// The prompt form draws for this monitor's own dashboard only: a page elsewhere (an
    /// `<img>` with no header, a foreign Origin, a rebound DNS name) is refused.
    #[test]
    fn only_the_dashboard_may_draw() {
        let allow = vec!["monitor.example.org".to_owned()];
        let ok = |h: &[(&'static str, &str)]| from_the_dashboard(&headers(h), &allow).is_ok();
        assert!(ok(&[("host", "127.0.0.1:8080"), ("x-potluck", "draw")]));
        assert!(ok(&[("host", "[::1]:8080"), ("x-potluck", "draw")]));
        assert!(ok(&[("host", "localhost:8080"), ("x-potluck", "draw")]));
        assert!(ok(&[
            ("host", "monitor.example.org"),
            ("x-potluck", "draw"),
            ("origin", "https://monitor.example.org"),
        ]));
        // An <img> on another page: no header.
        assert!(!ok(&[("host", "127.0.0.1:8080")]));
        // A script on another page that got the header through somehow: its Origin.
        assert!(!ok(&[
            ("host", "127.0.0.1:8080"),
            ("x-potluck", "draw"),
            ("origin", "http://evil.example"),
        ]));
        // DNS rebinding: the page's own name, pointed here.
        assert!(!ok(&[("host", "evil.example:8080"), ("x-potluck", "draw")]));
    }
}
