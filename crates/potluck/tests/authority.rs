//! The authority's commands: invites (a code gets its peer a token once, the same peer
//! renews, other peers and unknown codes are refused, uses survive a restart, guessing is cut
//! off) and revocations published in the run's DHT.

use crate::cli::{ok, potluck, text};
use crate::harness::Peer;

/// `potluck authority request` as `who` (identity and token files in `dir`): whether it got a
/// token, and what it said.
fn request(url: &str, dir: &std::path::Path, code: &str, who: &str) -> (bool, String) {
    let id = dir.join(format!("{who}.key"));
    let out = dir.join(format!("{who}.token"));
    let (id, out) = (id.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "authority",
        "request",
        "--url",
        url,
        "--invite",
        code,
        "--identity",
        id,
        "--out",
        out,
    ];
    let o = potluck(&args);
    (o.status.success(), text(&o.stdout) + &text(&o.stderr))
}

/// A raw HTTP POST of `body` to `url` (http://HOST:PORT): the whole answer.
fn post(url: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn an_invite_code_gets_one_peer_a_token_and_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let key = path("authority.key");
    let init = ok(&["authority", "init", "--run-id", "inv", "--out", &key]);
    assert!(init.contains("authority: "), "{init}");
    let invites = path("invites.txt");
    let codes = ok(&["authority", "invite", "--invites", &invites, "--count", "2"]);
    let codes: Vec<&str> = codes.lines().collect();
    assert_eq!(codes.len(), 2);
    assert!(codes.iter().all(|c| c.len() == 32), "{codes:?}");
    let serve = || {
        let mut server = Peer::spawn(&[
            "authority",
            "serve",
            "--key",
            &key,
            "--run-id",
            "inv",
            "--http",
            "127.0.0.1:0",
            "--invites",
            &invites,
            "--ttl",
            "1h",
        ]);
        let line = server.wait_for("invite server for run inv: ");
        let url = line.split_whitespace().next().unwrap().to_owned();
        (server, url)
    };
    let (server, url) = serve();
    // A peer asks with a code (its identity is created) and gets a token bound to it.
    let ask = |code: &str, who: &str| request(&url, dir.path(), code, who);
    let (granted, said) = ask(codes[0], "alice");
    assert!(granted, "{said}");
    assert!(said.contains("(trainer, run inv)"), "{said}");
    let token = std::fs::read_to_string(path("alice.token")).unwrap();
    assert!(token.starts_with("potluck-token/1 "), "{token}");
    // The same peer again: a fresh token (renewal). Another peer with that code: refused.
    assert!(ask(codes[0], "alice").0);
    let (granted, said) = ask(codes[0], "bob");
    assert!(!granted);
    assert!(
        said.contains("HTTP 403") && said.contains("used up"),
        "{said}"
    );
    let (granted, said) = ask("00000000000000000000000000000000", "bob");
    assert!(!granted && said.contains("unknown invite code"), "{said}");
    // Binding a code to a peer id without its key: refused (the code stays free).
    let someone = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let body = format!(
        r#"{{"invite":"{}","peer":"{someone}","proof":"00"}}"#,
        codes[1]
    );
    let reply = post(&url, "/token", &body);
    assert!(
        reply.starts_with("HTTP/1.1 403") && reply.contains("not signed"),
        "{reply}"
    );
    // A restart remembers who used which code.
    server.kill();
    let (server, url) = serve();
    let ask = |code: &str, who: &str| request(&url, dir.path(), code, who);
    assert!(!ask(codes[0], "bob").0);
    assert!(ask(codes[0], "alice").0);
    assert!(ask(codes[1], "bob").0);
    // Guessing: after ten failures a minute from one address, even a good code waits.
    for _ in 0..10 {
        assert!(!ask("ffffffffffffffffffffffffffffffff", "carol").0);
    }
    let (granted, said) = ask(codes[1], "carol");
    assert!(!granted && said.contains("HTTP 429"), "{said}");
    server.kill();
}
