//! The lease gate: a register answers for its slots only while its instance lease is certainly
//! alive, so that no new owner can be assigned while it still answers.
//!
//! Arithmetic (TTL = the instance lease TTL):
//! - A keep-alive sent at local time `t` and answered with a positive TTL means the keeper renewed
//!   the lease at some moment after `t`, so it cannot expire before `t + TTL`.
//! - The slot controller moves this register's slots only after the keeper deletes the instance key
//!   at expiry, so a new owner cannot serve before `t + TTL` either. This covers only slots the map
//!   assigned to the lease being kept alive: the map names each owner's lease, and slots assigned
//!   to an earlier lease of ours (before a restart or a lease loss) are held, not answered
//!   (`SlotMap::assigned_to`, `SlotState::Held`).
//! - The gate stays open until `t + TTL/2`. The remaining TTL/2 absorbs clock-rate differences,
//!   scheduling delays and the time between the gate check and the answer leaving.
//! - Keep-alives go out every TTL/6, so two can be lost in a row without the gate closing.
//! - `Instant` is CLOCK_MONOTONIC, which keeps running while a process is stopped (SIGSTOP): a
//!   register resumed after its lease expired finds the gate closed on its first request, before
//!   any task of its own has had a chance to run.
//!
//! Writes check the gate after writing and answer `unavailable` if it closed meanwhile, so an OK is
//! only ever sent for a write that happened while this register was certainly the owner.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

/// Open until a deadline that successful keep-alives push forward.
#[derive(Debug)]
pub struct LeaseGate {
    base: Instant,
    /// Nanoseconds after `base` until which we may serve; 0 = closed.
    until_nanos: AtomicU64,
    /// Tests of the service alone (no keeper) run with an always-open gate.
    always_open: bool,
}

impl LeaseGate {
    /// A closed gate, opened by [`LeaseGate::renewed`].
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            until_nanos: AtomicU64::new(0),
            always_open: false,
        }
    }

    /// A gate that never closes (no lease: for tests and single-process setups).
    pub fn always_open() -> Self {
        Self {
            always_open: true,
            ..Self::new()
        }
    }

    /// Records a keep-alive (or grant) sent at `sent` that the keeper answered with `ttl`.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl / 2;
        let nanos = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.until_nanos.fetch_max(nanos.max(1), Ordering::AcqRel);
    }

    /// Closes the gate now (lease lost or revoked).
    pub fn close(&self) {
        self.until_nanos.store(0, Ordering::Release);
    }

    pub fn is_open_at(&self, now: Instant) -> bool {
        if self.always_open {
            return true;
        }
        let until = self.until_nanos.load(Ordering::Acquire);
        until != 0 && now.saturating_duration_since(self.base).as_nanos() < u128::from(until)
    }

    pub fn is_open(&self) -> bool {
        self.is_open_at(Instant::now())
    }
}

impl Default for LeaseGate {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_opens_for_half_the_ttl_after_the_send_time() {
        let gate = LeaseGate::new();
        let t = Instant::now();
        assert!(!gate.is_open_at(t));
        let ttl = Duration::from_secs(10);
        gate.renewed(t, ttl);
        assert!(gate.is_open_at(t + Duration::from_millis(4_999)));
        assert!(!gate.is_open_at(t + Duration::from_millis(5_001)));
        // An older keep-alive answered late never shortens the window.
        gate.renewed(t - Duration::from_secs(3), ttl);
        assert!(gate.is_open_at(t + Duration::from_millis(4_999)));
        gate.renewed(t + Duration::from_secs(2), ttl);
        assert!(gate.is_open_at(t + Duration::from_millis(6_999)));
        gate.close();
        assert!(!gate.is_open_at(t));
        assert!(LeaseGate::always_open().is_open());
    }
}
