//! Maps users to the 1024 register slots, and the slot map that says which register owns each.

use serde::Deserialize;
use serde::Serialize;

/// Number of slots; fixed for the life of a cluster (changing it moves every session).
pub const SLOTS: u16 = 1024;

/// The slot of `(app, user)`: `xxh3_64(app + "\0" + user) % 1024`. The `\0` keeps `("ab", "c")`
/// and `("a", "bc")` apart. Every part of the system calls this one function.
pub fn slot_of(app: &str, user: &str) -> u16 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(app.as_bytes());
    h.update(&[0]);
    h.update(user.as_bytes());
    (h.digest() % u64::from(SLOTS)) as u16
}

/// The slot map stored at `/register/slots`: which register instance owns each slot.
///
/// Written only by the elected slot controller. `epoch` grows with every change, and callers send
/// the epoch they routed by so a register can refuse requests routed by a map it no longer
/// matches (fencing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMap {
    /// Bumped on every change of any owner.
    pub epoch: u64,
    /// `slots[s]` is the instance id owning slot `s`, or `""` while the slot has no owner.
    pub slots: Vec<String>,
}

/// A slot map whose shape is wrong (not exactly [`SLOTS`] entries).
#[derive(Debug, thiserror::Error)]
#[error("slot map has {0} slots, expected {SLOTS}")]
pub struct BadSlotMap(pub usize);

impl SlotMap {
    /// A map at epoch 0 with no owners.
    pub fn empty() -> Self {
        SlotMap {
            epoch: 0,
            slots: vec![String::new(); usize::from(SLOTS)],
        }
    }

    /// Checks the shape after deserialising a map read from the keeper.
    pub fn check(&self) -> Result<(), BadSlotMap> {
        if self.slots.len() == usize::from(SLOTS) {
            Ok(())
        } else {
            Err(BadSlotMap(self.slots.len()))
        }
    }

    /// The owner of `slot`, if it has one.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        self.slots
            .get(usize::from(slot))
            .map(String::as_str)
            .filter(|o| !o.is_empty())
    }

    /// The owner of the slot of `(app, user)`.
    pub fn owner_of(&self, app: &str, user: &str) -> Option<&str> {
        self.owner(slot_of(app, user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_pinned() {
        // Pinned values (cross-checked with Python's xxhash.xxh3_64): a change here moves every
        // session in every deployed cluster.
        assert_eq!(slot_of("demo", "alice"), 243);
        assert_eq!(slot_of("demo", "bob"), 251);
        assert_eq!(slot_of("", ""), 219);
        assert_ne!(slot_of("ab", "c"), slot_of("a", "bc"));
    }

    #[test]
    fn slot_matches_the_documented_formula() {
        let direct = xxhash_rust::xxh3::xxh3_64(b"demo\0alice") % 1024;
        assert_eq!(u64::from(slot_of("demo", "alice")), direct);
    }

    #[test]
    fn users_spread_over_all_slots() {
        let mut counts = vec![0u32; usize::from(SLOTS)];
        for i in 0..100_000 {
            counts[usize::from(slot_of("demo", &format!("user-{i}")))] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // ~98 per slot on average; a broken hash piles users into few slots.
        assert!(*min > 50 && *max < 160, "min {min} max {max}");
    }

    #[test]
    fn slot_map_checks_its_shape() {
        let mut map = SlotMap::empty();
        assert!(map.check().is_ok());
        assert_eq!(map.owner(3), None);
        map.slots[3] = "r1".into();
        assert_eq!(map.owner(3), Some("r1"));
        map.slots.pop();
        assert!(map.check().unwrap_err().to_string().contains("1023 slots"));
        let json: SlotMap = serde_json::from_str(r#"{"epoch":4,"slots":["a","b"]}"#).unwrap();
        assert!(json.check().is_err());
    }
}
