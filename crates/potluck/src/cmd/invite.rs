//! Invites: `potluck authority invite` writes codes, `potluck authority serve` hands a token to
//! a peer that presents one (as the reference run's sign-in server did with accounts), and
//! `potluck authority request` is the peer's side.
//!
//! An invite file holds one code per line: `CODE ROLE USES` (role trainer, aux or monitor; how
//! many distinct peers may use it). A code is bound to the peers that used it, in `FILE.used`
//! (`CODE PEER_ID` lines, appended and synced before a token leaves), so a restart forgets
//! nothing; a bound peer that asks again gets a fresh token (renewal).
//!
//! HTTP: `POST /token` with `{"invite": CODE, "peer": PEER_ID}` answers 200 with
//! `{"token", "role", "expires_ms"}`; 400 for a malformed request, 403 for an unknown or used-up
//! code, 429 after too many failed attempts from one address. `GET /` says what the server is.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing};
use libp2p::PeerId;
use potluck_core::lock;
use potluck_net::auth::{Authority, Role, Token};
use serde::{Deserialize, Serialize};

use super::authority::parse_ttl;
use super::http::{self, Remote};

/// An invite file is read whole: at most this many bytes.
const MAX_FILE: u64 = 16 << 20;
/// A request's body, at most.
const MAX_BODY: usize = 4096;
/// A connection to the invite server lives this long at most (a request and its answer take
/// milliseconds; a client that sends slowly is not waited for).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(20);
/// Failed attempts one address may make per minute (codes are 128 random bits: guessing is
/// hopeless, but a flood of guesses is refused cheaply).
const MAX_FAILURES: u32 = 10;
/// Addresses whose failures are remembered, at most.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority invite --invites invites.txt --count 20 --role trainer\n\
                  Hand one code to each volunteer; they get a token with `potluck authority request`"
)]
pub(crate) struct InviteArgs {
    /// The invite file to append the codes to (created if missing).
    #[arg(long)]
    pub(crate) invites: PathBuf,
    /// How many codes.
    #[arg(long, default_value_t = 1)]
    pub(crate) count: usize,
    /// The role a code's token gives.
    #[arg(long, default_value = "trainer")]
    pub(crate) role: Role,
    /// How many distinct peers may use one code.
    #[arg(long, default_value_t = 1)]
    pub(crate) uses: usize,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority serve --key authority.key --run-id shapes1 \
                  --http 0.0.0.0:8090 --invites invites.txt --ttl 6h\n\
                  A volunteer then runs: potluck authority request --url http://HOST:8090 \
                  --invite CODE --identity id.key --out my.token"
)]
pub(crate) struct ServeArgs {
    /// The authority's key file (from `potluck authority init`).
    #[arg(long, default_value = "authority.key")]
    pub(crate) key: PathBuf,
    /// The run's name.
    #[arg(long)]
    pub(crate) run_id: String,
    /// Where to listen for HTTP.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub(crate) http: SocketAddr,
    /// The invite file (`potluck authority invite`); uses are kept beside it in FILE.used.
    #[arg(long)]
    pub(crate) invites: PathBuf,
    /// How long each token is valid: e.g. 90m, 6h, 2d. Peers ask again to renew.
    #[arg(long, default_value = "6h", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck authority request --url http://203.0.113.5:8090 --invite 3f9c… \
                  --identity id.key --out my.token\n\
                  Then join with --identity id.key --authority KEY --token my.token"
)]
pub(crate) struct RequestArgs {
    /// The invite server (`potluck authority serve`), http://HOST:PORT.
    #[arg(long)]
    pub(crate) url: String,
    /// Your invite code.
    #[arg(long)]
    pub(crate) invite: String,
    /// Your identity (created if missing): the token is bound to its peer id.
    #[arg(long)]
    pub(crate) identity: PathBuf,
    /// Where to write the token.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// One code: the role it gives, how many peers may use it, and those that did.
#[derive(Debug, Clone)]
struct Invite {
    role: Role,
    uses: usize,
    peers: Vec<PeerId>,
}

/// The codes, with their uses.
#[derive(Debug)]
struct Invites {
    codes: HashMap<String, Invite>,
    used: PathBuf,
}

impl Invites {
    fn load(path: &Path) -> Result<Invites> {
        let mut codes = HashMap::new();
        for (n, line) in potluck_core::file::read_text_limited(path, MAX_FILE)
            .context("reading the invite file")?
            .lines()
            .enumerate()
        {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{} line {}", path.display(), n + 1);
            let mut words = line.split_whitespace();
            let code = words.next().unwrap_or_default().to_owned();
            let role = match words.next() {
                Some(r) => r.parse().map_err(anyhow::Error::msg).with_context(at)?,
                None => Role::Trainer,
            };
            let uses = match words.next() {
                Some(u) => u
                    .parse()
                    .with_context(|| format!("{}: uses must be a number", at()))?,
                None => 1,
            };
            codes.insert(
                code,
                Invite {
                    role,
                    uses,
                    peers: Vec::new(),
                },
            );
        }
        let used = used_path(path);
        if used.exists() {
            for line in potluck_core::file::read_text_limited(&used, MAX_FILE)
                .context("reading the invite file's uses")?
                .lines()
            {
                let mut words = line.split_whitespace();
                let (Some(code), Some(peer)) = (words.next(), words.next()) else {
                    continue;
                };
                if let (Some(invite), Ok(peer)) = (codes.get_mut(code), peer.parse::<PeerId>())
                    && !invite.peers.contains(&peer)
                {
                    invite.peers.push(peer);
                }
            }
        }
        Ok(Invites { codes, used })
    }

