//! Keeping this peer's token fresh while it runs: the token file is re-read when it changes,
//! checked, and presented to every peer; as the token nears its end, the user is warned.

use std::path::PathBuf;
use std::time::Duration;

use potluck_core::clock;

use super::Token;
use crate::host::Host;

/// Keeps this peer's token fresh: re-reads the file when it changes and presents the new
/// token to every peer; warns as the token nears its end.
pub async fn watch_token(host: Host, path: PathBuf) {
    let Some(gate) = host.gate().cloned() else {
        return;
    };
    let me = host.peer_id();
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    let mut warned = false;
    loop {
        tick.tick().await;
        let now = modified(&path);
        if now != seen {
            seen = now;
            match Token::load(&path).map_err(|e| chain(&e)).and_then(|t| {
                gate.verifier()
                    .check(&t, me, clock::now())
                    .map(|_| t)
                    .map_err(|e| chain(&e))
            }) {
                Ok(token) => {
                    tracing::info!("{}: presenting the renewed token", path.display());
                    warned = false;
                    if host.renew_token(token).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!("{} changed but is not usable: {e}", path.display()),
            }
        }
        let expires = gate.token().grant().map_or(0, |g| g.expires);
        let left = expires.saturating_sub(clock::now()) / 1000;
        if left < 600 && !warned {
            warned = true;
            tracing::warn!(
                "this peer's token expires in {}: write a new one (`potluck authority grant`) to {}",
                clock::humanize(left),
                path.display()
            );
        }
    }
}

/// `error` and its sources, each after a `: ` (as the binary logs errors, with anyhow's `{:#}`).
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Error, Refusal};

    #[test]
    fn errors_read_as_the_binary_logged_them() {
        let io = Error::File(potluck_core::file::Error::io(
            "token",
            std::io::Error::other("gone"),
        ));
        assert_eq!(chain(&io), "token: gone: gone");
        assert_eq!(
            chain(&Refusal::Forged),
            "not signed by this run's authority"
        );
    }
}
