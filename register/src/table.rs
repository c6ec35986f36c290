//! This register's local view of the slot map and the state of each slot it owns (ready or
//! rebuilding), and the one decision every request goes through: may I answer for this slot at
//! this epoch?
//!
//! Pure logic (time is passed in), so it is unit-tested without a keeper.

use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use longlink_common::SLOTS;
use longlink_common::SlotMap;

use crate::store::Meta;

/// State of one slot on this register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    NotOwned,
    /// Assigned to this register's id, but on an earlier lease of it (the register restarted or
    /// lost its lease): the data is kept, nothing is answered until a map names the current lease.
    /// `ready` when the data was ready when it was restored (a restart at the same epoch).
    Held {
        ready: bool,
    },
    /// Owned, but not every live room has re-sent its sessions yet: a lookup miss is not an answer.
    Rebuilding {
        since: Instant,
        /// Rooms that synced this slot (or proved by digest that nothing is missing).
        synced: BTreeSet<String>,
    },
    Ready,
}

/// What to do with a request for one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Serve {
        rebuilding: bool,
    },
    WrongOwner {
        owner: String,
        epoch: u64,
    },
    /// The caller routed by a newer map than ours: retry once we caught up.
    Behind {
        epoch: u64,
    },
    /// We own the slot, but only since epoch `since`, after the caller's map: the request was
    /// meant for an earlier owner (or an earlier time of ours) and may carry stale state, e.g. a
    /// digest or Sync delayed in the network across a partition.
    Reassigned {
        owner: String,
        since: u64,
        epoch: u64,
    },
    /// The map assigns the slot to our id but on an earlier lease of ours: retry once the
    /// controller names the current one.
    Pending {
        epoch: u64,
    },
}

/// Slots that need their data dropped after a change of the map.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Slots now owned that must start empty (their old data, if any, is stale).
    pub gained: Vec<u16>,
    /// Slots no longer owned.
    pub lost: Vec<u16>,
}

#[derive(Debug)]
pub struct SlotTable {
    me: String,
    /// The instance lease we are on (`None`: no lease, ownership by id alone).
    lease: Option<i64>,
    map: SlotMap,
    states: Vec<SlotState>,
    /// Live rooms from discovery; `None` until discovery answered (then only the timeout readies a
    /// rebuilding slot).
    live_rooms: Option<BTreeSet<String>>,
    rebuild_timeout: Duration,
}

