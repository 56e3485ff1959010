//! What a collaborative peer's tick and epoch came to, as types: the epoch's report, and why a
//! peer stepped without its group.

use std::sync::Arc;
use std::time::Duration;

use potluck_allreduce::{butterfly, matchmaking};
use potluck_core::Loss;

use crate::sync;

/// What happened at an epoch boundary.
#[derive(Debug, Clone)]
pub struct EpochReport {
    /// The epoch just finished (the step number taken).
    pub epoch: u64,
    /// This peer's samples in it, and the swarm's (the weight behind the average).
    pub samples: u64,
    pub swarm_samples: f64,
    /// Members of the group (1: it stepped alone).
    pub group: usize,
    /// Why it stepped alone, if it did though others were around.
    pub alone_because: Option<Alone>,
    /// Epochs in a row, this one included, that it could not average though others were
    /// around (0: it averaged, or it is the only peer).
    pub alone_epochs: u64,
    /// It did not step on its own gradient: it has been alone for more than
    /// [`super::Settings::alone_limit`] epochs.
    pub held_back: bool,
    pub loss: Loss,
    pub lr: f64,
    pub grad_norm: f64,
    /// No step was taken: it was held back, too late for the group, or the averaged gradient
    /// was not finite.
    pub skipped: bool,
    /// The averaged gradient was not finite (the step was skipped by the whole group).
    pub non_finite: bool,
    /// The good state it went back to instead of stepping (the averaged gradient spiked).
    pub rolled_back: Option<u64>,
    /// Whether the parameters were averaged too.
    pub state_averaged: bool,
    /// Time from the end of computing to the new parameters.
    pub averaging: Duration,
    /// Bytes the epoch's averaging moved (the gradient's, and the state's when it was
    /// averaged); rounds that failed count nothing.
    pub traffic: Traffic,
}

/// Bytes a peer sent and received: for averaging, and for the state it downloaded and served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

impl Traffic {
    /// What an all-reduce round moved.
    pub fn of(report: &butterfly::Report) -> Traffic {
        Traffic {
            sent: report.bytes_sent,
            received: report.bytes_received,
        }
    }
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        self.sent += other.sent;
        self.received += other.received;
    }
}

/// What one [`Collab::tick`] did.
#[derive(Debug, Clone)]
pub enum Tick {
    /// A micro-batch was computed: its mean loss.
    Computed(Loss),
    /// The epoch ended: the step taken.
    Epoch(EpochReport),
    /// The swarm was ahead: its state was downloaded.
    Synced(sync::Report, u64),
    /// Waiting for the swarm (target reached elsewhere, averaging not due yet).
    Waited,
}

/// Why a peer had no group to average with at an epoch's end.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Alone {
    /// No round was started for the epoch: no other peer was around (nothing went wrong).
    #[error("no other peer in the swarm")]
    Solitary,
    /// It declared too late to be taken into the epoch's group: it sits the epoch out and
    /// downloads the new state.
    #[error("too late for the group: will download the state")]
    TooLate,
    /// The epoch ended before its group was formed.
    #[error("the group did not form")]
    NotFormed,
    /// Forming the group failed.
    #[error(transparent)]
    Matchmaking(Arc<matchmaking::Error>),
    /// The task forming the group panicked or was cancelled.
    #[error("the group task stopped: {0}")]
    GroupTask(Arc<tokio::task::JoinError>),
    /// The group formed without this peer in it.
    #[error("not in its own group")]
    NotAMember,
    /// The all-reduce of the gradient failed.
    #[error(transparent)]
    AllReduce(Arc<butterfly::Error>),
    /// No other member of its group averaged with it: they formed another group without it
    /// (its view of the round was not theirs) or all vanished. It does not step on its own
    /// gradient (a step of its own would set it apart from the swarm), and downloads the state
    /// the others reach.
    #[error("no other member of its group averaged with it: will download the state")]
    Unheard,
}

impl Alone {
    /// Whether it is worth a warning: anything but being the only peer.
    pub fn is_fault(&self) -> bool {
        !matches!(self, Alone::Solitary)
    }
}
