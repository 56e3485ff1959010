//! The background task of a collaborative peer: publishes its progress, reads the swarm's,
//! agrees on each epoch's deadline and forms its group ahead of it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use potluck_allreduce::butterfly::Group;
use potluck_allreduce::matchmaking::{self, Matchmaker};
use potluck_core::clock::{self, Time};
use potluck_core::lock;
use potluck_net::dht;
use tokio::sync::watch;

use super::{Alone, Attack, Net, Settings};
use crate::progress::{self, Deadline, Tracker};
use crate::reports;
use crate::sync::Donor;
use crate::tokenizers;

use super::view::{Reported, View};

/// What this peer tells the progress task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Local {
    pub(super) epoch: u64,
    /// Steps in the state it serves.
    pub(super) held: u64,
    pub(super) samples: u64,
    pub(super) rate: f64,
    /// Samples in its largest micro-batch (0 before its first, and in an aux peer).
    pub(super) micro: u64,
    /// Whether it holds the swarm's state (only then it reports, and serves).
    pub(super) publish: bool,
    /// The digest of its state's optimizer settings ([`crate::optim::Config::digest`]).
    pub(super) optimizer: u64,
}

/// Epochs behind this peer's whose reports are still kept.
const KEEP_EPOCHS: u64 = 2;

/// How long a peer's progress report counts: a loaded machine may publish late, and a peer
/// that seems gone for a moment must not make the others step alone.
pub(super) fn report_ttl(settings: &Settings) -> Duration {
    (settings.report_every * 4).max(Duration::from_secs(3))
}

/// An averaging round under way: its group forming in the background.
pub(super) struct Round {
    pub(super) epoch: u64,
    pub(super) deadline: Time,
    pub(super) group: tokio::task::JoinHandle<Result<Group, matchmaking::Error>>,
    /// The group's outcome once formed.
    pub(super) formed: Option<Result<Group, Alone>>,
}

/// The most a deadline's lead grows for a slow DHT (beyond that the DHT is failing, and
/// waiting longer does not help).
const MAX_SLACK: Duration = Duration::from_secs(3);

/// A group task's outcome.
pub(super) fn formed(
    done: Result<Result<Group, matchmaking::Error>, tokio::task::JoinError>,
) -> Result<Group, Alone> {
    match done {
        Ok(Ok(group)) => Ok(group),
        Ok(Err(matchmaking::Error::TooLate { .. } | matchmaking::Error::Excluded { .. })) => {
            Err(Alone::TooLate)
        }
        Ok(Err(e)) => Err(Alone::Matchmaking(Arc::new(e))),
        Err(e) => Err(Alone::GroupTask(Arc::new(e))),
    }
}

/// A proposal for an epoch's deadline, rounded so concurrent proposals tend to agree.
pub(super) fn deadline_after(lead: Duration) -> Time {
    let t = clock::now() + lead.as_millis() as u64;
    t.div_ceil(100) * 100
}

/// The round the progress task started for the compute loop to take.
pub(super) type Pending = std::sync::Arc<std::sync::Mutex<Option<Round>>>;

