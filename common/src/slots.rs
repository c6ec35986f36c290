//! Maps users to the 1024 register slots, and the slot map that says which register owns each.

use std::collections::BTreeMap;

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
    /// `since[s]` is the epoch at which `slots[s]` got its current owner. With it, a register or
    /// room that missed maps in between can tell "kept the slot" from "lost it and got it back"
    /// (the data it holds for the slot is stale then). Empty in maps written before it existed:
    /// every slot then counts as owned since epoch 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub since: Vec<u64>,
    /// `leases[id]` is the instance lease register `id` was on when the controller last assigned
    /// to it: a register answers for its slots only while it is on that lease. A register that
    /// restarted (or lost its lease) is on a new lease, and the assignment made to its previous
    /// lease may be revoked as soon as that lease expires, so it waits for a map naming the new
    /// one. Empty (or lacking an owner) in maps written before it existed: ownership by id alone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub leases: BTreeMap<String, i64>,
}

/// A slot map whose shape is wrong (not exactly [`SLOTS`] entries).
#[derive(Debug, thiserror::Error)]
#[error("slot map has {0} slots (or since entries), expected {SLOTS}")]
pub struct BadSlotMap(pub usize);

impl SlotMap {
    /// A map at epoch 0 with no owners.
    pub fn empty() -> Self {
        SlotMap {
            epoch: 0,
            slots: vec![String::new(); usize::from(SLOTS)],
            since: Vec::new(),
            leases: BTreeMap::new(),
        }
    }

    /// A map of `slots` at `epoch` whose slots have all been owned since `epoch` (a first map,
    /// or a test's).
    pub fn fresh(epoch: u64, slots: Vec<String>) -> Self {
        SlotMap {
            epoch,
            since: vec![epoch; slots.len()],
            slots,
            leases: BTreeMap::new(),
        }
    }

    /// The map that follows this one with `slots` as owners: the epoch is bumped, `since` moves
    /// to the new epoch exactly for the slots whose owner changed, and the leases carry over.
    pub fn next(&self, slots: Vec<String>) -> Self {
        let epoch = self.epoch + 1;
        let since = slots
            .iter()
            .enumerate()
            .map(|(i, owner)| {
                let kept = self.slots.get(i) == Some(owner);
                if kept {
                    self.since.get(i).copied().unwrap_or(0)
                } else {
                    epoch
                }
            })
            .collect();
        SlotMap {
            epoch,
            slots,
            since,
            leases: self.leases.clone(),
        }
    }

    /// This map with `leases` as the owners' instance leases.
    pub fn leased(mut self, leases: BTreeMap<String, i64>) -> Self {
        self.leases = leases;
        self
    }

    /// Whether `slot` is assigned to register `id` on instance lease `lease`. A map that names no
    /// lease for the owner (written before leases existed) assigns by id alone, and so does a
    /// `lease` of `None` (a register running without one, as in tests).
    pub fn assigned_to(&self, slot: u16, id: &str, lease: Option<i64>) -> bool {
        self.owner(slot) == Some(id)
            && match (lease, self.leases.get(id)) {
                (Some(ours), Some(named)) => ours == *named,
                _ => true,
            }
    }

    /// The epoch since which `slot` has had its current owner (0 when the map predates `since`).
    pub fn since(&self, slot: u16) -> u64 {
        self.since.get(usize::from(slot)).copied().unwrap_or(0)
    }

    /// The assignment of `slot`: owner and the epoch it got the slot at. Two maps with the same
    /// assignment for a slot had no other owner in between.
    pub fn assignment(&self, slot: u16) -> (Option<&str>, u64) {
        (self.owner(slot), self.since(slot))
    }

    /// Checks the shape after deserialising a map read from the keeper.
    pub fn check(&self) -> Result<(), BadSlotMap> {
        if self.slots.len() != usize::from(SLOTS) {
            return Err(BadSlotMap(self.slots.len()));
        }
        if !self.since.is_empty() && self.since.len() != usize::from(SLOTS) {
            return Err(BadSlotMap(self.since.len()));
        }
        Ok(())
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

    #[test]
    fn next_moves_since_only_for_changed_owners() {
        let first = SlotMap::fresh(1, vec!["r1".to_string(); usize::from(SLOTS)]);
        let mut owners = first.slots.clone();
        owners[5] = "r2".into();
        let second = first.next(owners);
        assert_eq!(second.epoch, 2);
        assert_eq!(second.assignment(5), (Some("r2"), 2));
        assert_eq!(second.assignment(6), (Some("r1"), 1));
        // Slot 5 comes back to r1: same owner as in the first map, but a new assignment.
        let third = second.next(first.slots.clone());
        assert_eq!(third.assignment(5), (Some("r1"), 3));
        assert_ne!(third.assignment(5), first.assignment(5));
        assert_eq!(third.assignment(6), first.assignment(6));
        // A map written before `since` existed reads as "since 0" and round-trips without it.
        let old: SlotMap = serde_json::from_str(&format!(
            r#"{{"epoch":4,"slots":{}}}"#,
            serde_json::to_string(&first.slots).unwrap()
        ))
        .unwrap();
        assert!(old.check().is_ok());
        assert_eq!(old.assignment(0), (Some("r1"), 0));
        assert!(!serde_json::to_string(&old).unwrap().contains("since"));
        let mut bad = first.clone();
        bad.since.pop();
        assert!(bad.check().is_err());
    }

    #[test]
    fn an_assignment_names_the_owners_lease() {
        let first = SlotMap::fresh(1, vec!["r1".to_string(); usize::from(SLOTS)]);
        // No lease named: by id alone.
        assert!(first.assigned_to(0, "r1", Some(7)));
        assert!(!first.assigned_to(0, "r2", Some(7)));
        let leased = first
            .next(first.slots.clone())
            .leased(BTreeMap::from([("r1".into(), 7)]));
        assert!(leased.assigned_to(0, "r1", Some(7)));
        assert!(!leased.assigned_to(0, "r1", Some(8)));
        assert!(leased.assigned_to(0, "r1", None));
        // A lease change alone keeps the assignment's epoch, and the leases carry over.
        assert_eq!(leased.assignment(0), first.assignment(0));
        assert_eq!(leased.next(leased.slots.clone()).leases, leased.leases);
        let json = serde_json::to_string(&leased).unwrap();
        assert!(json.contains(r#""leases":{"r1":7}"#), "{json}");
        assert!(!serde_json::to_string(&first).unwrap().contains("leases"));
        assert_eq!(serde_json::from_str::<SlotMap>(&json).unwrap(), leased);
    }
}
