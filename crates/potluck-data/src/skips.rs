//! Counting what a loader skipped, so a run reports bad input instead of dying of it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an item was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The image bytes could not be decoded.
    CorruptImage,
    /// An image without a caption (or a caption without an image).
    MissingCaption,
    /// A tar archive ended in the middle of an entry, or its headers were broken.
    TruncatedArchive,
    /// A file or archive entry could not be read.
    Unreadable,
    /// An entry larger than the limit for its kind.
    TooLarge,
}

const REASONS: [SkipReason; 5] = [
    SkipReason::CorruptImage,
    SkipReason::MissingCaption,
    SkipReason::TruncatedArchive,
    SkipReason::Unreadable,
    SkipReason::TooLarge,
];

impl SkipReason {
    fn label(self) -> &'static str {
        match self {
            SkipReason::CorruptImage => "corrupt images",
            SkipReason::MissingCaption => "missing captions",
            SkipReason::TruncatedArchive => "truncated archives",
            SkipReason::Unreadable => "unreadable files",
            SkipReason::TooLarge => "oversize entries",
        }
    }
}

/// Counters of skipped items, shared by a loader and whoever reports on it. Cloning shares the
/// counters.
#[derive(Debug, Clone, Default)]
pub struct Skips {
    counts: Arc<[AtomicU64; 5]>,
}

impl Skips {
    /// Counts one skipped item and logs why, naming where it was.
    pub fn skip(&self, reason: SkipReason, what: impl fmt::Display, detail: impl fmt::Display) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::warn!("skipped {what}: {detail} ({})", reason.label());
    }

    /// How many items were skipped for `reason`.
    pub fn count(&self, reason: SkipReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    /// How many items were skipped in all.
    pub fn total(&self) -> u64 {
        REASONS.iter().map(|&r| self.count(r)).sum()
    }
}

impl fmt::Display for Skips {
    /// `none`, or e.g. `2 corrupt images, 1 truncated archives`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = REASONS
            .iter()
            .filter(|&&r| self.count(r) > 0)
            .map(|&r| format!("{} {}", self.count(r), r.label()))
            .collect();
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}
