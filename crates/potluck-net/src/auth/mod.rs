//! Authorized runs. A run authority — an ed25519 key its organiser keeps offline — signs
//! short-lived tokens, each naming one run, one peer and one role. A run's identity is its name
//! together with the authority's public key: every host of an authorized run is given both, and
//! admits a connection's requests only after its peer has presented a valid token for them.
//!
//! The handshake (`/potluck/auth/1`) runs right after the secure channel: each side opens one
//! stream to the other, sends its token and reads [`Reply`]. The token names the peer id the
//! secure channel (noise or TLS) authenticated, so a token copied by someone else is useless;
//! until a peer is admitted nothing it sends is processed (its DHT requests are refused, its
//! streams dropped, what identify says of it held back), and a peer that presents no valid token
//! within [`HANDSHAKE`] is disconnected. Admissions end when the token expires.
//!
//! A token on disk is one line of text: `potluck-token/1 ` and the hex of its postcard bytes.
//!
//! - `token`: grants, tokens, the authority's keys, and checking a token ([`Verifier`]);
//! - `gate`: a host's side of a run: whom it admitted, who admitted it ([`Gate`]);
//! - `handshake`: presenting tokens to peers and answering theirs, over libp2p streams;
//! - `watch`: keeping this peer's token fresh from its file ([`watch_token`]).
//!
//! What admission means for requests and streams is the host's ([`crate::host`]).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use gate::Gate;
pub use handshake::Reply;
pub use token::{
    Authority, AuthorityKey, Grant, Refusal, Token, Verifier, check_invite_request,
    sign_invite_request,
};
pub use watch::watch_token;

mod gate;
pub(crate) mod handshake;
mod token;
mod watch;

/// The handshake's protocol.
pub const PROTOCOL: &str = "/potluck/auth/1";

/// Largest encoded token (or reply) read from a peer or a file.
pub const MAX_TOKEN: usize = 1024;

/// Clock difference tolerated between the authority, the holder and the checker.
pub const SKEW: Duration = Duration::from_secs(120);

/// A peer that has not presented a valid token by then is disconnected.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Revoked peers a gate holds, at most.
pub const MAX_REVOKED_HELD: usize = 4096;

/// Longest a token may live: an authority grants for hours, not forever.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a token lets its peer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Computes gradients, averages, serves state.
    Trainer,
    /// Averages (with weight 0) and serves state; computes nothing.
    Aux,
    /// Reads the run (DHT, state) and contributes nothing to averages.
    Monitor,
}

impl Role {
    /// Whether the role takes part in averaging (sends or reduces parts).
    pub fn averages(self) -> bool {
        matches!(self, Role::Trainer | Role::Aux)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Trainer => "trainer",
            Role::Aux => "aux",
            Role::Monitor => "monitor",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "trainer" => Ok(Role::Trainer),
            "aux" => Ok(Role::Aux),
            "monitor" => Ok(Role::Monitor),
            other => Err(format!("unknown role {other:?}: trainer, aux or monitor")),
        }
    }
}

/// Errors of key and token files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] potluck_core::file::Error),
    #[error("{path}: {reason}")]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("not an authority public key ({0}): 64 hex digits, as `potluck authority init` prints")]
    PublicKey(String),
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
}
