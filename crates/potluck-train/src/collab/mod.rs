//! The collaborative optimizer: many peers train one model as if it were one large batch.
//!
//! Every peer accumulates gradients of its own samples into a flat buffer and publishes its
//! progress ([`crate::progress`]) in the background. When the swarm is estimated to reach the
//! target batch within [`Settings::lead`], the first peer to see it proposes a deadline at the
//! estimated end under `RUN/close/EPOCH` (every peer takes the earliest proposal) and every
//! peer starts forming its group for that deadline ([`matchmaking`]) while it computes on.
//! Peers stop computing once the samples reported (computed or under way) reach the target;
//! once the group is formed and
//! the reports show the target reached (or [`Settings::max_wait`] passed the deadline), they
//! average their mean gradients weighted by their sample counts ([`butterfly`]) and take the
//! same inner step (LAMB by default) with the schedule of the *global* epoch. Every
//! `state_every` epochs the group then averages the parameters and the optimizer's moments
//! too, so peers that ever stepped alone are pulled back together. With [`Settings::delayed`] the averaging and the
//! step run in the background while the next epoch's gradients are computed.
//!
//! A peer that joins, or that finds another holding a newer state than its own, downloads
//! the state from the peers that hold the newest ([`sync`]); each peer serves its own state
//! after every step. A peer alone in the swarm steps alone as soon as its own samples reach
//! the target. A step whose averaged gradient is not finite is skipped by everyone alike
//! (they all hold the same gradient), and the epoch still advances. An auxiliary peer
//! ([`Mode::Auxiliary`]) computes nothing: it averages, keeps and serves the state.
//! An averaged gradient that spikes rolls every peer back to the last good state
//! ([`crate::guard`]).
//!
//! This module holds the compute loop ([`Collab::tick`]); `swarm` the background task that
//! reports progress and forms groups; `resync` the download of the swarm's state; `epoch` the
//! end of an epoch as the loop sees it, and `job` its work (all-reduce, guard, step).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use potluck_allreduce::balance::Mode;
use potluck_core::{Loss, Trainable, clock, lock};
use potluck_net::dht;
use tokio::sync::watch;

use crate::guard::Guard;
use crate::optim::{self, Optimizer};
use crate::progress::SwarmState;
use crate::state::TrainState;
use crate::sync::{self, Snapshot};
use crate::tokenizers;

mod attack;
mod epoch;
mod job;
mod links;
mod outcome;
mod resync;
mod settings;
mod swarm;
mod view;

pub use attack::Attack;
use attack::Attacker;
use job::{Job, Stepped};
pub use links::Link;
pub use outcome::{Alone, EpochReport, Tick, Traffic};
pub use settings::{ALONE_WARN, Compression, LocalUpdates, Net, SMALL_TENSOR, Settings};
use swarm::{Local, Pending, Round, formed, progress_loop};
use view::{Unserved, View};

