//! RocksDB key encoding for sessions and the per-room index, chosen so that a slot, a user and a
//! room's sessions in a slot are each one prefix scan.
//!
//! - sessions CF: `slot(be16) app 0x00 user 0x00 conn_id(be64) room_id` -> encoded `Session`.
//!   The design's key is `slot app 0 user 0 conn_id`; the room id is appended because conn ids are
//!   only unique within a room, and appending keeps every prefix the design relies on.
//! - by_room CF: `slot(be16) room_id 0x00 app 0x00 user 0x00 conn_id(be64)` -> empty.
//!
//! NUL separators are unambiguous because app, user and room ids may not contain NUL
//! ([`check_id`] enforces it at the edge).

/// Longest app, user or room id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Why an id cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes, longer than the limit of {MAX_ID_LEN}")]
    TooLong { what: &'static str, len: usize },
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
}

/// Checks an app, user or room id: non-empty, at most [`MAX_ID_LEN`] bytes, no NUL.
pub fn check_id(what: &'static str, id: &str) -> Result<(), KeyError> {
    if id.is_empty() {
        return Err(KeyError::Empty { what });
    }
    if id.len() > MAX_ID_LEN {
        return Err(KeyError::TooLong {
            what,
            len: id.len(),
        });
    }
    if id.as_bytes().contains(&0) {
        return Err(KeyError::Nul { what });
    }
    Ok(())
}

/// Prefix of every key of `slot` (both column families).
pub fn slot_prefix(slot: u16) -> [u8; 2] {
    slot.to_be_bytes()
}

/// Prefix of every session of `(app, user)` in the sessions CF.
pub fn user_prefix(slot: u16, app: &str, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + app.len() + user.len());
    k.extend_from_slice(&slot.to_be_bytes());
    k.extend_from_slice(app.as_bytes());
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k
}

/// Key of one session in the sessions CF.
pub fn session_key(slot: u16, app: &str, user: &str, conn_id: u64, room: &str) -> Vec<u8> {
    let mut k = user_prefix(slot, app, user);
    k.extend_from_slice(&conn_id.to_be_bytes());
    k.extend_from_slice(room.as_bytes());
    k
}

/// Prefix of every index entry of `room` in `slot` (by_room CF).
pub fn room_prefix(slot: u16, room: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + room.len());
    k.extend_from_slice(&slot.to_be_bytes());
    k.extend_from_slice(room.as_bytes());
    k.push(0);
    k
}

/// Key of one session in the by_room CF.
pub fn room_key(slot: u16, room: &str, app: &str, user: &str, conn_id: u64) -> Vec<u8> {
    let mut k = room_prefix(slot, room);
    k.extend_from_slice(app.as_bytes());
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(&conn_id.to_be_bytes());
    k
}

/// One decoded by_room key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEntry<'a> {
    pub slot: u16,
    pub room: &'a str,
    pub app: &'a str,
    pub user: &'a str,
    pub conn_id: u64,
}

/// Decodes a by_room key; `None` if it is malformed (never written by this module).
pub fn parse_room_key(key: &[u8]) -> Option<RoomEntry<'_>> {
    let slot = u16::from_be_bytes(key.get(..2)?.try_into().ok()?);
    let rest = key.get(2..)?;
    let (rest, conn) = rest.split_at(rest.len().checked_sub(8)?);
    let conn_id = u64::from_be_bytes(conn.try_into().ok()?);
    let rest = rest.strip_suffix(&[0])?;
    let mut parts = rest.splitn(3, |b| *b == 0);
    let room = std::str::from_utf8(parts.next()?).ok()?;
    let app = std::str::from_utf8(parts.next()?).ok()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    Some(RoomEntry {
        slot,
        room,
        app,
        user,
        conn_id,
    })
}

/// The first key after every key starting with `prefix` (for range deletes).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: no upper bound exists; callers only pass slot-led prefixes below 0xffff.
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_key_layout_is_pinned() {
        let k = session_key(0x0102, "ap", "us", 0x0a0b, "r1");
        assert_eq!(
            k,
            [
                1, 2, b'a', b'p', 0, b'u', b's', 0, 0, 0, 0, 0, 0, 0, 0x0a, 0x0b, b'r', b'1'
            ]
        );
        assert!(k.starts_with(&user_prefix(0x0102, "ap", "us")));
        assert!(k.starts_with(&slot_prefix(0x0102)));
    }

    #[test]
    fn user_prefix_does_not_match_longer_users() {
        // "us" must not prefix-match "use": the NUL after the user ends it.
        let other = session_key(1, "ap", "use", 1, "r");
        assert!(!other.starts_with(&user_prefix(1, "ap", "us")));
        let other_app = session_key(1, "a", "pus", 1, "r");
        assert!(!other_app.starts_with(&user_prefix(1, "ap", "us")));
    }

    #[test]
    fn room_key_round_trips() {
        let k = room_key(1023, "room-7", "demo", "alice", u64::MAX - 3);
        assert!(k.starts_with(&room_prefix(1023, "room-7")));
        assert!(!k.starts_with(&room_prefix(1023, "room-")));
        let e = parse_room_key(&k).unwrap();
        assert_eq!(
            e,
            RoomEntry {
                slot: 1023,
                room: "room-7",
                app: "demo",
                user: "alice",
                conn_id: u64::MAX - 3
            }
        );
        // A conn id whose bytes contain NULs still parses: it is read from the fixed-size tail.
        let k = room_key(0, "r", "a", "u", 0);
        assert_eq!(parse_room_key(&k).unwrap().conn_id, 0);
    }

    #[test]
    fn slot_keys_sort_by_slot() {
        assert!(session_key(1, "z", "z", u64::MAX, "z") < session_key(2, "a", "a", 0, "a"));
        assert!(session_key(255, "z", "z", 1, "z") < session_key(256, "a", "a", 0, "a"));
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(&[0, 5]), vec![0, 6]);
        assert_eq!(prefix_end(&[0, 0xff]), vec![1]);
        let p = room_prefix(3, "r");
        let end = prefix_end(&p);
        assert!(room_key(3, "r", "a", "u", u64::MAX) < end);
        assert!(room_key(3, "r\u{1}", "a", "u", 0) >= end);
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("app", "demo").is_ok());
        assert_eq!(check_id("app", ""), Err(KeyError::Empty { what: "app" }));
        assert_eq!(
            check_id("user", "a\0b"),
            Err(KeyError::Nul { what: "user" })
        );
        let long = "x".repeat(MAX_ID_LEN + 1);
        let e = check_id("user", &long).unwrap_err();
        assert!(e.to_string().contains("limit of 256"), "{e}");
    }
}