/// Publishes this peer's progress and reads the swarm's until either side is dropped; when
/// the swarm reaches the target of this peer's epoch, agrees on the deadline and starts
/// forming the group at once (whatever the compute loop is doing).
pub(super) async fn progress_loop(
    net: Net,
    settings: Settings,
    addrs: Vec<Multiaddr>,
    len: usize,
    mut local: watch::Receiver<Local>,
    view: watch::Sender<Option<View>>,
    pending: Pending,
) {
    let me = net.dht.peer_id();
    // Reports live this long. A loaded machine may publish late: a peer that seems gone for
    // a moment must not make the others step alone (see `alone` below).
    let ttl = report_ttl(&settings);
    let mut reported = Reported::new();
    // Peers of other tokenizers this peer warned of (those still live).
    let mut warned = HashSet::new();
    // Peers of another recipe this peer warned of (those still live), and its own recipe.
    let mut warned_misfits = HashSet::new();
    let recipe = settings.recipe();
    // What this peer saw of the others' work, and the peers whose claimed rate it cut (those
    // still live, warned of once).
    let mut measure = progress::Measure::default();
    let mut overclaimed = HashSet::new();
    let mut last_others: Option<Instant> = None;
    let tracker = Tracker {
        dht: &net.dht,
        keypair: &net.keypair,
        run: &settings.run,
        ttl,
    };
    let wire_addrs: Vec<Vec<u8>> = addrs.iter().map(|a| a.to_vec()).collect();
    let mut closing: Option<(u64, Time)> = None;
    // The epoch whose round this peer declared its offer for as it entered the epoch, when it
    // last refreshed it, and the store under way.
    let mut declared: Option<u64> = None;
    let mut refreshed = Instant::now();
    let mut refreshing: Option<tokio::task::JoinHandle<()>> = None;
    let rush = settings.attack == Some(Attack::Rush);
    // How long this peer's DHT reads take (a moving average): on a loaded machine they take
    // hundreds of milliseconds, and a deadline must leave room for them.
    let mut latency = Duration::ZERO;
    loop {
        // A deadline must leave every peer time to see it (one report, a read of the
        // proposals) and to declare (a store), at the DHT's pace as this peer measures it.
        let min_lead = min_lead(&settings, latency);
        let l = *local.borrow_and_update();
        // The moment this peer entered its epoch (the others' claims in it are measured from
        // then).
        measure.begin(l.epoch, clock::now());
        if l.publish {
            // What an attacker says of its progress (the harness's liars), else the truth.
            let ahead = settings.attack.map_or(0, Attack::ahead);
            let (samples, rate) = if rush {
                (settings.target_batch.saturating_mul(1000), 1e9)
            } else {
                (l.samples, l.rate)
            };
            let report = progress::Report {
                epoch: l.epoch.saturating_add(ahead),
                samples,
                samples_per_second: rate,
                time: clock::now(),
                held: l.held.saturating_add(ahead),
                addrs: wire_addrs.clone(),
                tokenizers: settings.tokenizers,
                recipe: recipe.clone(),
                optimizer: l.optimizer,
            };
            if let Err(e) = tracker.publish(&report).await {
                tracing::debug!("publishing progress: {e}");
            }
        }
        // The offer for this epoch's round goes out as the epoch begins, not at its end: on a
        // slow link full of the last epoch's averaging a store takes seconds, longer than a
        // deadline's lead, and every peer of three on 10 Mbit/s links came too late for the
        // round after each averaging. Starting the round refreshes it. A peer alone declares
        // nothing: it steps its epochs without a round, and an offer it left behind for an
        // epoch put a newcomer that came to that epoch in a group with a peer long gone (it
        // waited out the open timeout and averaged nothing).
        // Until the round's deadline is known the offer lives `early_offer(ttl)`, refreshed
        // every `ttl` (one store at a time): a peer that dies mid-epoch drops out of the
        // round by its deadline.
        let with_others = last_others.is_some_and(|t| t.elapsed() < 2 * ttl);
        let round_set = closing.is_some_and(|(e, _)| e == l.epoch);
        let due = declared != Some(l.epoch)
            || (!round_set
                && refreshed.elapsed() >= ttl
                && refreshing.as_ref().is_none_or(|r| r.is_finished()));
        if l.publish && with_others && due {
            declared = Some(l.epoch);
            refreshed = Instant::now();
            let offer = matchmaking::offer(&addrs, settings.mode, net.link.rate_or(settings.rate));
            let (net, mm, run, epoch) = (
                net.clone(),
                settings.matchmaking.clone(),
                settings.scope(),
                l.epoch,
            );
            let store = tokio::spawn(async move {
                let mm = Matchmaker {
                    dht: &net.dht,
                    keypair: &net.keypair,
                    run: &run,
                    settings: mm,
                };
                let until = clock::now() + early_offer(ttl).as_millis() as u64;
                if let Err(e) = mm.declare_until(epoch, until, &offer).await {
                    tracing::debug!("declaring for epoch {epoch}'s round early: {e}");
                }
            });
            refreshing = Some(store);
        }
        // Members this peer's reducer banned and donors it caught lying since the last
        // report: told to the swarm (both checked, so both marks are taken).
        if net.inbox.take_fresh_bans() | net.suspects.take_fresh() {
            let mut named = net.inbox.bans();
            named.extend(net.suspects.named());
            if let Err(e) = reports::publish(&net.dht, &net.keypair, &settings.run, &named).await {
                tracing::warn!("reporting {} misbehaving peers: {e}", named.len());
            }
        }
        let asked = Instant::now();
        let fetched = tracker.fetch().await;
        latency = if latency.is_zero() {
            asked.elapsed()
        } else {
            latency.mul_f64(0.75) + asked.elapsed().mul_f64(0.25)
        };
        let mut near = false;
        match fetched {
            Ok(mut reports) => {
                let now = clock::now();
                // Our own report, as we know it now (the DHT's copy may lag).
                reports.retain(|(p, _)| *p != me);
                let strangers = leave_out_strangers(&mut reports, &settings, now, ttl);
                warn_of_strangers(&mut warned, &strangers, &settings);
                let misfits = leave_out_misfits(&mut reports, &recipe, now, ttl);
                warn_of_misfits(&mut warned_misfits, &misfits, &recipe);
                remember(&mut reported, &reports, l.epoch);
                let live = |r: &progress::Report| r.time + ttl.as_millis() as u64 >= now;
                let optimizers: HashMap<PeerId, u64> = reports
                    .iter()
                    .filter(|(_, r)| live(r))
                    .map(|(peer, r)| (*peer, r.optimizer))
                    .collect();
                let others: Vec<(u64, u64, Donor)> = reports
                    .iter()
                    .filter(|(_, r)| live(r))
                    .map(|(peer, r)| {
                        let addrs = r
                            .addrs
                            .iter()
                            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                            .collect();
                        (r.epoch, r.held, Donor { peer: *peer, addrs })
                    })
                    .collect();
                let mine = progress::Report {
                    epoch: l.epoch,
                    samples: l.samples,
                    samples_per_second: l.rate,
                    time: now,
                    held: l.held,
                    addrs: Vec::new(),
                    tokenizers: settings.tokenizers,
                    recipe: recipe.clone(),
                    optimizer: l.optimizer,
                };
                let target = settings.target_batch;
                // The others' claims count only as far as this peer measures them.
                measure.observe(&reports, now, ttl);
                if l.publish {
                    measure.observe(&[(me, mine.clone())], now, ttl);
                }
                let cut = measure.bound(&mut reports, now, l.micro);
                warn_of_overclaims(&mut overclaimed, &cut, &reports, now, ttl);
                let mut others_state = progress::swarm_state(&reports, now, target, ttl);
                if l.publish {
                    reports.push((me, mine));
                }
                let mut state = progress::swarm_state(&reports, now, target, ttl);
                // The peers that closed this epoch and moved on (their round under way) gathered
                // their samples of it all the same: counted no more, the others computed their
                // share again before they saw the target (two `small` peers on 10 Mbit/s links
                // in local-update mode came to the round 28 s after the third, which had left).
                let closed = closed_samples(&reported, &reports, l.epoch, &measure, now, l.micro);
                for s in [&mut state, &mut others_state] {
                    count_closed(s, l.epoch, closed, target);
                }
                // Once any peer closed this epoch, this one joins the round too, whatever its
                // own estimate says; it proposes a deadline only when it sees the target met.
                // A round of this epoch whose deadline is `max_wait` past without the epoch
                // ending here was missed by all (see `Collab::tick`): it may close again.
                let retry = |d: Time| now >= d + settings.max_wait.as_millis() as u64;
                let open = closing.is_none_or(|(e, d)| e != l.epoch || retry(d));
                // The swarm nears the target: another peer may propose the deadline any
                // moment, and this one must see it soon enough to declare.
                near = open
                    && state.epoch == l.epoch
                    && state.eta.is_some_and(|eta| {
                        eta <= settings.lead.max(min_lead) + settings.report_every
                    });
                // The furthest ahead any honest peer proposes (whatever its DHT's pace), with
                // room for a report's lag.
                let latest = latest_lead(&settings);
                if rush {
                    // The harness's liar: a deadline already past, for every epoch.
                    let past = Deadline(now.saturating_sub(1_000));
                    let key = progress::deadlines(&settings.scope(), l.epoch);
                    let put = key.put(&net.dht, &net.keypair, &past, now + 60_000);
                    if let Err(e) = put.await {
                        tracing::debug!("proposing a past deadline: {e}");
                    }
                }
                if open && l.publish && !others.is_empty() {
                    let propose = (state.epoch == l.epoch)
                        .then_some(state.eta)
                        .flatten()
                        .filter(|eta| *eta <= settings.lead.max(min_lead))
                        .map(|eta| deadline_after(eta.max(min_lead)));
                    match close(&net, &settings, l.epoch, propose, latest).await {
                        Ok(None) => {}
                        Ok(Some(Closed { deadline, watch })) => {
                            tracing::debug!(
                                "epoch {}: its round's deadline is in {} ms ({}); the swarm \
                                 holds {} of {target} samples here ({} of {} live peers in \
                                 the epoch, eta {:?})",
                                l.epoch,
                                deadline as i64 - now as i64,
                                if propose == Some(deadline) {
                                    "proposed here"
                                } else {
                                    "another peer's"
                                },
                                state.samples,
                                state.in_epoch,
                                state.peers,
                                state.eta,
                            );
                            closing = Some((l.epoch, deadline));
                            let early = declared == Some(l.epoch);
                            let round = start_round(
                                &net,
                                &settings,
                                &addrs,
                                len,
                                (l.epoch, deadline),
                                early,
                                watch,
                            );
                            *lock(&pending) = Some(round);
                        }
                        Err(e) => tracing::debug!("closing epoch {}: {e}", l.epoch),
                    }
                }
                if !others.is_empty() {
                    last_others = Some(Instant::now());
                }
                // Alone only when no other peer has been seen for two report lifetimes.
                let alone = last_others.is_none_or(|t| t.elapsed() >= 2 * ttl);
                let v = View {
                    state,
                    others_state,
                    others,
                    alone,
                    reported: Arc::new(reported.clone()),
                    ttl,
                    strangers,
                    misfits,
                    optimizers,
                };
                if view.send(Some(v)).is_err() {
                    return;
                }
            }
            Err(e) => tracing::debug!("reading progress: {e}"),
        }
        // Wake at the next report, at once when this peer's epoch or wish to report changes,
        // and soon (a quarter of the interval after the last report) when its samples change
        // (the others decide whether to compute on them) or the epoch's end nears.
        let started = tokio::time::Instant::now();
        let until = started + settings.report_every;
        let soon = started + settings.report_every / 4;
        let mut counted = near;
        loop {
            let wake = if counted { soon } else { until };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                changed = local.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = *local.borrow();
                    if now.epoch != l.epoch || now.publish != l.publish || (now.rate == 0.0) != (l.rate == 0.0) {
                        break;
                    }
                    counted |= now.samples != l.samples;
                }
            }
        }
    }
}

