//! The embedded store's volume: its size, for defaults that must fit it, and
//! its free space, watched so that the relay refuses new messages while the
//! journal could still be written and compacted, rather than running the
//! disk full. A write that fails for want of space fails the store until a
//! restart; a refused message is the client's to send again.

use crate::metrics::Metrics;
use crate::store::Store;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A file system's size and the space left to an unprivileged writer, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub available: u64,
}

/// The space of the file system holding `path`.
pub fn space(path: &Path) -> Option<Space> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is a buffer of the
    // type statvfs fills; it is read only when statvfs reports success.
    let filled = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } == 0;
    if !filled {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    let block = stat.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    let (blocks, available) = (stat.f_blocks as u64, stat.f_bavail as u64);
    let total = blocks.saturating_mul(block);
    (total > 0).then_some(Space {
        total,
        available: available.saturating_mul(block),
    })
}

/// Whether the store's volume has room for new messages: the reserve, and
/// as much again as the journal's live records, which a compaction copies.
pub fn has_room(space: Space, live_bytes: u64, reserve: u64) -> bool {
    space.available >= reserve.saturating_add(live_bytes)
}

/// Watches the free space of the data directory's file system.
pub struct DiskGuard {
    dir: PathBuf,
    reserve: u64,
    store: Arc<dyn Store>,
    metrics: Metrics,
    low: AtomicBool,
    /// The file system's size as last read; 0 until it could be.
    total: AtomicU64,
}

/// How often the free space is read.
const CHECK_EVERY: Duration = Duration::from_secs(1);

impl DiskGuard {
    pub fn new(dir: PathBuf, reserve: u64, store: Arc<dyn Store>, metrics: Metrics) -> Arc<Self> {
        let guard = Arc::new(Self {
            dir,
            reserve,
            store,
            metrics,
            low: AtomicBool::new(false),
            total: AtomicU64::new(0),
        });
        guard.check();
        guard
    }

    /// Whether new messages must be refused for want of disk space.
    pub fn low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// The size of the data directory's file system, if it could be read.
    pub fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// Reads the free space again; logs when the volume turns low or has room again.
    pub fn check(&self) {
        let Some(space) = space(&self.dir) else {
            return;
        };
        self.total.store(space.total, Ordering::Relaxed);
        self.metrics
            .store_disk_free_bytes
            .set(space.available as i64);
        let live = self.store.usage().map_or(0, |u| u.live_bytes);
        let low = !has_room(space, live, self.reserve);
        if self.low.swap(low, Ordering::Relaxed) == low {
            return;
        }
        if low {
            tracing::warn!(
                available_bytes = space.available,
                live_bytes = live,
                reserve_bytes = self.reserve,
                dir = %self.dir.display(),
                "the store's volume is nearly full: new messages are refused with 503 until there is room for the reserve (--disk-reserve-bytes) and a compaction; deliveries go on"
            );
        } else {
            tracing::info!(
                available_bytes = space.available,
                "the store's volume has room again: new messages are accepted"
            );
        }
    }

    /// Checks every second, until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let guard = self.clone();
            // statvfs may block on a slow volume: not on a runtime thread.
            let _ = tokio::task::spawn_blocking(move || guard.check()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_the_reserve_and_a_compaction() {
        let space = |available| Space {
            total: 1 << 30,
            available,
        };
        assert!(has_room(space(200), 100, 100));
        assert!(!has_room(space(199), 100, 100));
        assert!(has_room(space(0), 0, 0));
        assert!(!has_room(space(u64::MAX - 1), u64::MAX, 1), "no overflow");
    }

    #[test]
    fn the_space_of_a_real_directory_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = space(dir.path()).unwrap();
        assert!(s.total >= s.available && s.total > 1 << 20, "{s:?}");
        assert_eq!(space(&dir.path().join("missing")), None);
    }
}