    /// The role `code` gives `peer`, binding the code to it (and recording that) on first use.
    fn redeem(&mut self, code: &str, peer: PeerId) -> Result<Role, &'static str> {
        let invite = self.codes.get_mut(code).ok_or("unknown invite code")?;
        if invite.peers.contains(&peer) {
            return Ok(invite.role);
        }
        if invite.peers.len() >= invite.uses {
            return Err("this invite code was used up by other peers");
        }
        let record = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.used)?;
            writeln!(f, "{code} {peer}")?;
            f.sync_all()
        };
        record().map_err(|e| {
            tracing::error!("recording an invite's use in {}: {e}", self.used.display());
            "the server could not record the invite's use"
        })?;
        invite.peers.push(peer);
        Ok(invite.role)
    }
}

/// The authority's own record of the peers it revoked, beside its key (`KEY.revoked`, a line
/// `RUN PEER` each): `authority revoke` writes it before it publishes the list, and the invite
/// server reads it at every request, so a revoked peer gets no new token whatever code it
/// presents, even where the run's DHT could not be reached.
fn revoked_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".revoked");
    PathBuf::from(name)
}

/// Adds `peers` to the authority's record of revoked peers of `run` (appended and fsynced).
pub(crate) fn record_revoked(key: &Path, run: &str, peers: &[PeerId]) -> Result<()> {
    let path = revoked_path(key);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    for peer in peers {
        writeln!(f, "{run} {peer}")?;
    }
    f.sync_all()
        .with_context(|| format!("writing {}", path.display()))
}

/// Whether the authority revoked `peer` in `run` (a record it cannot read counts as a refusal:
/// the caller fails closed).
fn is_revoked(key: &Path, run: &str, peer: &PeerId) -> Result<bool> {
    let path = revoked_path(key);
    let text = match potluck_core::file::read_text_limited(&path, MAX_FILE) {
        Ok(text) => text,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e).context("reading the authority's revoked peers"),
    };
    let peer = peer.to_string();
    Ok(text.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some(run) && words.next() == Some(peer.as_str())
    }))
}

fn used_path(invites: &Path) -> PathBuf {
    let mut name = invites.as_os_str().to_owned();
    name.push(".used");
    PathBuf::from(name)
}

/// Failed attempts per address in the current minute.
#[derive(Debug, Default)]
struct Failures {
    by_ip: HashMap<IpAddr, (Instant, u32)>,
}