/// Takes out of `reports` the peers whose data was encoded with other tokenizers than this
/// peer's, and returns the live ones with theirs: an epoch's samples, its deadline, its group
/// and the state downloaded are of the peers of this peer's tokenizers alone (a gradient of
/// other tokenizers teaches the model other pictures for the same codes).
fn leave_out_strangers(
    reports: &mut Vec<(PeerId, progress::Report)>,
    settings: &Settings,
    now: Time,
    ttl: Duration,
) -> Vec<(PeerId, tokenizers::Id)> {
    let mut strangers = Vec::new();
    reports.retain(|(peer, r)| {
        if r.tokenizers == settings.tokenizers {
            return true;
        }
        if r.time.saturating_add(ttl.as_millis() as u64) >= now {
            strangers.push((*peer, r.tokenizers));
        }
        false
    });
    strangers
}

/// Takes out of `reports` the peers that train by another recipe than `recipe` and returns
/// the live ones with theirs: a peer averaging every step and one taking local steps, or two
/// of other codecs, would average buffers that mean other things or are cut differently.
fn leave_out_misfits(
    reports: &mut Vec<(PeerId, progress::Report)>,
    recipe: &str,
    now: Time,
    ttl: Duration,
) -> Vec<(PeerId, String)> {
    let mut misfits = Vec::new();
    reports.retain(|(peer, r)| {
        if r.recipe == recipe {
            return true;
        }
        if r.time.saturating_add(ttl.as_millis() as u64) >= now {
            misfits.push((*peer, r.recipe.clone()));
        }
        false
    });
    misfits
}

