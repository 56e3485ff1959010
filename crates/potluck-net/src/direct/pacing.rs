//! How fast a direct channel's writer may send.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How fast a direct channel's writer may send: Linux's per-socket pacing
/// (`SO_MAX_PACING_RATE`; elsewhere nothing happens). Set it from anywhere; the writer applies it
/// before its next write. A member's flows that share an uplink share it evenly when each is
/// paced at its share of the uplink's measured rate; left to TCP, the flows through one FIFO
/// bottleneck share it badly (docs/BENCHMARKS.md).
#[derive(Debug, Clone, Default)]
pub struct Pacing(pub(super) Arc<AtomicU64>);

impl Pacing {
    /// At most `bytes_per_second` (None: as fast as TCP goes).
    pub fn set(&self, bytes_per_second: Option<f64>) {
        let v = bytes_per_second.map_or(0, |r| r.clamp(1.0, u64::MAX as f64) as u64);
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Applies a pacing rate to a socket (0: none).
#[cfg(target_os = "linux")]
pub(super) fn pace_socket(fd: std::os::fd::RawFd, bytes_per_second: u64) -> io::Result<()> {
    // u32 is what every kernel takes; its maximum means no pacing.
    let rate: u32 = match bytes_per_second {
        0 => u32::MAX,
        r => u32::try_from(r).unwrap_or(u32::MAX),
    };
    // SAFETY: `fd` is an open socket (the writer holds its half of it); the option value is a
    // u32 of the given size that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&raw const rate).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn pace_socket(_: i32, _: u64) -> io::Result<()> {
    Ok(())
}
