//! The messages of `/potluck/dht/1` and their encoding: postcard, each message framed by its
//! length (an unsigned LEB128 varint), the length checked against the limit before anything is
//! allocated. See docs/PROTOCOL.md. The host carries the frames ([`RPC`]); [`rpc`] asks a peer.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use potluck_core::clock::Time;
use serde::{Deserialize, Serialize};

use super::record::{Item, Record, Rejection, Subkey};
use crate::host::{self, Host, Rpc};

/// The protocol name.
pub const PROTOCOL: &str = "/potluck/dht/1";
/// Largest request frame (bytes).
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest response frame (bytes).
pub const MAX_RESPONSE: usize = 4 << 20;
/// Most records in one store request.
pub const MAX_RECORDS: usize = 64;
/// Most peers in one answer.
pub const MAX_PEERS: usize = 32;
/// Most addresses per peer in an answer.
pub const MAX_ADDRS: usize = 8;

/// A peer as one node tells another about it: its id and addresses (both as bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: Vec<u8>,
    pub addrs: Vec<Vec<u8>>,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The sender queries only (client mode): never add it to a routing table.
    pub client: bool,
    pub body: RequestBody,
}

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// The peers the responder knows closest to `target`.
    FindNode { target: [u8; 32] },
    /// What the responder holds under `key`, and peers closer to it.
    Get { key: Vec<u8> },
    /// Store these records.
    Store { records: Vec<Record> },
    /// Store these records, and name the peers the responder knows closest to `target` (a
    /// store's lookup stores on the way).
    StoreNear {
        target: [u8; 32],
        records: Vec<Record>,
    },
}

/// What a key holds, as sent: a value, or subkeys with theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireEntry {
    Value(Item),
    Dict(Vec<(Subkey, Item)>),
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The responder's wall clock when it answered: the requester checks clock skew with it.
    pub now: Time,
    pub body: ResponseBody,
}

/// The answer's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Nodes {
        peers: Vec<PeerInfo>,
    },
    Value {
        entry: Option<WireEntry>,
        closer: Vec<PeerInfo>,
    },
    Stored {
        results: Vec<Result<(), Rejection>>,
    },
    StoredNear {
        results: Vec<Result<(), Rejection>>,
        peers: Vec<PeerInfo>,
    },
    /// The request was refused as a whole (malformed, over a limit).
    Refused {
        reason: String,
    },
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is over the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("truncated frame")]
    Truncated,
    #[error("malformed length prefix")]
    BadLength,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message over a count limit: {0}")]
    TooMany(&'static str),
}

/// Reads a LEB128 length prefix: (length, bytes it took).
pub fn read_len(bytes: &[u8]) -> Result<(usize, usize), DecodeError> {
    let mut len: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(5) {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return usize::try_from(len)
                .map(|l| (l, i + 1))
                .map_err(|_| DecodeError::BadLength);
        }
    }
    if bytes.len() < 5 {
        Err(DecodeError::Truncated)
    } else {
        Err(DecodeError::BadLength)
    }
}

/// Writes a LEB128 length prefix.
pub fn write_len(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A message framed: length prefix, then postcard.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising our own message types into a Vec cannot fail.
    let body = postcard::to_allocvec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 5);
    write_len(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// Decodes one whole frame (prefix included) of at most `limit` bytes of body.
pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8], limit: usize) -> Result<T, DecodeError> {
    let (len, skip) = read_len(frame)?;
    if len > limit {
        return Err(DecodeError::TooLarge { len, limit });
    }
    let body = frame.get(skip..skip + len).ok_or(DecodeError::Truncated)?;
    if frame.len() != skip + len {
        return Err(DecodeError::Malformed("bytes after the message".into()));
    }
    postcard::from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}

impl Request {
    /// Decodes and checks the count limits of a request frame.
    pub fn decode(frame: &[u8]) -> Result<Request, DecodeError> {
        let r: Request = decode(frame, MAX_REQUEST)?;
        if let RequestBody::Store { records } | RequestBody::StoreNear { records, .. } = &r.body
            && records.len() > MAX_RECORDS
        {
            return Err(DecodeError::TooMany("records"));
        }
        Ok(r)
    }
}