/// Warns once of each live peer of another recipe (`warned` keeps those still live).
fn warn_of_misfits(warned: &mut HashSet<PeerId>, misfits: &[(PeerId, String)], recipe: &str) {
    warned.retain(|p| misfits.iter().any(|(s, _)| s == p));
    for (peer, theirs) in misfits {
        if warned.insert(*peer) {
            tracing::warn!(
                "peer {peer} trains by another recipe ({theirs}) than this peer ({recipe}): it \
                 is left out of this peer's epochs, groups and downloads (every peer of a run \
                 must pass the same --local-steps and --codec)"
            );
        }
    }
}

/// Warns once of each live peer of other tokenizers (`warned` keeps those still live).
fn warn_of_strangers(
    warned: &mut HashSet<PeerId>,
    strangers: &[(PeerId, tokenizers::Id)],
    settings: &Settings,
) {
    warned.retain(|p| strangers.iter().any(|(s, _)| s == p));
    for (peer, theirs) in strangers {
        if warned.insert(*peer) {
            tracing::warn!(
                "peer {peer} encodes its data with other tokenizers ({}) than this peer ({}): \
                 it is left out of this peer's epochs, groups and downloads (prepare the data \
                 with the run's tokenizers: potluck prepare --from-run {})",
                tokenizers::short(theirs),
                tokenizers::short(&settings.tokenizers),
                settings.run
            );
        }
    }
}

