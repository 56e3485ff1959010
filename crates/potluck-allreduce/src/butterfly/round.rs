//! The round driver: [`all_reduce`] checks the call, splits the buffer into the members'
//! parts, and runs this member's side of every other part ([`super::send`]) and its own part
//! ([`super::reduce`]) at once, until all are done or its injected [`Fault`] fires; then it
//! puts the [`Report`] together. Also the round's [`Settings`], its outcome types, and what
//! the tasks of one round share (fault injection, timing, counters).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use potluck_net::host;

use super::flow::{Pace, Uplink};
use super::reduce::reduce;
use super::send::exchange;
use super::{Group, Inbox};
use crate::aggregate::{Checks, Rule};
use crate::codec::{Codec, CodecPlan};

/// How a round runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Values per chunk, at most.
    pub chunk: usize,
    pub plan: CodecPlan,
    pub rule: Rule,
    pub checks: Checks,
    /// Chunks a reducer reads ahead of the slowest live sender.
    pub window: usize,
    /// Time to open every stream of the round (connections included).
    pub open_timeout: Duration,
    /// The least time a sender may go silent before it is excluded.
    pub min_stall: Duration,
    /// How many times the expected time (from measured rates) a chunk may take.
    pub slack: f64,
    /// Pace direct channels so a member's flows share its uplink evenly: together they send
    /// this many times the member's measured rate, each its share ([`Uplink`]). Only for rates
    /// that were measured (a rate set too low would slow the round); None: TCP shares the
    /// uplink as it will, which through one FIFO bottleneck is badly.
    pub pace: Option<f64>,
    /// Every part is reduced twice, by two members, and each member compares the two results
    /// ([`super::check`]): a reducer that returns another average than its contributions
    /// make is caught, and its part not taken ([`Report::disputes`]). Twice the bytes.
    /// ([`all_reduce_with_feedback`] does not check.)
    pub check: bool,
    /// For tests: this member vanishes (as a crash would) at this point of the round.
    pub fault: Option<Fault>,
    /// For tests: as a reducer, this member returns its part's average negated and ten times
    /// over (a dishonest reducer).
    pub forge: bool,
}

/// `train --robust`'s aggregation: CenteredClip, its radius from the contributions' spread.
pub const ROBUST: Rule = Rule::CenteredClipAuto { iterations: 5 };

impl Settings {
    /// `train --robust`'s averaging: [`ROBUST`] aggregation, and every part checked
    /// ([`Settings::check`]).
    pub fn robust(self) -> Settings {
        Settings {
            rule: ROBUST,
            check: true,
            ..self
        }
    }
}

/// Where a member vanishes in a round (fault injection for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After sending this many chunks (over all its streams).
    Sending(usize),
    /// As a reducer, after receiving this many chunks, before averaging any.
    Reducing(usize),
    /// As a reducer, after returning this many averaged chunks.
    Returning(usize),
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            chunk: 1 << 16,
            plan: CodecPlan::uniform(Codec::None),
            rule: Rule::Mean,
            checks: Checks::default(),
            window: 8,
            open_timeout: Duration::from_secs(15),
            min_stall: Duration::from_secs(2),
            slack: 4.0,
            pace: None,
            check: false,
            fault: None,
            forge: false,
        }
    }
}

/// How one part of the buffer came back.
#[derive(Debug, Clone, PartialEq)]
pub struct PartResult {
    /// The member that reduced it.
    pub reducer: usize,
    pub range: Range<usize>,
    pub chunks: usize,
    /// Chunks that came back averaged (the rest kept this member's own values).
    pub chunks_done: usize,
    /// The least total weight behind any of its chunks.
    pub weight: f64,
    /// Members whose contributions made it into every averaged chunk.
    pub contributors: Vec<usize>,
    /// Why no stream to its reducer could be opened, if none was (the part kept this member's
    /// own values throughout).
    pub unreached: Option<String>,
}

impl PartResult {
    pub fn complete(&self) -> bool {
        self.chunks_done == self.chunks
    }
}