impl Response {
    /// Decodes and checks the count limits of a response frame.
    pub fn decode(frame: &[u8]) -> Result<Response, DecodeError> {
        let r: Response = decode(frame, MAX_RESPONSE)?;
        let peers = match &r.body {
            ResponseBody::Nodes { peers } | ResponseBody::Value { closer: peers, .. } => {
                peers.as_slice()
            }
            _ => &[],
        };
        if peers.len() > MAX_PEERS {
            return Err(DecodeError::TooMany("peers"));
        }
        if peers.iter().any(|p| p.addrs.len() > MAX_ADDRS) {
            return Err(DecodeError::TooMany("addresses"));
        }
        if let ResponseBody::Stored { results } | ResponseBody::StoredNear { results, .. } = &r.body
            && results.len() > MAX_RECORDS
        {
            return Err(DecodeError::TooMany("results"));
        }
        Ok(r)
    }
}

/// `/potluck/dht/1` as a host carries it: the host reads each frame within these limits and
/// leaves the rest to [`Request::decode`] and [`Response::decode`].
pub const RPC: Rpc = Rpc {
    name: PROTOCOL,
    max_request: MAX_REQUEST,
    max_response: MAX_RESPONSE,
};

/// Sends `request` to `peer` over `host` (dialing `addrs` if not connected) and waits at most
/// `deadline` for the answer. An answer that does not decode fails the request.
pub async fn rpc(
    host: &Host,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    request: &Request,
    deadline: Duration,
) -> Result<Response, host::Error> {
    let frame = host.rpc(peer, addrs, encode(request), deadline).await?;
    Response::decode(&frame).map_err(|e| host::Error::Rpc {
        peer,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            bytes(40),
            proptest::option::of(bytes(20)),
            bytes(100),
            any::<u64>(),
            proptest::option::of(bytes(64)),
        )
            .prop_map(|(key, sub, value, expiration, signature)| Record {
                key,
                subkey: sub.map(Subkey::Plain),
                item: Item {
                    value,
                    expiration,
                    signature,
                },
            })
    }

    fn request() -> impl Strategy<Value = Request> {
        let body = prop_oneof![
            any::<[u8; 32]>().prop_map(|target| RequestBody::FindNode { target }),
            bytes(64).prop_map(|key| RequestBody::Get { key }),
            proptest::collection::vec(record(), 0..5)
                .prop_map(|records| RequestBody::Store { records }),
        ];
        (any::<bool>(), body).prop_map(|(client, body)| Request { client, body })
    }

    proptest! {
        #[test]
        fn requests_round_trip(r in request()) {
            prop_assert_eq!(Request::decode(&encode(&r)).unwrap(), r);
        }

        #[test]
        fn lengths_round_trip(len in 0usize..(1 << 31)) {
            let mut out = Vec::new();
            write_len(len, &mut out);
            prop_assert_eq!(read_len(&out).unwrap(), (len, out.len()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(frame in bytes(300)) {
            let _ = Request::decode(&frame);
            let _ = Response::decode(&frame);
        }

        #[test]
        fn truncated_frames_are_errors(r in request(), cut in 1usize..50) {
            let frame = encode(&r);
            let cut = cut.min(frame.len());
            prop_assert!(Request::decode(&frame[..frame.len() - cut]).is_err());
        }
    }

    #[test]
    fn oversize_frames_are_refused_before_reading_them() {
        let mut frame = Vec::new();
        write_len(MAX_REQUEST + 1, &mut frame);
        assert_eq!(
            Request::decode(&frame),
            Err(DecodeError::TooLarge {
                len: MAX_REQUEST + 1,
                limit: MAX_REQUEST
            })
        );
        assert_eq!(read_len(&[0xff; 6]), Err(DecodeError::BadLength));
        let many = Request {
            client: false,
            body: RequestBody::Store {
                records: vec![
                    Record {
                        key: vec![],
                        subkey: None,
                        item: Item {
                            value: vec![],
                            expiration: 0,
                            signature: None
                        }
                    };
                    MAX_RECORDS + 1
                ],
            },
        };
        assert_eq!(
            Request::decode(&encode(&many)),
            Err(DecodeError::TooMany("records"))
        );
    }
}