impl SlotTable {
    pub fn new(me: &str, rebuild_timeout: Duration) -> Self {
        Self {
            me: me.to_string(),
            lease: None,
            map: SlotMap::empty(),
            states: vec![SlotState::NotOwned; usize::from(SLOTS)],
            live_rooms: None,
            rebuild_timeout,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.map.epoch
    }

    pub fn map(&self) -> &SlotMap {
        &self.map
    }

    pub fn state(&self, slot: u16) -> &SlotState {
        &self.states[usize::from(slot)]
    }

    pub fn set_rebuild_timeout(&mut self, timeout: Duration) {
        self.rebuild_timeout = timeout;
    }

    /// The fencing decision for a read. A register serves a slot only if, in its current map, it
    /// owns the slot and the caller's epoch is not newer than that map. A caller with an older
    /// epoch that reached the right owner is served (a read answers from the current state);
    /// one that reached the wrong register learns the owner and our epoch.
    pub fn verdict(&self, epoch: u64, slot: u16) -> Verdict {
        if epoch > self.map.epoch {
            return Verdict::Behind {
                epoch: self.map.epoch,
            };
        }
        match &self.states[usize::from(slot)] {
            SlotState::NotOwned => Verdict::WrongOwner {
                owner: self.map.owner(slot).unwrap_or("").to_string(),
                epoch: self.map.epoch,
            },
            SlotState::Held { .. } => Verdict::Pending {
                epoch: self.map.epoch,
            },
            SlotState::Rebuilding { .. } => Verdict::Serve { rebuilding: true },
            SlotState::Ready => Verdict::Serve { rebuilding: false },
        }
    }

    /// The fencing decision for a request that changes or vouches for the slot's data (Attach,
    /// Detach, Sync, Digest): like [`SlotTable::verdict`], and also refused when the caller's map
    /// predates our current ownership of the slot, since the request then carries state from
    /// before it (say, a digest held up in the network across a partition).
    pub fn write_verdict(&self, epoch: u64, slot: u16) -> Verdict {
        let since = self.map.since(slot);
        let owned = self.serves(slot);
        if owned && epoch < since && epoch <= self.map.epoch {
            return Verdict::Reassigned {
                owner: self.me.clone(),
                since,
                epoch: self.map.epoch,
            };
        }
        self.verdict(epoch, slot)
    }

    /// Whether we answer for `slot` (owned on our current lease).
    fn serves(&self, slot: u16) -> bool {
        matches!(
            self.states[usize::from(slot)],
            SlotState::Rebuilding { .. } | SlotState::Ready
        )
    }

    /// Applies a newer map. Slots kept keep their state; gained slots (also those that left and
    /// came back while we missed maps) start rebuilding; slots assigned to an earlier lease of ours
    /// are held. A map with an epoch not newer than ours is ignored (returns no change).
    pub fn apply(&mut self, map: SlotMap, now: Instant) -> Change {
        if map.epoch <= self.map.epoch || map.check().is_err() {
            return Change::default();
        }
        let previous = std::mem::replace(&mut self.map, map);
        // Same assignment as in the map we had: no other owner in between, so the data we hold
        // for the slot is still valid.
        self.settle(now, |slot, map| {
            map.assignment(slot) == previous.assignment(slot)
        })
    }

    /// We are on instance lease `lease` from now on (granted at start-up or after a lease loss).
    /// Slots assigned to another lease of ours are held, and not ready: requests were refused
    /// while the lease was gone.
    pub fn set_lease(&mut self, lease: i64, now: Instant) -> Change {
        if self.lease == Some(lease) {
            return Change::default();
        }
        self.lease = Some(lease);
        self.settle(now, |_, _| true)
    }

    /// Moves every slot to the state `self.map` and `self.lease` call for; `kept(slot, map)` says
    /// whether the data held for the slot is still valid.
    fn settle(&mut self, now: Instant, kept: impl Fn(u16, &SlotMap) -> bool) -> Change {
        let mut change = Change::default();
        for slot in 0..SLOTS {
            let i = usize::from(slot);
            let named = self.map.owner(slot) == Some(self.me.as_str());
            let ours = self.map.assigned_to(slot, &self.me, self.lease);
            let had = self.states[i] != SlotState::NotOwned;
            let valid = had && kept(slot, &self.map);
            let state = &mut self.states[i];
            match (ours, named) {
                (true, _) if valid => {
                    if let SlotState::Held { ready } = *state {
                        *state = if ready {
                            SlotState::Ready
                        } else {
                            rebuilding(now)
                        };
                    }
                }
                (true, _) => {
                    *state = rebuilding(now);
                    change.gained.push(slot);
                }
                (false, true) => {
                    let ready = valid && *state == (SlotState::Held { ready: true });
                    *state = SlotState::Held { ready };
                    if had && !valid {
                        change.lost.push(slot);
                    }
                }
                (false, false) => {
                    *state = SlotState::NotOwned;
                    if had {
                        change.lost.push(slot);
                    }
                }
            }
        }
        self.ready_finished(now);
        change
    }

    /// Start-up: the map read from the keeper and what the store says its data is valid for.
    /// At the same epoch, slots that were ready are served at once (or held ready, when the map
    /// names an earlier lease of ours) and the rest rebuild on top of what is stored; at any other
    /// epoch every stored slot is stale. Returns slots to drop.
    pub fn restore(&mut self, map: SlotMap, meta: Option<&Meta>, now: Instant) -> Vec<u16> {
        let same = meta.is_some_and(|m| m.epoch == map.epoch) && map.check().is_ok();
        let mut drop = Vec::new();
        for slot in 0..SLOTS {
            let i = usize::from(slot);
            let named = map.owner(slot) == Some(self.me.as_str());
            let ready = same && meta.is_some_and(|m| m.ready.contains(&slot));
            self.states[i] = if !named {
                SlotState::NotOwned
            } else if !map.assigned_to(slot, &self.me, self.lease) {
                SlotState::Held { ready }
            } else if ready {
                SlotState::Ready
            } else {
                rebuilding(now)
            };
            if !named || !same {
                drop.push(slot);
            }
        }
        self.map = map;
        self.ready_finished(now);
        drop
    }

    /// After the lease gate closed and reopened, requests may have been missed: every owned slot
    /// rebuilds again (keeping its data; rooms' syncs and digests fill the gaps).
    pub fn rebuild_all(&mut self, now: Instant) {
        for state in &mut self.states {
            match state {
                SlotState::Ready => *state = rebuilding(now),
                SlotState::Held { ready } => *ready = false,
                SlotState::NotOwned | SlotState::Rebuilding { .. } => {}
            }
        }
        self.ready_finished(now);
    }

    /// Room `room` synced `slot`; returns whether the slot became ready.
    pub fn synced(&mut self, slot: u16, room: &str, now: Instant) -> bool {
        if let SlotState::Rebuilding { synced, .. } = &mut self.states[usize::from(slot)] {
            synced.insert(room.to_string());
        }
        self.ready_finished(now).contains(&slot)
    }

    /// Discovery changed; returns slots that became ready.
    pub fn set_live_rooms(&mut self, rooms: BTreeSet<String>, now: Instant) -> Vec<u16> {
        self.live_rooms = Some(rooms);
        self.ready_finished(now)
    }

    /// Timer tick; returns slots that became ready (timeouts).
    pub fn tick(&mut self, now: Instant) -> Vec<u16> {
        self.ready_finished(now)
    }

    fn ready_finished(&mut self, now: Instant) -> Vec<u16> {
        let mut done = Vec::new();
        for (i, state) in self.states.iter_mut().enumerate() {
            if let SlotState::Rebuilding { since, synced } = state {
                let all_synced = self
                    .live_rooms
                    .as_ref()
                    .is_some_and(|live| live.iter().all(|r| synced.contains(r)));
                if all_synced || now.saturating_duration_since(*since) >= self.rebuild_timeout {
                    *state = SlotState::Ready;
                    done.push(i as u16);
                }
            }
        }
        done
    }

    /// What the store's data is valid for, to persist.
    pub fn meta(&self) -> Meta {
        Meta {
            epoch: self.map.epoch,
            ready: (0..SLOTS)
                .filter(|s| self.states[usize::from(*s)] == SlotState::Ready)
                .collect(),
        }
    }

    pub fn owned(&self) -> impl Iterator<Item = u16> + '_ {
        (0..SLOTS).filter(|s| self.serves(*s))
    }

