//! Catching up with the swarm: downloading the state most of the other peers hold, from the
//! donors that claim it, and not asking again a donor that offered anything else.

use std::sync::Arc;

use potluck_core::{Loss, Trainable};

use super::{Collab, Error, Guard, View};
use crate::sync::{self, Partial, Snapshot};

/// Most claims remembered as not served (a bound on memory; forgotten all at once beyond it).
const MAX_UNSERVED: usize = 1024;

impl<T: Trainable> Collab<T> {
    /// Downloads the newest state from the peers that report it and installs it: the state a
    /// majority of the other peers holds, from the donors that claim it, of that epoch and (once
    /// this peer holds the run's state) with the run's optimizer settings. A donor that offers
    /// anything else is not asked again until its claim changes.
    ///
    /// With `adopt`, the digest of the run's optimizer settings where this peer's are not
    /// theirs ([`Collab::odd_optimizer`]): the state of the peers that report those settings,
    /// whatever its settings (the donors' manifests must agree on them, and match the digest).
    pub(super) async fn sync(
        &mut self,
        adopt: Option<u64>,
    ) -> Result<sync::Report, Error<T::Error>> {
        // Chunks of its own state the donors' holds alike are not downloaded (a run's peers
        // start from the same parameters).
        let own = Snapshot::of(Arc::clone(&self.state), self.settings.chunk_bytes);
        let mut partial = Partial::with_own(own);
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                // Fresh reports: the donors that failed may be gone from them.
                let mut view = self.view.clone();
                view.borrow_and_update();
                let _ = tokio::time::timeout(2 * self.settings.report_every, view.changed()).await;
            }
            let (newest, donors, settle_ties) = {
                let view = self.view.borrow();
                let Some(v) = view.as_ref() else { break };
                if let (0, Some(run)) = (attempt, adopt) {
                    self.warn_of_odd_optimizer(v, run);
                }
                let newest = v.newest_of(&self.unserved, adopt);
                // A tie of the donors' states waits for the peers still stepping to that
                // epoch, who will decide it; with none, it is settled.
                let settle = v.others.iter().all(|(_, held, _)| *held >= newest);
                (newest, v.donors(newest, &self.unserved, adopt), settle)
            };
            let config = match adopt {
                Some(digest) => sync::ConfigWanted::Digest(digest),
                None if self.settled => sync::ConfigWanted::Exactly(*self.state.optimizer.config()),
                None => sync::ConfigWanted::Any,
            };
            let want = sync::Want {
                shape: sync::Shape::of(&self.state.optimizer),
                epoch: Some(newest),
                config,
                settle_ties,
            };
            match sync::download(
                self.net.dht.host(),
                &donors,
                &want,
                &mut partial,
                &self.settings.sync,
            )
            .await
            {
                Ok((snapshot, report)) => {
                    self.traffic.received += report.bytes;
                    let claimed = |p: &libp2p::PeerId| (*p, newest, "served another state");
                    self.distrust(report.unlike.iter().map(claimed));
                    let outvoted = "served a state unlike most donors'";
                    self.distrust(report.outvoted.iter().map(|p| (*p, newest, outvoted)));
                    let before = *self.state.optimizer.config();
                    self.state = Arc::new(snapshot.into_state(&self.state.optimizer)?);
                    let now = self.state.optimizer.config();
                    if *now != before {
                        tracing::warn!(
                            "now trains with the run's optimizer settings ({now:?}) in place of \
                             its own ({before:?})"
                        );
                    }
                    self.guard
                        .get_or_insert_with(|| Guard::new(self.settings.spike))
                        .restart(&self.state);
                    self.epoch = self.state.epoch();
                    self.grad.fill(0.0);
                    self.restart_round(false)?;
                    if let Some(r) = &mut self.residual {
                        r.fill(0.0);
                    }
                    self.samples = 0;
                    self.loss = Loss::default();
                    self.missed = None;
                    // Back in line with the swarm.
                    self.alone_epochs = 0;
                    tracing::info!(
                        "downloaded the swarm's state at epoch {} ({} MB in {:.1} s from {} \
                         donors; {} of {} chunks held alike here)",
                        self.state.epoch(),
                        report.bytes / 1_000_000,
                        report.elapsed.as_secs_f64(),
                        report.per_donor.iter().filter(|&&n| n > 0).count(),
                        report.own.0,
                        report.own.1
                    );
                    self.shelve();
                    self.report(true);
                    return Ok(report);
                }
                Err(sync::Error::Mismatch(why)) => return Err(sync::Error::Mismatch(why).into()),
                Err(sync::Error::Unlike { donors, others }) => {
                    self.distrust(
                        donors
                            .iter()
                            .map(|(p, _)| (*p, newest, "served another state")),
                    );
                    let e = sync::Error::Unlike { donors, others };
                    tracing::warn!("state download failed: {e}");
                    last = Some(e);
                }
                Err(e) => {
                    tracing::warn!("state download failed, retrying: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(sync::Error::NoDonors).into())
    }

    /// The digest of the run's optimizer settings ([`View::run_optimizer`]) if this peer
    /// holds the run's state but trains with other settings; None under a charter (its
    /// settings are the run's whatever peers report) and while it joins (the state it
    /// downloads brings the run's).
    pub(super) fn odd_optimizer(&self, view: &View) -> Option<u64> {
        if !self.settled || self.settings.chartered {
            return None;
        }
        let mine = self.state.optimizer.config().digest();
        let run = view.run_optimizer(mine);
        (run != mine).then_some(run)
    }

    /// Warns that this peer trains with other optimizer settings than the run's (of digest
    /// `run`), as `view` shows them.
    fn warn_of_odd_optimizer(&self, view: &View, run: u64) {
        let mine = self.state.optimizer.config().digest();
        let peers = view.optimizers.values().filter(|&&d| d == run).count();
        let same = view.optimizers.values().filter(|&&d| d == mine).count() + 1;
        tracing::warn!(
            "this peer trains with other optimizer settings ({mine:016x}: {:?}) than the run's \
             ({run:016x}, reported by {peers} peers against {same} with this peer's): it takes \
             the run's, with their state (every peer of a run must pass the same --lr, \
             --warmup, --epochs…)",
            self.state.optimizer.config()
        );
    }

    /// Remembers `claims` (a peer, the epoch it said it holds, and what it served instead) as
    /// not served, and names each peer in this peer's report of misbehaving peers.
    fn distrust(&mut self, claims: impl Iterator<Item = (libp2p::PeerId, u64, &'static str)>) {
        for (peer, epoch, served) in claims {
            let why = format!("claimed the state of epoch {epoch} and {served}");
            tracing::warn!("peer {peer} {why}: its claim is ignored, and reported");
            self.net.suspects.name(peer, why);
            if self.unserved.len() >= MAX_UNSERVED {
                self.unserved.clear();
            }
            self.unserved.insert(peer, epoch);
        }
    }
}
