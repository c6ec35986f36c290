//! The dispatcher: which rooms a device should connect to. Rendezvous (highest random weight)
//! hashing over the live rooms, so a user goes back to the same room while the set is unchanged,
//! and a room joining or leaving moves only the users whose first choice it is or becomes.

use crate::rooms::Room;

/// The weight of `room` for `(app, user)`: `xxh3_64(app \0 user \0 room_id)`. The `\0`
/// separators keep `("ab","c")` and `("a","bc")` apart, as in `slot_of`.
pub fn weight(app: &str, user: &str, room_id: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(app.as_bytes());
    h.update(&[0]);
    h.update(user.as_bytes());
    h.update(&[0]);
    h.update(room_id.as_bytes());
    h.digest()
}

/// Up to `n` rooms for `(app, user)`, best first. Only rooms a device can reach (a tcp or ws
/// address) are candidates. Ties (astronomically rare) break by room id, so the answer depends
/// only on the set of rooms, never on their order.
pub fn candidates<'a>(app: &str, user: &str, rooms: &'a [Room], n: usize) -> Vec<&'a Room> {
    let mut scored: Vec<(u64, &Room)> = rooms
        .iter()
        .filter(|r| r.tcp.is_some() || r.ws.is_some())
        .map(|r| (weight(app, user, &r.id), r))
        .collect();
    scored.sort_by(|(wa, ra), (wb, rb)| wb.cmp(wa).then_with(|| ra.id.cmp(&rb.id)));
    scored.into_iter().take(n).map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(i: usize) -> Room {
        Room {
            id: format!("room-{i}"),
            tcp: Some(format!("127.0.0.1:{}", 7100 + i)),
            ws: Some(format!("127.0.0.1:{}", 7200 + i)),
            grpc: Some(format!("127.0.0.1:{}", 7300 + i)),
        }
    }

    fn ids(rooms: Vec<&Room>) -> Vec<String> {
        rooms.into_iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn three_distinct_candidates_independent_of_listing_order() {
        let rooms: Vec<Room> = (0..8).map(room).collect();
        let mut reversed = rooms.clone();
        reversed.reverse();
        for u in 0..200 {
            let user = format!("u{u}");
            let a = ids(candidates("demo", &user, &rooms, 3));
            assert_eq!(a.len(), 3);
            assert!(a[0] != a[1] && a[1] != a[2] && a[0] != a[2]);
            assert_eq!(a, ids(candidates("demo", &user, &reversed, 3)));
            // Same inputs, same answer (no randomness, no process-dependent seed).
            assert_eq!(a, ids(candidates("demo", &user, &rooms, 3)));
        }
    }

    #[test]
    fn pinned_weight() {
        // A change here sends every device of every deployment to a different room.
        assert_eq!(
            weight("demo", "alice", "room-1"),
            xxhash_rust::xxh3::xxh3_64(b"demo\0alice\0room-1")
        );
    }

    #[test]
    fn removing_a_room_moves_only_its_users() {
        let rooms: Vec<Room> = (0..10).map(room).collect();
        let without: Vec<Room> = rooms.iter().filter(|r| r.id != "room-3").cloned().collect();
        let mut moved = 0;
        for u in 0..5_000 {
            let user = format!("u{u}");
            let before = candidates("demo", &user, &rooms, 3)[0].id.clone();
            let after = candidates("demo", &user, &without, 3)[0].id.clone();
            if before != "room-3" {
                assert_eq!(before, after, "user {user} moved although its room stayed");
            } else {
                moved += 1;
                // Its second choice becomes its first: the fallback the device already had.
                let second = candidates("demo", &user, &rooms, 3)[1].id.clone();
                assert_eq!(after, second);
            }
        }
        // About a tenth of the users lived on room-3.
        assert!((350..650).contains(&moved), "moved {moved}");
    }

    #[test]
    fn users_spread_evenly_and_apps_differ() {
        let rooms: Vec<Room> = (0..5).map(room).collect();
        let mut counts = [0u32; 5];
        let mut differs = 0;
        for u in 0..10_000 {
            let user = format!("u{u}");
            let first = candidates("demo", &user, &rooms, 1)[0];
            counts[first.id[5..].parse::<usize>().unwrap()] += 1;
            if candidates("other", &user, &rooms, 1)[0].id != first.id {
                differs += 1;
            }
        }
        for c in counts {
            assert!((1_700..2_300).contains(&c), "{counts:?}");
        }
        assert!(differs > 7_000, "app is not part of the key: {differs}");
    }

    #[test]
    fn rooms_without_device_addresses_are_skipped() {
        let mut rooms: Vec<Room> = (0..2).map(room).collect();
        rooms.push(Room {
            id: "grpc-only".into(),
            tcp: None,
            ws: None,
            grpc: Some("127.0.0.1:1".into()),
        });
        for u in 0..100 {
            let c = candidates("demo", &format!("u{u}"), &rooms, 3);
            assert_eq!(c.len(), 2);
            assert!(c.iter().all(|r| r.id != "grpc-only"));
        }
        assert!(candidates("demo", "u", &[], 3).is_empty());
    }
}