    /// Slots held for an earlier lease of ours (not answered).
    pub fn held(&self) -> usize {
        self.states
            .iter()
            .filter(|s| matches!(s, SlotState::Held { .. }))
            .count()
    }

    /// Owned slots and how many of them are rebuilding (held slots count as neither).
    pub fn counts(&self) -> (u32, u32) {
        let mut owned = 0;
        let mut rebuilding = 0;
        for s in &self.states {
            match s {
                SlotState::NotOwned | SlotState::Held { .. } => {}
                SlotState::Rebuilding { .. } => {
                    owned += 1;
                    rebuilding += 1;
                }
                SlotState::Ready => owned += 1,
            }
        }
        (owned, rebuilding)
    }
}

fn rebuilding(now: Instant) -> SlotState {
    SlotState::Rebuilding {
        since: now,
        synced: BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(epoch: u64, owner_of: impl Fn(u16) -> &'static str) -> SlotMap {
        SlotMap {
            epoch,
            slots: (0..SLOTS).map(|s| owner_of(s).to_string()).collect(),
            since: Vec::new(),
            leases: Default::default(),
        }
    }

    #[test]
    fn a_slot_that_left_and_came_back_while_maps_were_missed_starts_over() {
        // Found by jepsen-tests (R2): a register cut off from the keeper missed the maps that
        // moved its slot away and back; it kept a session closed meanwhile.
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a"]), now);
        let first = SlotMap::fresh(1, owners(&|s| if s < 2 { "r1" } else { "r2" }));
        t.apply(first.clone(), now);
        t.synced(0, "a", now);
        t.synced(1, "a", now);
        assert_eq!(t.counts(), (2, 0));
        // Epoch 2 (missed) gives slot 0 to r2, epoch 3 gives it back; slot 1 never moved.
        let second = first.next(owners(&|s| if s == 1 { "r1" } else { "r2" }));
        let third = second.next(first.slots.clone());
        let c = t.apply(third, now);
        assert_eq!(c.gained, vec![0]);
        assert!(c.lost.is_empty());
        assert_eq!(t.verdict(3, 0), Verdict::Serve { rebuilding: true });
        assert_eq!(t.verdict(3, 1), Verdict::Serve { rebuilding: false });
    }

    #[test]
    fn requests_routed_before_a_slot_was_assigned_to_us_are_refused() {
        // Found by jepsen-tests (R1): digests a room sent at epoch 1, held up by a partition,
        // reached the register after it got the slot back at epoch 3 and matched its empty
        // store, so the slot counted as rebuilt and answered "offline".
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a"]), now);
        let first = SlotMap::fresh(1, owners(&|s| if s < 2 { "r1" } else { "r2" }));
        let second = first.next(owners(&|s| if s == 1 { "r1" } else { "r2" }));
        let third = second.next(first.slots.clone());
        t.apply(third, now);
        let stale = Verdict::Reassigned {
            owner: "r1".into(),
            since: 3,
            epoch: 3,
        };
        assert_eq!(t.write_verdict(1, 0), stale);
        assert_eq!(t.write_verdict(2, 0), stale);
        assert_eq!(t.write_verdict(3, 0), Verdict::Serve { rebuilding: true });
        // Slot 1 has been ours since epoch 1: a caller with an older map routed it right.
        assert!(matches!(t.write_verdict(1, 1), Verdict::Serve { .. }));
        // Reads answer from the current state, whatever map routed them.
        assert_eq!(t.verdict(1, 0), Verdict::Serve { rebuilding: true });
    }

    fn rooms(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fencing_by_epoch_and_owner() {
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        // Before any map: nothing is served.
        assert_eq!(
            t.verdict(0, 3),
            Verdict::WrongOwner {
                owner: String::new(),
                epoch: 0
            }
        );
        t.set_live_rooms(rooms(&[]), now);
        let c = t.apply(map(2, |s| if s < 512 { "r1" } else { "r2" }), now);
        assert_eq!(c.gained.len(), 512);
        // With no live rooms a gained slot has nothing to wait for.
        assert_eq!(t.verdict(2, 3), Verdict::Serve { rebuilding: false });
        assert_eq!(t.verdict(1, 3), Verdict::Serve { rebuilding: false });
        assert_eq!(t.verdict(3, 3), Verdict::Behind { epoch: 2 });
        assert_eq!(
            t.verdict(2, 600),
            Verdict::WrongOwner {
                owner: "r2".into(),
                epoch: 2
            }
        );
        // An older map is ignored.
        assert_eq!(t.apply(map(1, |_| "r2"), now), Change::default());
        assert_eq!(t.epoch(), 2);
        let c = t.apply(map(3, |s| if s < 500 { "r1" } else { "r2" }), now);
        assert_eq!(c.lost, (500..512).collect::<Vec<u16>>());
        assert!(c.gained.is_empty());
        assert!(matches!(t.verdict(3, 505), Verdict::WrongOwner { .. }));
    }

    #[test]
    fn moved_slot_rebuilds_until_every_live_room_synced() {
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a", "b"]), now);
        t.apply(map(1, |s| if s == 7 { "r1" } else { "r2" }), now);
        assert_eq!(t.verdict(1, 7), Verdict::Serve { rebuilding: true });
        assert!(!t.synced(7, "a", now));
        assert_eq!(t.verdict(1, 7), Verdict::Serve { rebuilding: true });
        assert!(t.synced(7, "b", now));
        assert_eq!(t.verdict(1, 7), Verdict::Serve { rebuilding: false });
        assert_eq!(t.meta().ready, vec![7]);
    }

    #[test]
    fn room_that_left_is_not_waited_for_and_timeout_bounds_rebuild() {
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a", "b"]), now);
        t.apply(map(1, |s| if s < 2 { "r1" } else { "r2" }), now);
        t.synced(0, "a", now);
        assert_eq!(t.set_live_rooms(rooms(&["a"]), now), vec![0]);
        assert_eq!(t.verdict(1, 1), Verdict::Serve { rebuilding: true });
        assert!(t.tick(now + Duration::from_millis(4_999)).is_empty());
        assert_eq!(t.tick(now + Duration::from_secs(5)), vec![1]);
        assert_eq!(t.counts(), (2, 0));
    }

    #[test]
    fn restore_serves_ready_slots_at_the_same_epoch_only() {
        let now = Instant::now();
        let m = map(4, |s| if s < 3 { "r1" } else { "r2" });
        let meta = Meta {
            epoch: 4,
            ready: vec![0, 1],
        };
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a"]), now);
        let dropped = t.restore(m.clone(), Some(&meta), now);
        assert_eq!(t.verdict(4, 0), Verdict::Serve { rebuilding: false });
        assert_eq!(t.verdict(4, 2), Verdict::Serve { rebuilding: true });
        assert!(!dropped.contains(&0) && !dropped.contains(&2) && dropped.contains(&3));

        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a"]), now);
        let stale = Meta { epoch: 3, ..meta };
        let dropped = t.restore(m, Some(&stale), now);
        assert_eq!(dropped.len(), usize::from(SLOTS));
        assert_eq!(t.verdict(4, 0), Verdict::Serve { rebuilding: true });
    }

    fn leased(map: SlotMap, id: &str, lease: i64) -> SlotMap {
        let mut leases = map.leases.clone();
        leases.insert(id.to_string(), lease);
        map.leased(leases)
    }

    fn owners(o: &dyn Fn(u16) -> &'static str) -> Vec<String> {
        (0..SLOTS).map(|s| o(s).to_string()).collect()
    }

    #[test]
    fn a_restarted_register_holds_its_old_leases_slots_until_its_new_lease_is_named() {
        // Found by jepsen-tests (R3): r1 restarted after its lease expired, read a map that still
        // assigned slot 0 to it, and accepted a write just after the controller (acting on the
        // old lease's expiry) moved the slot to r2.
        let now = Instant::now();
        let first = leased(
            SlotMap::fresh(4, owners(&|s| if s < 3 { "r1" } else { "r2" })),
            "r1",
            10,
        );
        let meta = Meta {
            epoch: 4,
            ready: vec![1, 2],
        };
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&["a"]), now);
        assert_eq!(t.set_lease(11, now), Change::default());
        let dropped = t.restore(first.clone(), Some(&meta), now);
        assert!(!dropped.contains(&1) && dropped.contains(&3));
        for slot in 0..3 {
            assert_eq!(t.verdict(4, slot), Verdict::Pending { epoch: 4 });
            assert_eq!(t.write_verdict(4, slot), Verdict::Pending { epoch: 4 });
        }
        assert_eq!(t.counts(), (0, 0));
        assert_eq!(t.state(1), &SlotState::Held { ready: true });
        // The old lease expires: slot 0 moves to r2. Nothing was answered for it meanwhile.
        let second = first.next(owners(&|s| if s == 1 || s == 2 { "r1" } else { "r2" }));
        let c = t.apply(second.clone(), now);
        assert_eq!(c.lost, vec![0]);
        assert!(matches!(t.verdict(5, 0), Verdict::WrongOwner { .. }));
        // Our new lease is named: slots whose assignment held resume with their data (ready if it
        // was restored ready), none is dropped.
        let third = leased(second.next(second.slots.clone()), "r1", 11);
        let c = t.apply(third, now);
        assert_eq!(c, Change::default());
        assert_eq!(t.verdict(6, 1), Verdict::Serve { rebuilding: false });
        assert_eq!(t.verdict(6, 2), Verdict::Serve { rebuilding: false });
        assert_eq!(t.counts(), (2, 0));
    }

    #[test]
    fn a_new_lease_holds_owned_slots_and_a_moved_assignment_drops_their_data() {
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&[]), now);
        t.set_lease(10, now);
        let first = leased(
            SlotMap::fresh(1, owners(&|s| if s < 2 { "r1" } else { "r2" })),
            "r1",
            10,
        );
        t.apply(first.clone(), now);
        assert_eq!(t.counts(), (2, 0));
        // The lease is lost and a new one granted: requests were refused meanwhile, so the slots
        // are held and no longer ready.
        t.set_live_rooms(rooms(&["a"]), now);
        assert_eq!(t.set_lease(12, now), Change::default());
        assert_eq!(t.state(0), &SlotState::Held { ready: false });
        assert_eq!(t.verdict(1, 0), Verdict::Pending { epoch: 1 });
        assert_eq!(t.meta().ready, Vec::<u16>::new());
        // A map naming the new lease, where slot 1 moved away and back meanwhile (a new since):
        // slot 0 rebuilds on its data, slot 1 starts over.
        let away = first.next(owners(&|s| if s == 0 { "r1" } else { "r2" }));
        let back = leased(away.next(first.slots.clone()), "r1", 12);
        let c = t.apply(back, now);
        assert_eq!(c.gained, vec![1]);
        assert!(c.lost.is_empty());
        assert_eq!(t.verdict(3, 0), Verdict::Serve { rebuilding: true });
        assert_eq!(t.verdict(3, 1), Verdict::Serve { rebuilding: true });
        // Another process on our id takes the slots over on its lease: we hold, answering none.
        let other = leased(t.map().next(t.map().slots.clone()), "r1", 13);
        let c = t.apply(other, now);
        assert!(c.gained.is_empty() && c.lost.is_empty());
        assert_eq!(t.verdict(4, 0), Verdict::Pending { epoch: 4 });
        assert_eq!(t.counts(), (0, 0));
    }

    #[test]
    fn rebuild_all_after_lease_gap() {
        let now = Instant::now();
        let mut t = SlotTable::new("r1", Duration::from_secs(5));
        t.set_live_rooms(rooms(&[]), now);
        t.apply(map(1, |_| "r1"), now);
        t.set_live_rooms(rooms(&["a"]), now);
        t.rebuild_all(now);
        assert_eq!(t.verdict(1, 9), Verdict::Serve { rebuilding: true });
        assert_eq!(
            t.tick(now + Duration::from_secs(6)).len(),
            usize::from(SLOTS)
        );
    }
}
