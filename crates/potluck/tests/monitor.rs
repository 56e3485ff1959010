//! The monitor against a live local run: it sees the peers' metrics, draws the loss history,
//! draws samples with the newest checkpoint and answers prompts, serves JSON, Prometheus and the
//! join page, a restart keeps the history; and the dashboard, driven in headless Chromium,
//! shows it all.

use std::io::{Read, Write};

use crate::harness::{Peer, peer_args, strs, tiny_data};

/// GET `path` from `addr` (host:port); the body of a 200 answer.
pub(crate) fn get(addr: &str, path: &str) -> String {
    String::from_utf8_lossy(&get_bytes(addr, path)).into_owned()
}

fn get_bytes(addr: &str, path: &str) -> Vec<u8> {
    let (head, body) = request(addr, path, "");
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body
}

/// GET `path` from `addr` with `headers` (lines ending in CRLF): the answer's head and body.
fn request(addr: &str, path: &str, headers: &str) -> (String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    (head, reply[split + 4..].to_vec())
}

/// The prompt form's drawing request, as the dashboard sends it.
fn draw(addr: &str, path: &str) -> Vec<u8> {
    let (head, body) = request(addr, path, "X-Potluck: draw\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body
}

fn monitor(boot: &str, data: &std::path::Path, checkpoint: &std::path::Path) -> (Peer, String) {
    let mut m = Peer::spawn(&[
        "monitor",
        "--run-id",
        "watched",
        "--initial-peers",
        boot,
        "--http",
        "127.0.0.1:0",
        "--data",
        data.to_str().unwrap(),
        "--every",
        "0.5",
        "--checkpoints",
        checkpoint.to_str().unwrap(),
        "--samples-every",
        "1",
        "--eval-prompts",
        "4",
    ]);
    let line = m.wait_for("monitor for run watched: http://");
    let addr = line.split_whitespace().next().unwrap().to_owned();
    (m, addr)
}

#[test]
fn the_monitor_shows_a_live_run_and_keeps_its_history_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let mut boot = Peer::spawn(&["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = format!("/ip4/127.0.0.1{}", boot.wait_for("/ip4/127.0.0.1"));
    let history = dir.path().join("monitor");
    // It draws with trainer a's checkpoint (written at its end).
    let ckpt = dir.path().join("a");
    let (m, http) = monitor(&addr, &history, &ckpt);
    let trainer = |name: &str| {
        let extra = [
            "--target-batch-size",
            "32",
            "--epochs",
            "10",
            "--initial-peers",
            &addr,
        ];
        Peer::spawn(&strs(&peer_args(
            "watched",
            &data,
            &dir.path().join(name),
            &extra,
        )))
    };
    let (a, b) = (trainer("a"), trainer("b"));
    let (a, b) = (a.finish(), b.finish());
    assert!(a.contains("trained to epoch 10") && b.contains("trained to epoch 10"));
    // The last records are read within a poll or two.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let s: serde_json::Value = serde_json::from_str(&get(&http, "/api/status")).unwrap();
        if s["epoch"] == 10
            && s["live"].as_array().unwrap().len() == 2
            && s["samples"]["epoch"] == 10
        {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let history = status["history"].as_array().unwrap();
    assert!(history.len() >= 3, "{status}");
    assert!(
        history
            .iter()
            .all(|p| p["loss"].as_f64().is_some_and(f64::is_finite))
    );
    assert_eq!(status["leaderboard"].as_array().unwrap().len(), 2);
    // Samples of the checkpoint, and its score on prompts of the grammar (tiny data is shapes).
    let images = status["samples"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 8, "{status}");
    let png = get_bytes(&http, images[0]["url"].as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let eval = &status["evals"][0];
    assert!(eval["epoch"] == 10 && eval["prompts"] == 4, "{status}");
    assert!(
        eval["accuracy"]
            .as_f64()
            .is_some_and(|a| (0.0..=1.0).contains(&a))
    );
    // The prompt form's endpoint draws one image; the same seed draws the same.
    let drawn = draw(
        &http,
        "/api/generate?prompt=a%20small%20red%20circle%20in%20the%20center&seed=3",
    );
    assert!(drawn.starts_with(b"\x89PNG"));
    assert_eq!(
        drawn,
        draw(
            &http,
            "/api/generate?prompt=a%20small%20red%20circle%20in%20the%20center&seed=3"
        )
    );
    // Another web page cannot make it draw: an <img> there sends no header, a script there
    // its own Origin.
    let (head, _) = request(&http, "/api/generate?prompt=a&seed=3", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (head, _) = request(
        &http,
        "/api/generate?prompt=a&seed=3",
        "X-Potluck: draw\r\nOrigin: http://evil.example\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    dashboard_in_chromium(&http, dir.path());
    let page = get(&http, "/");
    assert!(
        page.contains("<svg id=\"curve\"") && !page.contains("http://cdn"),
        "{page}"
    );
    let prom = get(&http, "/metrics");
    assert!(prom.contains("potluck_epoch{run=\"watched\"} 10"), "{prom}");
    assert!(prom.contains("potluck_peers{run=\"watched\"} 2"), "{prom}");
    let join = get(&http, "/join");
    assert!(
        join.contains("--run-id watched") && join.contains(&addr),
        "{join}"
    );
    // A restart keeps the history: it is there before the first poll.
    m.kill();
    let (m, http) = monitor(&addr, &dir.path().join("monitor"), &ckpt);
    let again: serde_json::Value = serde_json::from_str(&get(&http, "/api/status")).unwrap();
    assert_eq!(again["history"], status["history"]);
    assert_eq!(again["evals"], status["evals"]);
    assert_eq!(again["samples"], status["samples"]);
    m.kill();
    boot.kill();
}

/// Debian's `chromium` (`.ci/run` installs it), or another Chromium on the path.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Runs headless Chromium with `args` (within two minutes); its standard output.
fn headless(browser: &str, profile: &std::path::Path, args: &[&str]) -> String {
    let mut child = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium ran past two minutes: {args:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// The dashboard as a browser runs it: its script fills in the peers, the loss curve, the
/// leaderboard and the samples from the API, and a link with a prompt draws it.
fn dashboard_in_chromium(http: &str, dir: &std::path::Path) {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the dashboard in Chromium: .ci/run installs Debian's chromium"
        );
        eprintln!("skipping the dashboard in Chromium: no chromium here (apt install chromium)");
        return;
    };
    let url = format!("http://{http}/?prompt=a+small+red+circle+in+the+center&seed=3");
    // Virtual time runs the page's timers without waiting for them, and stops while requests
    // are under way: the DOM is read once the page has fetched and drawn everything.
    let dom = headless(
        browser,
        &dir.join("chromium"),
        &["--virtual-time-budget=20000", "--dump-dom", &url],
    );
    let cell = |id: &str| {
        let start = dom
            .find(&format!("id=\"{id}\">"))
            .unwrap_or_else(|| panic!("{id}: {dom}"));
        let rest = &dom[start..];
        rest[rest.find('>').unwrap() + 1..rest.find('<').unwrap()].to_owned()
    };
    assert_eq!(cell("peers"), "2", "{dom}");
    assert_eq!(cell("epoch"), "10", "{dom}");
    assert!(
        dom.contains("id=\"loss-line\""),
        "the loss curve is drawn: {dom}"
    );
    let board = &dom[dom.find("id=\"board\"").unwrap()..];
    let board = &board[..board.find("</table>").unwrap()];
    assert_eq!(
        board.matches("<tr>").count(),
        3,
        "a header and two peers: {board}"
    );
    let samples = &dom[dom.find("id=\"samples\"").unwrap()..];
    let samples = &samples[..samples.find("</div>").unwrap()];
    assert_eq!(
        samples.matches("data-loaded=\"1\"").count(),
        8,
        "eight sample images loaded: {samples}"
    );
    let at = dom.find("id=\"generated\"").unwrap();
    let start = dom[..at].rfind('<').unwrap();
    let generated = &dom[start..start + dom[start..].find('>').unwrap()];
    assert!(
        generated.contains("data-loaded=\"1\"") && !generated.contains("hidden"),
        "the prompt's image is shown: {generated}"
    );
    // And a screenshot of it (docs/img/dashboard.png is one of the demo's).
    let shot = dir.join("dashboard.png");
    headless(
        browser,
        &dir.join("chromium"),
        &[
            "--virtual-time-budget=20000",
            "--window-size=1200,1800",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    let image = image::open(&shot).unwrap();
    assert_eq!((image.width(), image.height()), (1200, 1800));
}