/// What a round did, for this member.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub parts: Vec<PartResult>,
    /// Senders this member's reducer excluded or whose contributions it dropped, and why.
    pub excluded: Vec<(usize, String)>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// This member's channels of the round that went direct ([`potluck_net::direct`]), of
    /// all it had (streams it opened and streams opened to it).
    pub direct_channels: usize,
    pub channels: usize,
    pub elapsed: Duration,
    /// Parts whose two reducers returned different averages ([`Settings::check`]): this
    /// member kept its own values there.
    pub disputes: Vec<super::check::Dispute>,
    /// Parts that came back without a second reducer's result to compare with (the check
    /// was on, but one of the two failed, or only one member reduces).
    pub unchecked: usize,
}

impl Report {
    /// This member's achieved throughput in the round: bytes moved each way per second. A
    /// lower bound on its capacity, and it follows the part it was given: balancing parts on
    /// it round after round feeds back (measure capacity with [`Host::probe`] instead).
    ///
    /// [`Host::probe`]: potluck_net::host::Host::probe
    pub fn rate(&self) -> f64 {
        let bytes = self.bytes_sent.max(self.bytes_received) as f64;
        bytes / self.elapsed.as_secs_f64().max(1e-6)
    }

    /// Whether every part came back averaged.
    pub fn complete(&self) -> bool {
        self.parts.iter().all(PartResult::complete)
    }

    /// The least weight behind any averaged part (what the result stands for).
    pub fn weight(&self) -> f64 {
        self.parts
            .iter()
            .filter(|p| p.chunks > 0)
            .map(|p| p.weight)
            .fold(f64::INFINITY, f64::min)
    }
}

/// Errors that stop a round before it starts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this member is not in the group")]
    NotAMember,
    #[error("the buffer has {got} values, the group averages {expected}")]
    Length { got: usize, expected: usize },
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error("this member vanished as its fault injection said")]
    Vanished,
}

/// Counts toward an injected fault and fires it.
#[derive(Debug)]
pub(super) struct Crash {
    fault: Option<Fault>,
    sent: std::sync::atomic::AtomicUsize,
    fired: tokio::sync::Notify,
}

impl Crash {
    pub(super) async fn sent_chunk(&self) {
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.check(Fault::Sending(n)).await;
    }

