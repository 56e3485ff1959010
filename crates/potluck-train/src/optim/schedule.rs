//! The learning-rate schedule: linear warm-up, then linear decay to zero.

use serde::{Deserialize, Serialize};

/// Linear warm-up over `warmup` steps to `peak`, then linear decay to 0 at step `total`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// A constant rate.
    pub fn constant(lr: f64) -> Schedule {
        Schedule {
            peak: lr,
            warmup: 0,
            total: u64::MAX,
        }
    }

    /// The rate of step `step` (0-based: the first step is step 0).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        if self.total == u64::MAX {
            return self.peak;
        }
        let left = self.total.saturating_sub(step) as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        self.peak * (left / span).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = Schedule {
            peak: 1.0,
            warmup: 4,
            total: 14,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert_eq!(s.lr(9), 0.5);
        assert_eq!(s.lr(14), 0.0);
        assert_eq!(s.lr(100), 0.0);
        assert_eq!(Schedule::constant(0.1).lr(1_000_000), 0.1);
    }
}
