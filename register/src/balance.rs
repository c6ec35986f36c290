//! The slot controller's balancing rule, a pure function: given the current owners and the live
//! registers, which owners next?
//!
//! - Slots of registers that are not live (lease expired) and unowned slots all move at once, each
//!   to the live register with the fewest slots (ties: smallest id), so failover is one step.
//! - Then at most `max_moves` slots move from the most loaded to the least loaded register while
//!   they differ by more than one: a joining register gets slots back gradually, so rooms rebuild
//!   a few slots at a time instead of a third of the cluster at once.
//! - With no live register nothing changes (there is nobody to give slots to).

use std::collections::BTreeMap;

/// The next owners for `current` (one entry per slot) given the `live` register ids.
pub fn balance(current: &[String], live: &[String], max_moves: usize) -> Vec<String> {
    let mut next = current.to_vec();
    if live.is_empty() {
        return next;
    }
    let mut counts: BTreeMap<&str, usize> = live.iter().map(|id| (id.as_str(), 0)).collect();
    for owner in current {
        if let Some(c) = counts.get_mut(owner.as_str()) {
            *c += 1;
        }
    }
    for owner in next.iter_mut() {
        if counts.contains_key(owner.as_str()) {
            continue;
        }
        let (least, _) = counts
            .iter()
            .min_by_key(|(id, c)| (**c, **id))
            .expect("live is not empty");
        let least = least.to_string();
        *counts.get_mut(least.as_str()).expect("counted") += 1;
        *owner = least;
    }
    for _ in 0..max_moves {
        let (max_id, max_c) = counts
            .iter()
            .max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id)))
            .map(|(id, c)| (id.to_string(), *c))
            .expect("live is not empty");
        let (min_id, min_c) = counts
            .iter()
            .min_by_key(|(id, c)| (**c, **id))
            .map(|(id, c)| (id.to_string(), *c))
            .expect("live is not empty");
        if max_c <= min_c + 1 {
            break;
        }
        // Give away the donor's highest slot: deterministic, and keeps low slots stable.
        let slot = next
            .iter()
            .rposition(|o| *o == max_id)
            .expect("donor owns a slot");
        next[slot] = min_id.clone();
        *counts.get_mut(max_id.as_str()).expect("counted") -= 1;
        *counts.get_mut(min_id.as_str()).expect("counted") += 1;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use longlink_common::SLOTS;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn count(map: &[String], id: &str) -> usize {
        map.iter().filter(|o| *o == id).count()
    }

    fn empty() -> Vec<String> {
        vec![String::new(); usize::from(SLOTS)]
    }

    #[test]
    fn empty_map_is_spread_evenly_in_one_step() {
        let next = balance(&empty(), &ids(&["r1", "r2", "r3"]), 0);
        assert_eq!(count(&next, "r1"), 342);
        assert_eq!(count(&next, "r2"), 341);
        assert_eq!(count(&next, "r3"), 341);
    }

    #[test]
    fn dead_registers_slots_move_at_once_and_evenly() {
        let start = balance(&empty(), &ids(&["r1", "r2", "r3"]), 0);
        let next = balance(&start, &ids(&["r1", "r3"]), 0);
        assert_eq!(count(&next, "r2"), 0);
        assert_eq!(count(&next, "r1"), 512);
        assert_eq!(count(&next, "r3"), 512);
        // Slots of survivors did not move.
        for (s, owner) in start.iter().enumerate() {
            if owner != "r2" {
                assert_eq!(&next[s], owner, "slot {s} moved needlessly");
            }
        }
    }

    #[test]
    fn joining_register_gets_slots_back_gradually() {
        let mut map = balance(&empty(), &ids(&["r1", "r2"]), 0);
        let live = ids(&["r1", "r2", "r3"]);
        let mut steps = 0;
        loop {
            let next = balance(&map, &live, 64);
            let moved = next.iter().zip(&map).filter(|(a, b)| a != b).count();
            assert!(moved <= 64, "step moved {moved} slots");
            if next == map {
                break;
            }
            map = next;
            steps += 1;
        }
        assert_eq!(steps, 6); // 341 slots at 64 per step
        let counts = [count(&map, "r1"), count(&map, "r2"), count(&map, "r3")];
        assert!(counts.iter().all(|c| (341..=342).contains(c)), "{counts:?}");
    }

    #[test]
    fn balanced_map_and_no_live_registers_change_nothing() {
        let map = balance(&empty(), &ids(&["a", "b"]), 0);
        assert_eq!(balance(&map, &ids(&["a", "b"]), 64), map);
        assert_eq!(balance(&map, &[], 64), map);
    }
}