/// Warns once of each live peer whose claimed rate was cut (`warned` keeps those still live).
fn warn_of_overclaims(
    warned: &mut HashSet<PeerId>,
    cut: &[progress::Cut],
    reports: &[(PeerId, progress::Report)],
    now: Time,
    ttl: Duration,
) {
    let live = |p: &PeerId| {
        reports
            .iter()
            .any(|(q, r)| q == p && r.time.saturating_add(ttl.as_millis() as u64) >= now)
    };
    warned.retain(|p| live(p));
    for c in cut {
        if warned.insert(c.peer) {
            tracing::warn!(
                "peer {} claims {:.1} samples/s, more than {} times the median peer's: its \
                 samples count toward an epoch's end at {:.1}/s at most (a much faster machine \
                 than the others, or a peer claiming work it did not do)",
                c.peer,
                c.claimed,
                progress::SPREAD,
                c.counted
            );
        }
    }
}

/// The samples of `epoch` last reported by the peers whose newest report (in `reports`) is of a
/// later epoch: they closed it and moved on. Each counts as far as `measure` bounds its claim.
fn closed_samples(
    reported: &Reported,
    reports: &[(PeerId, progress::Report)],
    epoch: u64,
    measure: &progress::Measure,
    now: Time,
    micro: u64,
) -> u64 {
    let mut closed: Vec<(PeerId, progress::Report)> = reports
        .iter()
        .filter(|(_, r)| r.epoch > epoch)
        .filter_map(|(peer, _)| reported.get(&(*peer, epoch)).map(|r| (*peer, r.clone())))
        .collect();
    measure.bound(&mut closed, now, micro);
    closed
        .iter()
        .map(|(_, r)| r.samples)
        .fold(0, u64::saturating_add)
}