/// Errors that stop training.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: std::error::Error + 'static> {
    #[error("model")]
    Model(#[source] E),
    #[error("data")]
    Data(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Optimizer(#[from] optim::Error),
    #[error(transparent)]
    Dht(#[from] dht::Error),
    #[error(transparent)]
    Host(#[from] potluck_net::host::Error),
    #[error("state download")]
    Sync(#[from] sync::Error),
    /// The task that averages and steps panicked or was cancelled.
    #[error("the step task stopped")]
    StepTask(#[source] tokio::task::JoinError),
    /// The task that publishes this peer's progress and reads the swarm's stopped (it
    /// panicked): the peer would go on blind to the swarm, computing for nothing.
    #[error("the progress task stopped: this peer no longer sees the swarm")]
    ProgressTask,
    /// Most live peers of the run encode their data with other tokenizers than this peer's
    /// (its gradients would teach the shared model other pictures for the same codes).
    #[error(
        "the run's peers encoded their data with other tokenizers ({} of them with {}) than \
         this peer's ({}, {same} other peers): prepare the data with the run's tokenizers \
         (potluck prepare --from-run)",
        .peers, tokenizers::short(.theirs), tokenizers::short(.ours)
    )]
    Tokenizers {
        ours: tokenizers::Id,
        theirs: tokenizers::Id,
        /// Live peers of `theirs`, and of `ours` (this one left out).
        peers: usize,
        same: usize,
    },
    /// Most live peers of the run train by another recipe than this peer's (local updates or
    /// not, another codec): its averaging would mix buffers that mean other things.
    #[error(
        "the run's peers train by another recipe ({peers} of them: {theirs}) than this peer \
         ({ours}, {same} other peers): pass the run's --local-steps and --codec"
    )]
    Recipe {
        ours: String,
        theirs: String,
        peers: usize,
        same: usize,
    },
}

impl<E: std::error::Error + 'static> From<job::Failed> for Error<E> {
    fn from(failed: job::Failed) -> Error<E> {
        match failed {
            job::Failed::Optimizer(e) => Error::Optimizer(e),
            job::Failed::Task(e) => Error::StepTask(e),
        }
    }
}

/// A peer of a collaborative run.
pub struct Collab<T: Trainable> {
    model: T,
    /// The state the model holds and the state server serves (the same allocation).
    state: Arc<TrainState>,
    grad: Vec<f32>,
    net: Net,
    settings: Settings,
    /// Samples and summed loss accumulated in this epoch.
    samples: u64,
    loss: Loss,
    local: watch::Sender<Local>,
    view: watch::Receiver<Option<View>>,
    round: Option<Round>,
    pending: Pending,
    /// The global epoch this peer computes gradients for.
    epoch: u64,
    /// The newest epoch this peer has seen the swarm in (its own included).
    newest: u64,
    /// A step running in the background (delayed updates), and a spare gradient buffer.
    busy: Option<tokio::task::JoinHandle<Result<Stepped, job::Failed>>>,
    spare: Vec<f32>,
    attacker: Option<Attacker>,
    /// The download it joined with, if it found a swarm.
    joined: Option<sync::Report>,
    /// An epoch this peer missed the averaging of (it waits to fall behind, then syncs), and
    /// the deadline it missed.
    missed: Option<u64>,
    missed_deadline: potluck_core::clock::Time,
    /// Samples in a full micro-batch (the largest computed), and samples/s (smoothed).
    micro_samples: u64,
    rate: f64,
    started_computing: Option<Instant>,
    /// The spike guard (in the step's job while one runs).
    guard: Option<Guard>,
    /// Epochs in a row it could not average though others were around.
    alone_epochs: u64,
    /// The epoch at which it last tried to download the swarm's state because it was held
    /// back (once an epoch: a donor that cannot serve is not asked at every tick).
    resync_tried: Option<u64>,
    /// The epoch it entered without stepping because no member of its group averaged with it
    /// ([`Alone::Unheard`]): it downloads the others' state of that epoch once they hold it.
    unheard: Option<u64>,
    /// Claims of holding a state that their peers did not serve.
    unserved: Unserved,
    /// Whether it holds the run's state (it started the swarm or joined it): from then on its
    /// optimizer settings are the run's, and no donor changes them.
    settled: bool,
    /// The epoch at which it last tried to take the run's optimizer settings from the peers
    /// that report them (once an epoch, as `resync_tried`).
    adopt_tried: Option<u64>,
    /// Error feedback of a lossy codec: what the last averaging's rounding left out of this
    /// peer's gradient, sent with the next (in the step's job while one runs). None with an
    /// exact codec, or under `--robust` (its checked rounds send each part twice).
    residual: Option<Vec<f32>>,
    /// Bytes averaged and downloaded so far (served: [`Net::shelf`]).
    traffic: Traffic,
    /// Local-update mode's own side: the parameters its inner steps move, and its inner
    /// optimizer (None: every step averaged).
    inner: Option<Inner>,
}

/// A peer's own side of local-update mode ([`Settings::local`]): the state's parameters are
/// the round's start (the outer parameters every peer holds alike), these move with every
/// inner step, and the model holds these.
struct Inner {
    params: Vec<f32>,
    optimizer: Optimizer,
    /// Samples of the gradient accumulated since the last inner step.
    since: u64,
    /// The samples each inner step takes.
    batch: u64,
    /// Inner steps this round, the last round, and in all.
    round_steps: u64,
    last_round: u64,
    steps: u64,
    /// The run's learning-rate schedule, in the swarm's batches: the inner steps of round `r`
    /// take its rate at batch `r × per_round`.
    schedule: optim::Schedule,
    per_round: u64,
    /// With delayed updates, the parameters the round's change was taken from while its
    /// averaging runs: the inner steps taken meanwhile are kept on top of the outer step.
    taken_from: Option<Vec<f32>>,
}

impl<T: Trainable> std::fmt::Debug for Collab<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collab")
            .field("epoch", &self.epoch())
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

impl<T: Trainable> Collab<T> {
    /// Joins the run: downloads the swarm's state if there is a swarm, or starts one from the
    /// model's parameters and `optimizer` as they are.
    pub async fn join(
        model: T,
        optimizer: Optimizer,
        net: Net,
        mut settings: Settings,
    ) -> Result<Collab<T>, Error<T::Error>> {
        settings.averaging.forge |= settings.attack == Some(Attack::Reducer);
        settings.averaging.plan = settings.codec.plan(model.layout());
        let n = model.layout().numel();
        let feedback = !settings.averaging.plan.is_exact() && !settings.averaging.check;
        let mut params = vec![0.0; n];
        model.read_params(&mut params).map_err(Error::Model)?;
        let addrs = net.dht.addrs().await?;
        let epoch = optimizer.steps();
        let (local, local_rx) = watch::channel(Local {
            epoch,
            held: epoch,
            samples: 0,
            rate: 0.0,
            micro: 0,
            publish: false,
            optimizer: optimizer.config().digest(),
        });
        let (view_tx, view) = watch::channel(None);
        let pending = Pending::default();
        tokio::spawn(progress_loop(
            net.clone(),
            settings.clone(),
            addrs,
            n,
            local_rx,
            view_tx,
            pending.clone(),
        ));
        tokio::spawn(links::measure_loop(
            net.clone(),
            settings.clone(),
            view.clone(),
        ));
        let attacker = settings.attack.map(Attacker::new);
        // An aux peer takes no inner steps: the change it sends is nothing, as its gradient.
        let computes = settings.mode != Mode::Auxiliary;
        let inner = settings.local.filter(|_| computes).map(|l| Inner {
            params: params.clone(),
            optimizer: Optimizer::new(l.inner, model.layout()).with_threads(optimizer.threads()),
            since: 0,
            batch: l.inner_batch.max(1),
            round_steps: 0,
            last_round: 0,
            steps: 0,
            schedule: l.inner.schedule,
            per_round: l.steps.max(1),
            taken_from: None,
        });
        let mut collab = Collab {
            model,
            state: Arc::new(TrainState::new(params, optimizer, 0)),
            grad: vec![0.0; n],
            net,
            settings,
            samples: 0,
            loss: Loss::default(),
            local,
            view,
            round: None,
            pending,
            epoch,
            newest: epoch,
            busy: None,
            spare: Vec::new(),
            attacker,
            joined: None,
            missed: None,
            missed_deadline: 0,
            micro_samples: 0,
            rate: 0.0,
            started_computing: None,
            guard: None,
            alone_epochs: 0,
            resync_tried: None,
            unheard: None,
            unserved: Unserved::new(),
            settled: false,
            adopt_tried: None,
            residual: feedback.then(|| vec![0.0; n]),
            traffic: Traffic::default(),
            inner,
        };
        // A charter's settings are the run's from the start.
        collab.settled = collab.settings.chartered;
        let mut guard = Guard::new(collab.settings.spike);
        guard.restart(&collab.state);
        collab.guard = Some(guard);
        // Look for a swarm; download its state if there is one.
        let until = tokio::time::Instant::now() + collab.settings.join_wait;
        loop {
            collab.refuse_other_tokenizers()?;
            let seen = collab.view.borrow().as_ref().map(|v| !v.others.is_empty());
            match seen {
                Some(true) => {
                    // A download that fails for want of agreeing donors (a tie, donors gone)
                    // is tried again by `tick`, as the swarm is ahead of this peer.
                    match collab.sync(None).await {
                        Ok(report) => collab.joined = Some(report),
                        Err(Error::Sync(e)) if !matches!(e, sync::Error::Mismatch(_)) => {
                            tracing::warn!(
                                "could not download the swarm's state to join, will try again: {e}"
                            );
                        }
                        Err(e) => return Err(e),
                    }
                    break;
                }
                Some(false) if tokio::time::Instant::now() >= until => break,
                _ => {}
            }
            if tokio::time::timeout_at(until, collab.view.changed())
                .await
                .is_err()
                && collab.view.borrow().is_none()
            {
                break;
            }
        }
        collab.settled = true;
        collab.restart_round(false)?;
        collab.shelve();
        collab.report(true);
        Ok(collab)
    }

    /// This peer's uplink in bytes per second, as its probes measured it (None: not measured
    /// yet, or not measuring: it offers [`Settings::rate`]).
    pub fn link(&self) -> Option<f64> {
        self.net
            .link
            .measured()
            .then(|| self.net.link.rate_or(self.settings.rate))
    }

    /// Bytes this peer sent and received since it started: its averaging rounds, the states
    /// it downloaded and served.
    pub fn traffic(&self) -> Traffic {
        let mut traffic = self.traffic;
        traffic.sent += self.net.shelf.served() + self.net.link.sent();
        traffic
    }

    /// Fails with [`Error::Tokenizers`] if the live peers of other tokenizers than this
    /// peer's outnumber those of its own (most of them: the run's are the others'), and with
    /// [`Error::Recipe`] if those of another recipe do.
    fn refuse_other_tokenizers(&self) -> Result<(), Error<T::Error>> {
        let view = self.view.borrow();
        let Some(v) = view.as_ref() else {
            return Ok(());
        };
        let mut recipes: HashMap<&str, usize> = HashMap::new();
        for (_, r) in &v.misfits {
            *recipes.entry(r.as_str()).or_default() += 1;
        }
        if let Some((theirs, peers)) = recipes.into_iter().max_by_key(|(r, n)| (*n, *r))
            && peers > v.others.len()
        {
            return Err(Error::Recipe {
                ours: self.settings.recipe(),
                theirs: theirs.to_owned(),
                peers,
                same: v.others.len(),
            });
        }
        let mut counts: HashMap<tokenizers::Id, usize> = HashMap::new();
        for (_, id) in &v.strangers {
            *counts.entry(*id).or_default() += 1;
        }
        let Some((theirs, peers)) = counts.into_iter().max_by_key(|(id, n)| (*n, *id)) else {
            return Ok(());
        };
        if peers > v.others.len() {
            return Err(Error::Tokenizers {
                ours: self.settings.tokenizers,
                theirs,
                peers,
                same: v.others.len(),
            });
        }
        Ok(())
    }

    /// Live peers whose data was encoded with other tokenizers than this peer's (left out of
    /// its epochs and groups), and theirs.
    pub fn strangers(&self) -> Vec<(libp2p::PeerId, tokenizers::Id)> {
        self.view
            .borrow()
            .as_ref()
            .map_or_else(Vec::new, |v| v.strangers.clone())
    }

    /// How this peer trains ([`Settings::recipe`]).
    pub fn recipe(&self) -> String {
        self.settings.recipe()
    }

    /// Live peers of this peer's tokenizers that train by another recipe
    /// ([`Settings::recipe`]; left out of its epochs and groups), and theirs.
    pub fn misfits(&self) -> Vec<(libp2p::PeerId, String)> {
        self.view
            .borrow()
            .as_ref()
            .map_or_else(Vec::new, |v| v.misfits.clone())
    }

    /// Waits until at least `n` other peers are live (true), or `within` passed (false).
    pub async fn await_peers(&mut self, n: usize, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        loop {
            if self
                .view
                .borrow_and_update()
                .as_ref()
                .is_some_and(|v| v.others.len() >= n)
            {
                return true;
            }
            if tokio::time::timeout_at(until, self.view.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// The global epoch this peer is in (optimizer steps taken).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The model.
    pub fn model(&self) -> &T {
        &self.model
    }

    /// The model, mutably (for evaluation).
    pub fn model_mut(&mut self) -> &mut T {
        &mut self.model
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.state.optimizer
    }

    pub fn params(&self) -> &[f32] {
        &self.state.params
    }

    /// The state the model holds and this peer serves (the last step's, or the downloaded).
    pub fn state(&self) -> &Arc<TrainState> {
        &self.state
    }

    /// The state download it joined with (none if it started the swarm).
    pub fn joined(&self) -> Option<&sync::Report> {
        self.joined.as_ref()
    }

    /// Samples per epoch.
    pub fn target(&self) -> u64 {
        self.settings.target_batch
    }

    /// Samples the swarm trained on up to this epoch.
    pub fn swarm_samples(&self) -> u64 {
        self.state.samples
    }

    /// The newest epoch this peer has seen any peer of the swarm in (its own included), even
    /// if those peers are gone since.
    pub fn swarm_epoch(&self) -> u64 {
        self.newest.max(self.epoch)
    }

    /// Whether no other peer has been seen for a good while (it steps alone if it computes).
    pub fn alone(&self) -> bool {
        self.view.borrow().as_ref().is_none_or(|v| v.alone)
    }

    /// What the swarm's peers reported of misbehaving members: (reporter, reported, why)
    /// ([`crate::reports`]).
    pub async fn reports(
        &self,
    ) -> Result<Vec<(libp2p::PeerId, libp2p::PeerId, String)>, dht::Error> {
        crate::reports::fetch(&self.net.dht, &self.settings.run).await
    }

    /// This peer's id.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.net.dht.peer_id()
    }

    /// The swarm as last seen: its state and how many other peers are live.
    pub fn swarm(&self) -> Option<(SwarmState, usize)> {
        self.view
            .borrow()
            .as_ref()
            .map(|v| (v.state.clone(), v.others.len()))
    }

    /// Epochs in a row this peer could not average though others were around.
    pub fn alone_epochs(&self) -> u64 {
        self.alone_epochs
    }

    fn report(&self, publish: bool) {
        self.local.send_replace(Local {
            epoch: self.epoch(),
            held: self.state.epoch(),
            samples: self.samples,
            rate: self.rate,
            micro: self.micro_samples,
            publish,
            optimizer: self.state.optimizer.config().digest(),
        });
    }

    /// Serves the current state (shared: nothing is copied or encoded until someone asks).
    fn shelve(&self) {
        let chunk = self.settings.chunk_bytes;
        let snapshot = match self
            .attacker
            .as_ref()
            .and_then(|a| a.served(&self.state, chunk))
        {
            Some(lie) => lie,
            None => Snapshot::of(Arc::clone(&self.state), chunk),
        };
        self.net.shelf.put(snapshot);
    }

    /// Does the next thing due: downloads the state if the swarm is ahead, averages and steps
    /// if the epoch's deadline has come, computes one micro-batch from `next` if the swarm
    /// still needs samples, or waits a moment. `next(n)` gives a micro-batch of at most `n`
    /// samples: the epoch's last one is cut to what the swarm still lacks.
    pub async fn tick(
        &mut self,
        next: &mut dyn FnMut(usize) -> Result<T::Batch, Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Tick, Error<T::Error>> {
        // A step done in the background: its parameters go in now (between micro-batches).
        if self.busy.as_ref().is_some_and(|b| b.is_finished())
            && let Some(report) = self.settle().await?
        {
            return Ok(Tick::Epoch(report));
        }
        if self.view.has_changed().is_err() {
            return Err(Error::ProgressTask);
        }
        // Marked seen, so waiting below waits for the next view.
        let view = self.view.borrow_and_update().clone();
        if let Some(v) = &view {
            self.newest = self.newest.max(v.state.epoch);
        }
        let epoch = self.epoch();
        // Behind the swarm: fetch its state (our gradients are for old parameters). A failed
        // download is tried again later: donors come and go. A peer held back from stepping
        // alone fetches the swarm's state at its own epoch too (once an epoch): it can no
        // longer average, but it can take the parameters the others reached.
        // (Its epoch's round may be forming: the download does not change the epoch.)
        let held = (self.alone_epochs > self.settings.alone_limit
            || self.unheard == Some(self.state.epoch()))
            && self.resync_tried != Some(self.state.epoch());
        // Training with other optimizer settings than most peers report (it started the run
        // alone with its own flags, as they did with theirs): it takes theirs, with their state
        // (once an epoch). An aux peer without --epochs kept a learning rate that never
        // decayed, and every averaging of the parameters pulled the trainers toward it.
        // Any download it makes meanwhile takes the run's settings too (asking for its own, it
        // would pass over every donor of the run's and name it a liar).
        let adopt = view.as_ref().and_then(|v| self.odd_optimizer(v));
        let adopt_now = adopt.is_some() && self.adopt_tried != Some(self.state.epoch());
        if self.busy.is_none()
            && let Some(v) = &view
            && ((self.round.is_none() && v.newest(&self.unserved) > self.state.epoch())
                || (held && !v.others.is_empty() && v.newest(&self.unserved) == self.state.epoch())
                || adopt_now)
        {
            if held {
                self.resync_tried = Some(self.state.epoch());
            }
            if adopt_now {
                self.adopt_tried = Some(self.state.epoch());
            }
            return match self.sync(adopt).await {
                Ok(report) => Ok(Tick::Synced(report, self.epoch())),
                Err(Error::Sync(e)) if !matches!(e, sync::Error::Mismatch(_)) => {
                    tracing::warn!("could not download the swarm's state, will try again: {e}");
                    Ok(Tick::Waited)
                }
                Err(e) => Err(e),
            };
        }
        let now = clock::now();
        // A round: its group forms by the deadline; the averaging starts once the swarm has
        // the target (or the epoch overran by `max_wait`). A peer too late to join the group
        // ends the epoch at once (it will download the new state).
        if let Some(round) = &mut self.round {
            if round.formed.is_none()
                && round.group.is_finished()
                && let Some(done) = (&mut round.group).now_or_never()
            {
                round.formed = Some(formed(done));
            }
            let too_late = matches!(&round.formed, Some(Err(Alone::TooLate)));
            let ready = view.as_ref().is_some_and(|v| {
                v.state.epoch > epoch
                    || (v.state.epoch == epoch && v.state.ready(self.settings.target_batch))
            });
            let overdue = now >= round.deadline + self.settings.max_wait.as_millis() as u64;
            if too_late || (round.formed.is_some() && (ready || overdue)) {
                return self.finish_epoch().await;
            }
        }
        // Alone only once the swarm was read and held no one else: a newcomer whose first read
        // of the swarm's progress was slow (a lookup waiting on a peer gone without a word)
        // stepped alone through every epoch of the run, seen by no one.
        let alone = view.as_ref().is_some_and(|v| v.alone);
        if alone && self.round.is_none() && self.samples >= self.settings.target_batch {
            return self.finish_epoch().await;
        }
        // Every peer may have been too late for a round (their DHT stores slowed by a link
        // full of the last averaging): then nobody steps to the next epoch, and waiting for
        // someone to fall behind waits for ever (three `small` peers on 10 Mbit/s links sat
        // for minutes). Once the missed deadline is `max_wait` past and no peer holds a newer
        // state, this peer joins a new round of the same epoch.
        if self.missed == Some(epoch)
            && now >= self.missed_deadline + self.settings.max_wait.as_millis() as u64
            && view
                .as_ref()
                .is_some_and(|v| v.newest(&self.unserved) <= self.state.epoch())
        {
            tracing::warn!(
                "epoch {epoch}: no peer averaged it since its deadline passed (all too late): \
                 joining a new round of it"
            );
            self.missed = None;
        }
        if let Some(round) = lock(&self.pending).take() {
            if round.epoch == epoch && self.missed != Some(epoch) && self.round.is_none() {
                self.round = Some(round);
            } else {
                round.group.abort();
            }
        }
        // Compute unless the swarm has the target, computed or under way (the others report a
        // micro-batch as they start it; it overshoots by less than a micro-batch per peer).
        let committed = view
            .as_ref()
            .map_or(self.samples, |v| v.committed(epoch, self.samples));
        // In local-update mode a peer never waits for the round to close: its inner steps go
        // on (into this round's change, its samples counted) until the group averages.
        let enough = !alone && committed >= self.settings.target_batch && self.inner.is_none();
        // An auxiliary peer computes nothing: it averages and keeps the state. Nor does a peer
        // held back from stepping alone while the others step to its epoch: it could not
        // average the gradients, and it downloads their state as soon as they hold it (it
        // steps at once, they after averaging: computing on, it reached the epoch's end before
        // the others' state was in, epoch after epoch, and never caught up).
        let idle = self.settings.mode == Mode::Auxiliary
            || (held
                && view.as_ref().is_some_and(|v| {
                    !v.others.is_empty() && v.newest(&self.unserved) < self.state.epoch()
                }));
        if idle || enough {
            if self.rate != 0.0 {
                self.rate_paused();
            }
            // Until the swarm's view changes, or the group forms.
            let view = &mut self.view;
            let wait = tokio::time::sleep(self.settings.report_every);
            match self.round.as_mut().filter(|r| r.formed.is_none()) {
                Some(round) => tokio::select! {
                    done = &mut round.group => round.formed = Some(formed(done)),
                    _ = view.changed() => {}
                    _ = wait => {}
                },
                None => tokio::select! {
                    _ = view.changed() => {}
                    _ = wait => {}
                },
            }
            return Ok(Tick::Waited);
        }
        let share = match &view {
            Some(v) if !alone && self.inner.is_none() => self.share(v, committed),
            _ => u64::MAX,
        };
        let batch = next(usize::try_from(share).unwrap_or(usize::MAX)).map_err(Error::Data)?;
        // The swarm counts this micro-batch from now (of a full one's size, or the share).
        let last = *self.local.borrow();
        self.local.send_replace(Local {
            samples: self.samples + self.micro_samples.min(share),
            micro: self.micro_samples,
            ..last
        });
        let started = Instant::now();
        let loss = self
            .model
            .accumulate_gradients(&batch, &mut self.grad)
            .map_err(Error::Model)?;
        let took = started.elapsed().as_secs_f64();
        let n = loss.samples as u64;
        self.micro_samples = self.micro_samples.max(n);
        // Samples per second of wall time while computing (gaps between ticks included).
        let since = self
            .started_computing
            .map_or(took, |s| s.elapsed().as_secs_f64())
            .max(1e-6);
        let inst = n as f64 / since;
        self.rate = if self.rate > 0.0 {
            0.8 * self.rate + 0.2 * inst
        } else {
            inst
        };
        self.started_computing = Some(Instant::now());
        self.samples += n;
        self.loss.add_weighted(&loss);
        if let Some(inner) = &mut self.inner {
            inner.since += n;
            if inner.since >= inner.batch {
                self.inner_step()?;
            }
        }
        self.report(true);
        Ok(Tick::Computed(loss))
    }

    /// Local-update mode: steps the inner optimizer on the gradient accumulated since the
    /// last inner step (its mean), and gives the model the new parameters. A gradient that is
    /// not finite is dropped, as an every-step peer would skip the step.
    fn inner_step(&mut self) -> Result<(), Error<T::Error>> {
        let Some(inner) = &mut self.inner else {
            return Ok(());
        };
        if inner.since == 0 {
            return Ok(());
        }
        let scale = 1.0 / inner.since as f64;
        match inner
            .optimizer
            .step_scaled(&mut inner.params, &mut self.grad, scale)
        {
            Ok(_) => {
                inner.round_steps += 1;
                inner.steps += 1;
            }
            Err(optim::Error::NonFinite { norm }) => tracing::warn!(
                "epoch {}: a gradient of norm {norm} is not finite: inner step skipped",
                self.epoch
            ),
            Err(e) => return Err(e.into()),
        }
        inner.since = 0;
        self.grad.fill(0.0);
        self.model.write_params(&inner.params).map_err(Error::Model)
    }

    /// Inner steps this peer took in its last round, and in all (local-update mode).
    pub fn inner_steps(&self) -> Option<(u64, u64)> {
        self.inner.as_ref().map(|i| (i.last_round, i.steps))
    }

    /// Local-update mode: the change of this peer's parameters over the round (the round's
    /// start less where its inner steps took them) into `delta`, the inner steps' last one
    /// taken first; with delayed updates it keeps where the change was taken from.
    fn round_change(&mut self, delta: &mut [f32]) -> Result<(), Error<T::Error>> {
        self.inner_step()?;
        let Some(inner) = &mut self.inner else {
            return Ok(());
        };
        for ((d, start), now) in delta.iter_mut().zip(&self.state.params).zip(&inner.params) {
            *d = start - now;
        }
        inner.last_round = std::mem::take(&mut inner.round_steps);
        if self.settings.delayed {
            inner.taken_from = Some(inner.params.clone());
        }
        Ok(())
    }

    /// Local-update mode: a new state is in (an outer step, or a download): the inner steps
    /// go on from its parameters, with those taken since the round's change was sent on top
    /// (delayed updates, `keep_drift`). Gives the model the parameters it trains.
    fn restart_round(&mut self, keep_drift: bool) -> Result<(), Error<T::Error>> {
        let Some(inner) = &mut self.inner else {
            return self
                .model
                .write_params(&self.state.params)
                .map_err(Error::Model);
        };
        let batch = self.state.epoch().saturating_mul(inner.per_round);
        inner
            .optimizer
            .set_schedule(optim::Schedule::constant(inner.schedule.lr(batch)));
        match inner.taken_from.take().filter(|_| keep_drift) {
            Some(from) => {
                for ((p, new), old) in inner.params.iter_mut().zip(&self.state.params).zip(&from) {
                    *p = new + (*p - old);
                }
            }
            None => {
                inner.params.copy_from_slice(&self.state.params);
                inner.since = 0;
                inner.round_steps = 0;
            }
        }
        self.model.write_params(&inner.params).map_err(Error::Model)
    }

    /// How many samples this peer computes next: a whole micro-batch while the swarm lacks
    /// more than a micro-batch per computing peer; near the target, an equal share of what it
    /// lacks. Every peer starting a whole micro-batch there overshot the target by up to a
    /// micro-batch each (three `small` peers with micro-batches of 16 made epochs of 80–96 for
    /// a target of 64, and starting with a probability still 74 on average); equal shares end
    /// the epoch together, within a few samples of the target, and sooner.
    fn share(&self, view: &View, committed: u64) -> u64 {
        let micro = self.micro_samples;
        let lacking = self.settings.target_batch.saturating_sub(committed).max(1);
        let others = if view.others_state.epoch == self.epoch {
            view.others_state.computing
        } else {
            0
        };
        let peers = others as u64 + 1;
        if micro == 0 || lacking >= micro * peers {
            u64::MAX
        } else {
            lacking.div_ceil(peers)
        }
    }

    /// Tells the swarm this peer stopped computing for the epoch (its rate no longer counts).
    fn rate_paused(&mut self) {
        self.started_computing = None;
        self.local.send_replace(Local {
            epoch: self.epoch(),
            held: self.state.epoch(),
            samples: self.samples,
            rate: 0.0,
            micro: self.micro_samples,
            publish: true,
            optimizer: self.state.optimizer.config().digest(),
        });
    }
}
