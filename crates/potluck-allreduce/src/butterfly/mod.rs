//! The butterfly all-reduce of a flat `f32` buffer over `/potluck/allreduce/2` bulk streams.
//!
//! The buffer is split into one part per reducing peer ([`balance`]); each part into chunks of
//! at most [`Settings::chunk`] values that never cross a codec boundary ([`CodecPlan`]). Every
//! member opens one stream to every other reducer: on it, it sends its chunks of that
//! reducer's part (if it sends at all) and reads back the averaged chunks, both at once. A
//! reducer aggregates chunk by chunk as contributions arrive and sends each averaged chunk to
//! every member as soon as it is done, so sending, reducing and returning overlap; a reader
//! runs at most [`Settings::window`] chunks ahead of the slowest live sender, so memory stays
//! bounded.
//!
//! Results are written in place: the averaged chunk replaces the member's own values, which
//! were sent before (a reducer can't finish a chunk without them).
//!
//! Where both hosts can, the chunks travel over a direct channel ([`potluck_net::direct`]:
//! their own TCP connection, AES-256-GCM under keys agreed on the libp2p stream) instead of
//! the libp2p stream, which costs several times the CPU per byte; where a direct connection
//! can't be made, they stay on the stream.
//!
//! Faults: a sender that sends nothing for longer than its measured rate allows (times
//! [`Settings::slack`]) is excluded by the reducer for the rest of the round; a reducer that
//! stalls or dies leaves its senders with their own values for the chunks they did not get
//! back, and their [`Report`] says which those are. The round finishes for everyone else.
//!
//! The protocol in parts, the way a libp2p protocol crate keeps them (private modules; what
//! callers use is re-exported here):
//! - `wire`: the messages on the wire (hello, ack, result frames) and their limits;
//! - `group`: who averages with whom, and which part each reduces;
//! - `inbox`: a host's incoming streams, handed to their rounds, and what rounds remember
//!   about members (gone, banned);
//! - `flow`: flow control of a member's sending (pacing, its uplink's share);
//! - `send`: this member's side of the others' parts (opening streams, sending, reading back);
//! - `reduce`: this member's own part (reading contributions, aggregating, returning);
//! - `round`: the driver of one round ([`all_reduce`]), its settings and outcome;
//! - `check`: a checked round, each part reduced by two members and compared
//!   ([`Settings::check`]).
//!
//! [`balance`]: crate::balance

use potluck_net::direct;

mod check;
mod flow;
mod group;
mod inbox;
mod reduce;
mod round;
mod send;
mod wire;

pub use crate::codec::CodecPlan;
pub use check::{Dispute, disputes_two_others};
pub use group::{Group, GroupError, MAX_GROUP, MAX_SHARES, Member};
pub use inbox::{BANNED, BANNED_FOR, GONE_FOR, Inbox, STRIKES_TO_BAN};
pub use round::{
    Error, Fault, PartResult, ROBUST, Report, Settings, all_reduce, all_reduce_with_feedback,
};
pub use wire::{PROTOCOL, decode_control, parse_result};

/// The reading and writing halves of a member's channel (a libp2p stream or a direct one).
type Reader = direct::BoxReader;
type Writer = direct::BoxWriter;