impl Failures {
    fn blocked(&mut self, ip: IpAddr, now: Instant) -> bool {
        match self.by_ip.get(&ip) {
            Some((since, _)) if now.duration_since(*since) >= Duration::from_secs(60) => {
                self.by_ip.remove(&ip);
                false
            }
            Some((_, n)) => *n >= MAX_FAILURES,
            None => false,
        }
    }

    fn count(&mut self, ip: IpAddr, now: Instant) {
        if self.by_ip.len() >= MAX_TRACKED && !self.by_ip.contains_key(&ip) {
            self.by_ip
                .retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
            if self.by_ip.len() >= MAX_TRACKED {
                return;
            }
        }
        self.by_ip.entry(ip).or_insert((now, 0)).1 += 1;
    }
}

struct Server {
    authority: Authority,
    /// The authority's key file, beside which its revoked peers are recorded.
    key: PathBuf,
    run: String,
    ttl: Duration,
    invites: Mutex<Invites>,
    failures: Mutex<Failures>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    invite: String,
    peer: String,
    /// The peer's signature of its request: it holds the key of the id the token will name.
    proof: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Granted {
    token: String,
    role: String,
    expires_ms: u64,
}

impl Server {
    /// A token for `peer` presenting `code`: refused to a peer the authority revoked, whatever
    /// its code; else as the code allows.
    fn grant_for(&self, code: &str, peer: PeerId) -> Result<(Token, Role), &'static str> {
        match is_revoked(&self.key, &self.run, &peer) {
            Ok(false) => {}
            Ok(true) => return Err("this peer was revoked by the run's authority"),
            Err(e) => {
                tracing::error!("{e:#}");
                return Err("the server could not read the authority's revoked peers");
            }
        }
        let role = lock(&self.invites).redeem(code, peer)?;
        let token = self.authority.grant(&self.run, peer, role, self.ttl);
        Ok((token, role))
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Json(serde_json::json!({ "error": why }))).into_response()
}

async fn token(
    State(server): State<Arc<Server>>,
    ConnectInfo(Remote(from)): ConnectInfo<Remote>,
    body: axum::body::Bytes,
) -> Response {
    let now = Instant::now();
    let ip = from.ip();
    if lock(&server.failures).blocked(ip, now) {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts: try again in a minute",
        );
    }
    let fail = |status, why: &str| {
        lock(&server.failures).count(ip, now);
        refuse(status, why)
    };
    let Ok(ask) = serde_json::from_slice::<Ask>(&body) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "expected JSON {\"invite\": CODE, \"peer\": PEER_ID, \"proof\": SIGNATURE}",
        );
    };
    let Ok(peer) = ask.peer.parse::<PeerId>() else {
        return fail(StatusCode::BAD_REQUEST, "`peer` is not a peer id");
    };
    if !potluck_net::auth::check_invite_request(&peer, ask.invite.trim(), &ask.proof) {
        return fail(
            StatusCode::FORBIDDEN,
            "the request is not signed with the key of `peer` (use `potluck authority request`)",
        );
    }
    match server.grant_for(ask.invite.trim(), peer) {
        Ok((token, role)) => {
            let expires_ms = token.grant().map_or(0, |g| g.expires);
            tracing::info!("token for {peer} ({role})");
            Json(Granted {
                token: token.to_text(),
                role: role.to_string(),
                expires_ms,
            })
            .into_response()
        }
        Err(why) => fail(StatusCode::FORBIDDEN, why),
    }
}