/// Adds `closed` samples (of peers that closed `epoch`, [`closed_samples`]) to `state` if it is
/// of that epoch, and its time to the target with them.
fn count_closed(state: &mut progress::SwarmState, epoch: u64, closed: u64, target: u64) {
    if state.epoch != epoch || closed == 0 {
        return;
    }
    state.samples = state.samples.saturating_add(closed);
    state.committed = state.committed.saturating_add(closed);
    state.eta = progress::eta(state.samples, target, state.samples_per_second);
}

/// Keeps the newest of `reports` per peer and epoch in `reported`, for the epochs from
/// [`KEEP_EPOCHS`] before `epoch` on (older ones are dropped: memory stays bounded by the
/// live peers).
fn remember(reported: &mut Reported, reports: &[(PeerId, progress::Report)], epoch: u64) {
    let oldest = epoch.saturating_sub(KEEP_EPOCHS);
    reported.retain(|(_, e), _| *e >= oldest);
    for (peer, r) in reports {
        if r.epoch < oldest || r.epoch > epoch.saturating_add(KEEP_EPOCHS) {
            continue;
        }
        let newer = reported
            .get(&(*peer, r.epoch))
            .is_none_or(|seen| seen.time <= r.time);
        if newer {
            reported.insert((*peer, r.epoch), r.clone());
        }
    }
}

/// The least time a proposed deadline leaves every peer to see it (one report, a read of the
/// proposals) and to declare (a store), at the DHT's pace as this peer measures it (`latency`,
/// a moving average of its reads).
fn min_lead(settings: &Settings, latency: Duration) -> Duration {
    settings.report_every
        + settings.matchmaking.declare_ahead
        + Duration::from_millis(200)
        + latency.saturating_mul(4).min(MAX_SLACK)
}

/// The furthest ahead any honest peer proposes a deadline, whatever its DHT's pace, with room
/// for a report's lag. (It was the minimum lead less this peer's latency term plus the most
/// that term can be: with the latency read anew between the two, the subtraction overflowed
/// and the progress task panicked, leaving its peer blind to the swarm for good.)
fn latest_lead(settings: &Settings) -> Duration {
    settings.lead.max(min_lead(settings, MAX_SLACK)) + settings.report_every
}

/// How long an offer declared before its round's deadline is known lives past its last
/// refresh (every report lifetime `ttl`): five lifetimes, so that four refreshes in a row may
/// be slow (a store on a link full of the last averaging takes seconds) before it lapses. Once
/// the round starts, an offer lives a minute past the deadline.
fn early_offer(ttl: Duration) -> Duration {
    ttl * 5
}

/// Starts forming `epoch`'s group by `deadline` in the background. With its offer out
/// (`early`), a store too late to be seen by the deadline only fails to refresh it.
/// `watching` (another deadline of the epoch was at hand), it learns as soon as the others
/// formed their group without it ([`Matchmaker::wait_for`]).
pub(super) fn start_round(
    net: &Net,
    settings: &Settings,
    addrs: &[Multiaddr],
    len: usize,
    (epoch, deadline): (u64, Time),
    early: bool,
    watching: bool,
) -> Round {
    let net = net.clone();
    let mm_settings = settings.matchmaking.clone();
    let run = settings.scope();
    let offer = matchmaking::offer(addrs, settings.mode, net.link.rate_or(settings.rate));
    let group = tokio::spawn(async move {
        let mm = Matchmaker {
            dht: &net.dht,
            keypair: &net.keypair,
            run: &run,
            settings: mm_settings,
        };
        match mm.declare(epoch, deadline, &offer).await {
            Ok(()) => {}
            Err(e) if early => {
                tracing::debug!("refreshing the offer for epoch {epoch}'s round: {e}");
            }
            Err(e) => return Err(e),
        }
        mm.wait_for(epoch, deadline, watching).await?;
        mm.agree(epoch, deadline, len).await
    });
    Round {
        epoch,
        deadline,
        group,
        formed: None,
    }
}

