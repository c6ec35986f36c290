//! The per-(room, slot) digest that rooms and registers compare for anti-entropy.
//!
//! `digest = wrapping sum over the room's sessions in the slot of
//! xxh3_64(app 0x00 user 0x00 conn_id(be64))`, sent with the session count. A sum is independent of
//! order, so a room can compute it from a hash map and the register from a key scan; an add or a
//! remove changes it by exactly one term. Room and register both compute it here, so they agree
//! byte for byte; a client in another language must use the same formula.

use xxhash_rust::xxh3::Xxh3;

/// Hash of one session's identity within a room.
pub fn session_hash(app: &str, user: &str, conn_id: u64) -> u64 {
    let mut h = Xxh3::new();
    h.update(app.as_bytes());
    h.update(&[0]);
    h.update(user.as_bytes());
    h.update(&[0]);
    h.update(&conn_id.to_be_bytes());
    h.digest()
}

/// Accumulates a digest; the empty digest is `{digest: 0, count: 0}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    /// Wrapping sum of the sessions' [`session_hash`] terms.
    pub digest: u64,
    /// Number of sessions summed.
    pub count: u64,
}

impl Digest {
    /// Adds one session's term.
    pub fn add(&mut self, app: &str, user: &str, conn_id: u64) {
        self.digest = self.digest.wrapping_add(session_hash(app, user, conn_id));
        self.count += 1;
    }

    /// Removes one session's term (the inverse of [`Digest::add`]).
    pub fn remove(&mut self, app: &str, user: &str, conn_id: u64) {
        self.digest = self.digest.wrapping_sub(session_hash(app, user, conn_id));
        self.count = self.count.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_hash_is_pinned() {
        // The formula, spelled out: a change here makes every room's digests mismatch.
        let mut bytes = b"demo\0alice\0".to_vec();
        bytes.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            session_hash("demo", "alice", 7),
            xxhash_rust::xxh3::xxh3_64(&bytes)
        );
        assert_ne!(
            session_hash("demo", "alice", 7),
            session_hash("demo", "alice", 8)
        );
        assert_ne!(session_hash("ab", "c", 1), session_hash("a", "bc", 1));
    }

    #[test]
    fn digest_is_order_independent_and_removable() {
        let items: Vec<(String, u64)> = (0..100).map(|i| (format!("u{i}"), i)).collect();
        let mut forward = Digest::default();
        for (u, c) in &items {
            forward.add("demo", u, *c);
        }
        let mut backward = Digest::default();
        for (u, c) in items.iter().rev() {
            backward.add("demo", u, *c);
        }
        assert_eq!(forward, backward);
        assert_eq!(forward.count, 100);

        let mut missing_one = Digest::default();
        for (u, c) in &items[1..] {
            missing_one.add("demo", u, *c);
        }
        assert_ne!(missing_one, forward);
        forward.remove("demo", &items[0].0, items[0].1);
        assert_eq!(missing_one, forward);
        for (u, c) in &items[1..] {
            forward.remove("demo", u, *c);
        }
        assert_eq!(forward, Digest::default());
    }
}