pub(crate) fn invite(args: InviteArgs) -> Result<()> {
    if args.uses == 0 {
        bail!("--uses must be at least 1");
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.invites)
        .with_context(|| format!("opening {}", args.invites.display()))?;
    for _ in 0..args.count {
        let code: String = (0..16)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        writeln!(f, "{code} {} {}", args.role, args.uses)?;
        println!("{code}");
    }
    f.sync_all()?;
    eprintln!(
        "{} invite codes ({}, {} peer(s) each) appended to {}",
        args.count,
        args.role,
        args.uses,
        args.invites.display()
    );
    Ok(())
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    let authority = Authority::load(&args.key)?;
    let invites = Invites::load(&args.invites)?;
    let codes = invites.codes.len();
    let server = Arc::new(Server {
        authority,
        key: args.key.clone(),
        run: args.run_id.clone(),
        ttl: args.ttl,
        invites: Mutex::new(invites),
        failures: Mutex::new(Failures::default()),
    });
    let about = format!(
        "potluck invite server for run {} (authority {}).\nPOST /token with \
         {{\"invite\": CODE, \"peer\": PEER_ID, \"proof\": the peer's signature}}, or run: potluck authority request --url \
         http://THIS_HOST --invite CODE --identity id.key --out my.token\n",
        args.run_id,
        server.authority.public()
    );
    let app = Router::new()
        .route("/", routing::get(move || async move { about }))
        .route("/token", routing::post(token))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(server);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = http::bind(args.http, CONNECTION_LIFETIME).await?;
        println!(
            "invite server for run {}: http://{} ({codes} codes, tokens valid {:?})",
            args.run_id,
            listener.local_addr()?,
            args.ttl
        );
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<Remote>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")
    })
}

/// A plain HTTP/1.1 POST of a JSON body to `url` (http:// only); the status and the body (at
/// most 64 KiB), within `deadline`.
async fn post_json(url: &str, path: &str, body: &str, deadline: Duration) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: the invite server's address is http://HOST:PORT"))?
        .trim_end_matches('/');
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(hostport)
            .await
            .with_context(|| format!("connecting to {hostport} (is the invite server up?)"))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.take(64 << 10).read_to_end(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(deadline, exchange)
        .await
        .with_context(|| format!("{hostport} did not answer within {deadline:?}"))??;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("a malformed HTTP reply")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("a malformed HTTP status line")?;
    Ok((status, body.to_owned()))
}

pub(crate) fn request(args: RequestArgs) -> Result<()> {
    let keypair = potluck_net::identity::load_or_create(&args.identity)?;
    let peer = keypair.public().to_peer_id();
    let code = args.invite.trim();
    let ask = serde_json::to_string(&Ask {
        invite: code.to_owned(),
        peer: peer.to_string(),
        proof: potluck_net::auth::sign_invite_request(&keypair, code),
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt.block_on(post_json(
        &args.url,
        "/token",
        &ask,
        Duration::from_secs(30),
    ))?;
    if status != 200 {
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        bail!("the invite server refused (HTTP {status}): {why}");
    }
    let granted: Granted = serde_json::from_str(&body).context("the server's answer")?;
    let token = Token::from_text(&granted.token).context("the server's token")?;
    let grant = token.grant().context("the server's token")?;
    if grant.peer != peer.to_bytes() {
        bail!("the server sent a token for another peer");
    }
    std::fs::write(&args.out, token.to_text())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "token for {peer} ({}, run {}) written to {}",
        granted.role,
        grant.run,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revoked peer gets no new token from the invite server, whatever code it presents
    /// (before, the server re-issued tokens to any peer bound to a code, revoked or not).
    #[test]
    fn a_revoked_peer_gets_no_new_token_whatever_code_it_presents() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("authority.key");
        let invites = dir.path().join("invites.txt");
        std::fs::write(&invites, "aaaa trainer 1\nbbbb trainer 5\n").unwrap();
        let server = Server {
            authority: Authority::generate(),
            key: key.clone(),
            run: "r".into(),
            ttl: Duration::from_secs(3600),
            invites: Mutex::new(Invites::load(&invites).unwrap()),
            failures: Mutex::new(Failures::default()),
        };
        let (alice, bob) = (PeerId::random(), PeerId::random());
        assert!(server.grant_for("aaaa", alice).is_ok());
        record_revoked(&key, "r", &[alice]).unwrap();
        // Neither its own code nor a fresh one: revoked is revoked.
        assert!(
            server
                .grant_for("aaaa", alice)
                .unwrap_err()
                .contains("revoked")
        );
        assert!(
            server
                .grant_for("bbbb", alice)
                .unwrap_err()
                .contains("revoked")
        );
        // Others, and a revocation in another run, change nothing.
        assert!(server.grant_for("bbbb", bob).is_ok());
        record_revoked(&key, "other", &[bob]).unwrap();
        assert!(server.grant_for("bbbb", bob).is_ok());
    }
}