/// An epoch's round as [`close`] agreed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Closed {
    pub(super) deadline: Time,
    /// Another proposal was at hand or just past ([`at_hand`]): the others may be forming
    /// their group by it now, and this peer watches for it ([`Matchmaker::wait_for`]).
    pub(super) watch: bool,
}

/// The deadline of `epoch`'s averaging: the earliest plausible proposal under
/// `RUN/close/EPOCH` ([`plausible`]); if there is none, this peer's `propose`al, if any. A
/// proposal is a peer's word: one already past would make every peer too late for every
/// epoch, one far ahead would hold every group back until then; neither is taken. `latest`
/// is the furthest ahead an honest peer proposes.
pub(super) async fn close(
    net: &Net,
    settings: &Settings,
    epoch: u64,
    propose: Option<Time>,
    latest: Duration,
) -> Result<Option<Closed>, dht::Error> {
    let deadlines = progress::deadlines(&settings.scope(), epoch);
    let window = (settings.matchmaking.declare_ahead, latest);
    let near = (
        settings.matchmaking.grace,
        settings.matchmaking.declare_ahead,
    );
    let read = |v: Vec<(PeerId, Deadline)>| {
        let now = clock::now();
        let times = || v.iter().map(|(_, t)| t.0);
        (plausible(times(), now, window), at_hand(times(), now, near))
    };
    let (earliest, watch) = read(deadlines.get(&net.dht).await?);
    if let Some(deadline) = earliest {
        return Ok(Some(Closed { deadline, watch }));
    }
    let Some(mine) = propose else {
        return Ok(None);
    };
    deadlines
        .put(&net.dht, &net.keypair, &Deadline(mine), mine + 60_000)
        .await?;
    let (earliest, seen) = read(deadlines.get(&net.dht).await?);
    Ok(Some(Closed {
        deadline: earliest.unwrap_or(mine).min(mine),
        watch: watch || seen,
    }))
}

/// Whether one of `proposals` is at hand or just past at `now`: from `near.0` before it to
/// `near.1` after (too near to declare for, see [`plausible`]).
fn at_hand(proposals: impl Iterator<Item = Time>, now: Time, near: (Duration, Duration)) -> bool {
    let from = now.saturating_sub(near.0.as_millis() as u64);
    let to = now.saturating_add(near.1.as_millis() as u64);
    proposals.into_iter().any(|t| (from..to).contains(&t))
}

