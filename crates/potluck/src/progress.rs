//! Progress bars: one look at the terminal tells how far a job is and how fast it goes. Where
//! stderr is not a terminal (CI, a log file) the bar is hidden and a log line is written every
//! tenth of the way instead.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps with a label and figures on the right.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: ProgressBar,
    len: u64,
    label: String,
    next_log: u64,
}

impl Progress {
    pub(crate) fn new(len: u64, label: &str) -> Progress {
        let bar = ProgressBar::new(len);
        let style = ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        Progress {
            bar,
            len,
            label: label.to_owned(),
            next_log: 0,
        }
    }

    /// Moves to `pos`; `figures` is asked for only when something will show it.
    pub(crate) fn update(&mut self, pos: u64, figures: impl FnOnce() -> String) {
        self.bar.set_position(pos);
        if self.bar.is_hidden() {
            if pos >= self.next_log {
                self.next_log = pos + (self.len / 10).max(1);
                let secs = self.bar.elapsed().as_secs_f64();
                tracing::info!(
                    "{} {pos}/{} ({secs:.0} s) {}",
                    self.label,
                    self.len,
                    figures()
                );
            }
        } else {
            self.bar.set_message(figures());
        }
    }

    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
    }
}