    /// Fires the fault if this is its point, and then never returns (the round is dropped).
    pub(super) async fn check(&self, fault: Fault) {
        if self.fault == Some(fault) {
            self.fired.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

/// Per-round timing from the members' measured rates.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    min_stall: Duration,
    slack: f64,
}

impl Timing {
    /// How long `bytes` may take over a link of `rate` bytes/s shared `share` ways.
    pub(super) fn allow(&self, bytes: usize, rate: f64, share: usize) -> Duration {
        let expected = bytes as f64 * share.max(1) as f64 / rate.max(1.0);
        self.min_stall
            .max(Duration::from_secs_f64((self.slack * expected).min(3600.0)))
    }
}

/// Averages `buffer` with the group, as member `me` with `weight`; the result replaces
/// `buffer` where it came back (see [`Report`]).
pub async fn all_reduce(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    settings: &Settings,
) -> Result<Report, Error> {
    if settings.check {
        return super::check::checked(inbox, group, me, weight, buffer, settings).await;
    }
    run(inbox, group, me, weight, buffer, None, settings).await
}

/// [`all_reduce`] with error feedback for lossy codecs: what compression left out of this
/// member's values in one round (kept in `residual`, as long as the buffer, zero at first) is
/// added to what it sends in the next; and as a reducer, what it left out of the averages it
/// returned (kept in the residual's stretch of its own part, which it sends no values of) is
/// added to the averages it returns next, so the rounding cancels over rounds both ways.
pub async fn all_reduce_with_feedback(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    residual: &mut [f32],
    settings: &Settings,
) -> Result<Report, Error> {
    if residual.len() != buffer.len() {
        return Err(Error::Length {
            got: residual.len(),
            expected: buffer.len(),
        });
    }
    run(inbox, group, me, weight, buffer, Some(residual), settings).await
}

pub(super) async fn run(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    residual: Option<&mut [f32]>,
    settings: &Settings,
) -> Result<Report, Error> {
    let started = Instant::now();
    if me >= group.members.len() || group.members[me].peer != inbox.host.peer_id() {
        return Err(Error::NotAMember);
    }
    if buffer.len() != group.len() {
        return Err(Error::Length {
            got: buffer.len(),
            expected: group.len(),
        });
    }
    let registration = inbox.register(group.round, group.members.len());
    let round = Round::new(inbox, group, me, weight, settings);
    // Split the buffer into the members' parts.
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(group.members.len());
    let mut residuals: Vec<Option<&mut [f32]>> = Vec::with_capacity(group.members.len());
    let mut rest = buffer;
    let mut rest_residual = residual;
    for &len in &group.parts {
        let (part, tail) = rest.split_at_mut(len);
        parts.push(part);
        rest = tail;
        match rest_residual.take() {
            Some(r) => {
                let (head, tail) = r.split_at_mut(len);
                residuals.push(Some(head));
                rest_residual = Some(tail);
            }
            None => residuals.push(None),
        }
    }
    let mut jobs = Vec::new();
    let mut own = None;
    for (j, (part, residual)) in parts.into_iter().zip(residuals).enumerate() {
        if group.parts[j] == 0 {
            continue;
        }
        if j == me {
            own = Some((part, residual));
            continue;
        }
        jobs.push(exchange(&round, j, part, residual));
    }
    let reduce = async {
        match own {
            Some((part, residual)) => Some(reduce(&round, registration, part, residual).await),
            None => {
                // No part: refuse whoever opens a stream to us (they keep their values).
                drop(registration);
                None
            }
        }
    };
    let tasks = async { futures::join!(futures::future::join_all(jobs), reduce) };
    let (mut results, mine) = tokio::select! {
        done = tasks => done,
        () = round.crash.fired.notified() => return Err(Error::Vanished),
    };
    let mut report = Report::default();
    if let Some((result, excluded)) = mine {
        results.push(result);
        report.excluded = excluded;
    }
    results.sort_by_key(|r| r.reducer);
    report.parts = results;
    let counters = &round.counters;
    report.bytes_sent = counters.sent.load(Ordering::Relaxed);
    report.bytes_received = counters.received.load(Ordering::Relaxed);
    report.direct_channels = counters.direct.load(Ordering::Relaxed);
    report.channels = counters.channels.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What every task of one round of this member shares: its sending side of each other part
/// ([`exchange`]) and its own part ([`reduce`]) borrow it for the round.
pub(super) struct Round<'a> {
    pub(super) inbox: &'a Inbox,
    pub(super) group: &'a Group,
    /// This member's index in the group.
    pub(super) me: usize,
    /// Its weight; 0 where it does not send.
    pub(super) weight: f32,
    pub(super) settings: &'a Settings,
    pub(super) timing: Timing,
    pub(super) crash: Crash,
    pub(super) pace: Pace,
    pub(super) uplink: Arc<Uplink>,
    /// Shared with the readers a reducer spawns (tasks of their own, which can't borrow).
    pub(super) counters: Arc<Counters>,
}

impl<'a> Round<'a> {
    fn new(
        inbox: &'a Inbox,
        group: &'a Group,
        me: usize,
        weight: f32,
        settings: &'a Settings,
    ) -> Round<'a> {
        let timing = Timing {
            min_stall: settings.min_stall,
            slack: settings.slack,
        };
        let weight = if group.sends(me) { weight } else { 0.0 };
        let counters = Arc::new(Counters::default());
        let crash = Crash {
            fault: settings.fault,
            sent: Default::default(),
            fired: tokio::sync::Notify::new(),
        };
        let pace = Pace::new(group.members.len());
        let uplink = Uplink::new(settings.pace.map(|f| f * group.members[me].rate));
        Round {
            inbox,
            group,
            me,
            weight,
            settings,
            timing,
            crash,
            pace,
            uplink,
            counters,
        }
    }
}

/// What a member's round counts as it goes.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) sent: AtomicU64,
    pub(super) received: AtomicU64,
    direct: AtomicUsize,
    channels: AtomicUsize,
}

impl Counters {
    pub(super) fn channel(&self, direct: bool) {
        self.channels.fetch_add(1, Ordering::Relaxed);
        if direct {
            self.direct.fetch_add(1, Ordering::Relaxed);
        }
    }
}