/// The earliest of `proposals` that lies in `window` after `now` (from the least time a peer
/// needs to declare for the round to the furthest an honest peer proposes).
fn plausible(
    proposals: impl Iterator<Item = Time>,
    now: Time,
    window: (Duration, Duration),
) -> Option<Time> {
    let from = now.saturating_add(window.0.as_millis() as u64);
    let to = now.saturating_add(window.1.as_millis() as u64);
    proposals.filter(|t| (from..=to).contains(t)).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that closed epoch 3 and moved to 4 (its round under way) keeps its last samples
    /// of 3 counted toward 3's target, as far as its measured rate allows; without them the
    /// two peers still in 3 would compute its share again before they saw the target.
    #[test]
    fn a_peer_that_closed_the_epoch_keeps_its_samples_counted() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let (now, stale, target) = (1_000_000, Duration::from_secs(3), 3_000);
        let report = |epoch, samples| progress::Report {
            epoch,
            samples,
            samples_per_second: 20.0,
            time: now - 100,
            held: epoch,
            addrs: Vec::new(),
            tokenizers: crate::tokenizers::NONE,
            recipe: String::new(),
            optimizer: 0,
        };
        let mut measure = progress::Measure::default();
        measure.begin(3, now - 60_000);
        let reports = vec![
            (a, report(4, 0)),
            (b, report(3, 1_000)),
            (c, report(3, 1_000)),
        ];
        measure.observe(&reports, now, stale);
        let mut reported = Reported::new();
        reported.insert((a, 3), report(3, 1_000));
        let mut state = progress::swarm_state(&reports, now, target, stale);
        assert_eq!((state.epoch, state.committed), (3, 2_000));
        assert!(!state.ready(target));
        let closed = closed_samples(&reported, &reports, 3, &measure, now, 16);
        assert_eq!(closed, 1_000);
        count_closed(&mut state, 3, closed, target);
        assert!(state.ready(target));
        assert_eq!(state.eta, Some(Duration::ZERO));
        // A claim beyond its rate since the epoch began here counts no further (20/s for 60 s,
        // and a micro-batch), and an epoch the state is not of gains nothing.
        reported.insert((a, 3), report(3, 1_000_000));
        assert_eq!(
            closed_samples(&reported, &reports, 3, &measure, now, 16),
            1_216
        );
        let mut later = progress::swarm_state(&reports, now, target, stale);
        later.epoch = 4;
        count_closed(&mut later, 3, 1_000, target);
        assert_eq!(later.committed, 2_000);
    }

    /// Whatever this peer's DHT latency, a deadline as far ahead as an honest peer may propose
    /// leaves at least the time to see it and declare.
    #[test]
    fn the_furthest_deadline_leaves_the_least_lead_at_any_latency() {
        let settings = Settings::new("run", 64);
        for ms in [0, 1, 100, 700, 2_000, 60_000, u64::MAX / 4] {
            let latency = Duration::from_millis(ms);
            assert!(
                latest_lead(&settings) >= min_lead(&settings, latency),
                "{ms} ms"
            );
        }
    }

    /// A proposal too near to declare for, or passed less than a grace period ago, is at
    /// hand (this peer watches for the group formed by it); one further off either way is not.
    #[test]
    fn a_deadline_too_near_to_take_is_at_hand() {
        let now = 1_000_000;
        let near = (Duration::from_secs(3), Duration::from_millis(500));
        let at = |ms: i64| (now as i64 + ms) as Time;
        for ms in [-2_999, -1_000, 0, 499] {
            assert!(at_hand([at(ms)].into_iter(), now, near), "{ms} ms");
        }
        for ms in [-3_001, 500, 2_000] {
            assert!(!at_hand([at(ms)].into_iter(), now, near), "{ms} ms");
        }
        assert!(at_hand([at(2_000), at(100)].into_iter(), now, near));
    }

    #[test]
    fn a_deadline_already_past_or_far_ahead_is_not_taken() {
        let now = 1_000_000;
        let window = (Duration::from_millis(500), Duration::from_secs(10));
        let at = |ms: i64| (now as i64 + ms) as Time;
        // An honest proposal among a past one and one an hour ahead: the honest one.
        let proposals = [at(-1_000), at(3_000), at(3_600_000)];
        assert_eq!(
            plausible(proposals.into_iter(), now, window),
            Some(at(3_000))
        );
        // The earliest of the plausible ones.
        let two = [at(9_000), at(2_000), at(200)];
        assert_eq!(plausible(two.into_iter(), now, window), Some(at(2_000)));
        // Only lies: none (this peer proposes its own).
        let lies = [at(-1), at(100), at(20_000), Time::MAX];
        assert_eq!(plausible(lies.into_iter(), now, window), None);
    }
}
