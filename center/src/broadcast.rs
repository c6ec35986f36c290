//! Broadcast progress: what `GET /v1/apps/{app}/broadcasts/{id}` shows. Kept in memory by the
//! center instance that accepted the broadcast, for `broadcast_keep_s` after it finished, at most
//! `broadcast_history` entries (the oldest are forgotten first).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::BroadcastStatus;

/// Counters of one broadcast, updated by its per-room tasks.
#[derive(Debug)]
pub struct Progress {
    pub id: String,
    pub app: String,
    pub rooms_total: u64,
    pub rooms_done: AtomicU64,
    pub rooms_failed: AtomicU64,
    pub connections: AtomicU64,
    pub dropped: AtomicU64,
    /// Set when the last room finished; starts the keep timer.
    finished_at: Mutex<Option<Instant>>,
}

impl Progress {
    /// A room delivered to `connections` (`dropped` refused by full queues).
    pub fn room_done(&self, connections: u64, dropped: u64) {
        self.connections.fetch_add(connections, Ordering::Relaxed);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        self.rooms_done.fetch_add(1, Ordering::AcqRel);
        self.maybe_finish();
    }

    /// A room failed every attempt.
    pub fn room_failed(&self) {
        self.rooms_failed.fetch_add(1, Ordering::AcqRel);
        self.maybe_finish();
    }

    fn maybe_finish(&self) {
        let settled =
            self.rooms_done.load(Ordering::Acquire) + self.rooms_failed.load(Ordering::Acquire);
        if settled >= self.rooms_total {
            let mut at = self.finished_at.lock().unwrap_or_else(|p| p.into_inner());
            at.get_or_insert_with(Instant::now);
        }
    }

    fn finished_at(&self) -> Option<Instant> {
        *self.finished_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The public view.
    pub fn status(&self) -> BroadcastStatus {
        let rooms_done = self.rooms_done.load(Ordering::Acquire);
        let rooms_failed = self.rooms_failed.load(Ordering::Acquire);
        BroadcastStatus {
            id: self.id.clone(),
            app: self.app.clone(),
            state: if rooms_done + rooms_failed >= self.rooms_total {
                "done".into()
            } else {
                "running".into()
            },
            rooms_total: self.rooms_total,
            rooms_done,
            rooms_failed,
            connections: self.connections.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Broadcasts by id, and ids in insertion order (for eviction).
type Table = (HashMap<String, Arc<Progress>>, VecDeque<String>);

/// The broadcasts this instance knows about.
#[derive(Debug)]
pub struct Broadcasts {
    keep: Duration,
    cap: usize,
    /// By id, plus insertion order for eviction; under a std mutex, never across an await.
    inner: Mutex<Table>,
}

impl Broadcasts {
    pub fn new(keep: Duration, cap: usize) -> Broadcasts {
        Broadcasts {
            keep,
            cap: cap.max(1),
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Records a new broadcast to `rooms_total` rooms.
    pub fn start(&self, id: String, app: String, rooms_total: u64) -> Arc<Progress> {
        let progress = Arc::new(Progress {
            id: id.clone(),
            app,
            rooms_total,
            rooms_done: AtomicU64::new(0),
            rooms_failed: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            finished_at: Mutex::new((rooms_total == 0).then(Instant::now)),
        });
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (by_id, order) = &mut *guard;
        let now = Instant::now();
        // Forget expired ones, then the oldest while over the cap.
        order.retain(|old| {
            let expired = by_id
                .get(old)
                .and_then(|p| p.finished_at())
                .is_some_and(|t| now.saturating_duration_since(t) > self.keep);
            if expired {
                by_id.remove(old);
            }
            !expired
        });
        while order.len() >= self.cap {
            if let Some(old) = order.pop_front() {
                by_id.remove(&old);
            }
        }
        by_id.insert(id.clone(), progress.clone());
        order.push_back(id);
        progress
    }

    /// The broadcast `id` of `app`, if known and not expired.
    pub fn get(&self, app: &str, id: &str) -> Option<Arc<Progress>> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let p = guard.0.get(id)?;
        let expired = p
            .finished_at()
            .is_some_and(|t| Instant::now().saturating_duration_since(t) > self.keep);
        (p.app == app && !expired).then(|| p.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn progress_finishes_and_expires() {
        let b = Broadcasts::new(Duration::from_secs(10), 2);
        let p = b.start("b1".into(), "demo".into(), 2);
        assert_eq!(p.status().state, "running");
        p.room_done(5, 1);
        assert_eq!(b.get("demo", "b1").unwrap().status().state, "running");
        p.room_failed();
        let s = b.get("demo", "b1").unwrap().status();
        assert_eq!(
            (
                s.state.as_str(),
                s.rooms_done,
                s.rooms_failed,
                s.connections,
                s.dropped
            ),
            ("done", 1, 1, 5, 1)
        );
        assert!(b.get("other", "b1").is_none(), "another app's broadcast");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.get("demo", "b1").is_none(), "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn history_is_bounded() {
        let b = Broadcasts::new(Duration::from_secs(10), 2);
        b.start("b1".into(), "a".into(), 1);
        b.start("b2".into(), "a".into(), 1);
        b.start("b3".into(), "a".into(), 0);
        assert!(b.get("a", "b1").is_none());
        assert!(b.get("a", "b2").is_some());
        assert_eq!(b.get("a", "b3").unwrap().status().state, "done");
    }
}
