//! Register checker (R1-R3 of DESIGN.md §7) over the history of the register workload.
//!
//! The test rooms' own connections are the truth. A connection is *established* from the
//! return of its successful Attach until the call of its Detach (the room closes it first);
//! a connection whose Attach failed or went unanswered was closed when that Attach returned.
//!
//! - **R1** (failover never turns online users offline): an `OK` lookup that is not marked
//!   `rebuilding` must list every connection of the user established over the whole lookup.
//! - **R2** (no session of a closed connection survives reconciliation): an `OK` lookup must not
//!   list a connection closed more than `window` before the lookup was sent, nor one nobody
//!   opened, nor one of another user.
//! - **R3** (a stale owner never accepts a write): an `OK` Attach, Detach or Sync must come from
//!   a register whose map, at the epoch it answered with, gives it the slot; that epoch must not
//!   be older than the caller's; and it must not be older than a map that had already moved the
//!   slot away *after the register's lease expired* (its discovery entry gone at that map's
//!   revision) and that the harness saw before sending the request.
//!
//! The end-of-run convergence (every open connection found at the current owner, nothing else)
//! is checked by the run itself with [`expected_by_user`] and [`compare_final`].

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::history::Entry;
use crate::history::Outcome;
use crate::history::SessionOp;
use crate::history::SessionOpKind;

/// One test-room connection's life, from the history.
#[derive(Debug, Clone)]
struct Life {
    user: String,
    /// Return of the successful Attach.
    established: Option<u64>,
    /// Call of the Detach, or return of a failed / unanswered Attach.
    closed: Option<u64>,
    attach: SessionOp,
}

/// A slot map seen in the keeper.
struct MapSeen {
    revision: i64,
    time: u64,
    epoch: u64,
    owners: Vec<String>,
}

fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

/// One line describing an operation.
pub fn describe(op: &SessionOp) -> String {
    let mut s = format!(
        "[{} .. {}] client {} {:?} ",
        secs(op.call_time),
        secs(op.return_time),
        op.client,
        op.op
    );
    if !op.room.is_empty() {
        let _ = write!(s, "{}/{} ", op.room, op.conn_id);
    }
    if !op.user.is_empty() {
        let _ = write!(s, "user {} ", op.user);
    }
    let _ = write!(
        s,
        "slot {} at {} epoch {} -> {:?}",
        op.slot, op.register, op.epoch, op.outcome
    );
    if let Some(st) = &op.status {
        let _ = write!(s, " {st}");
    }
    if let Some(e) = op.answer_epoch {
        let _ = write!(s, " (register epoch {e})");
    }
    if let Some(f) = &op.found {
        let _ = write!(s, " found [{}]", f.join(" "));
    }
    if op.rebuilding {
        s.push_str(" rebuilding");
    }
    if let Some(e) = &op.error {
        let _ = write!(s, " error {e:?}");
    }
    s
}

fn session_ops(entries: &[Entry]) -> Vec<&SessionOp> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Session(op) => Some(op),
            _ => None,
        })
        .collect()
}

/// Every connection the rooms opened, keyed `room/conn_id`.
fn lives(ops: &[&SessionOp]) -> HashMap<String, Life> {
    let mut lives: HashMap<String, Life> = HashMap::new();
    for op in ops.iter().filter(|o| o.op == SessionOpKind::Attach) {
        let ok = op.outcome == Outcome::Ok;
        lives.insert(
            format!("{}/{}", op.room, op.conn_id),
            Life {
                user: op.user.clone(),
                established: ok.then_some(op.return_time),
                closed: (!ok).then_some(op.return_time),
                attach: (*op).clone(),
            },
        );
    }
    for op in ops.iter().filter(|o| o.op == SessionOpKind::Detach) {
        if let Some(l) = lives.get_mut(&format!("{}/{}", op.room, op.conn_id)) {
            l.closed = Some(l.closed.map_or(op.call_time, |c| c.min(op.call_time)));
        }
    }
    lives
}

/// Collects examples per kind of violation; prints a count and the first few.
#[derive(Default)]
struct Report {
    kinds: BTreeMap<String, (usize, Vec<String>)>,
}

impl Report {
    fn add(&mut self, kind: &str, example: String) {
        let e = self.kinds.entry(kind.to_string()).or_default();
        e.0 += 1;
        if e.1.len() < 3 {
            e.1.push(example);
        }
    }

    fn finish(self) -> Vec<String> {
        self.kinds
            .into_iter()
            .map(|(kind, (n, examples))| {
                format!("{kind}: {n} times, e.g.\n    {}", examples.join("\n    "))
            })
            .collect()
    }
}

/// Checks R1-R3 over a register-workload history; `window` is R2's reconciliation window.
pub fn check(entries: &[Entry], window: Duration) -> Vec<String> {
    let ops = session_ops(entries);
    let lives = lives(&ops);
    let mut by_user: HashMap<&str, Vec<(&String, &Life)>> = HashMap::new();
    for (k, l) in &lives {
        by_user.entry(l.user.as_str()).or_default().push((k, l));
    }
    let mut report = Report::default();
    for op in ops
        .iter()
        .filter(|o| o.op == SessionOpKind::Lookup && o.outcome == Outcome::Ok)
    {
        let found: BTreeSet<&str> = op.found.iter().flatten().map(String::as_str).collect();
        if !op.rebuilding {
            for (key, life) in by_user.get(op.user.as_str()).into_iter().flatten() {
                let open_throughout = life.established.is_some_and(|e| e < op.call_time)
                    && life.closed.is_none_or(|c| c > op.return_time);
                if open_throughout && !found.contains(key.as_str()) {
                    report.add(
                        "R1 an OK lookup missed an open connection (online user reported without it)",
                        format!(
                            "{}\n      missing {key}: {}",
                            describe(op),
                            describe(&life.attach)
                        ),
                    );
                }
            }
        }
        for key in &found {
            match lives.get(*key) {
                None => report.add(
                    "R2 a lookup found a session no room opened",
                    format!("{}: {key}", describe(op)),
                ),
                Some(l) if l.user != op.user => report.add(
                    "R2 a lookup found another user's session",
                    format!("{}: {key} belongs to {}", describe(op), l.user),
                ),
                Some(l) => {
                    if let Some(c) = l.closed
                        && op.call_time > c + window.as_nanos() as u64
                    {
                        report.add(
                            "R2 a closed connection's session survived the reconciliation window",
                            format!(
                                "{}\n      {key} closed at {} ({:.1}s before; window {window:?})",
                                describe(op),
                                secs(c),
                                (op.call_time - c) as f64 / 1e9
                            ),
                        );
                    }
                }
            }
        }
    }
    check_fencing(entries, &ops, &mut report);
    report.finish()
}

/// R3 over every acknowledged write.
fn check_fencing(entries: &[Entry], ops: &[&SessionOp], report: &mut Report) {
    let mut maps: Vec<MapSeen> = Vec::new();
    let mut instances: HashMap<String, Vec<(i64, bool)>> = HashMap::new();
    for e in entries {
        if let Entry::Keeper(k) = e {
            if let Some(m) = &k.map {
                maps.push(MapSeen {
                    revision: k.revision,
                    time: k.time,
                    epoch: m.epoch,
                    owners: m.decode(),
                });
            }
            if let Some((id, present)) = &k.instance {
                instances
                    .entry(id.clone())
                    .or_default()
                    .push((k.revision, *present));
            }
        }
    }
    for v in instances.values_mut() {
        v.sort();
    }
    let by_epoch: HashMap<u64, &MapSeen> = maps.iter().map(|m| (m.epoch, m)).collect();
    // Whether `id` had a discovery entry at `revision` (None: nothing known).
    let present_at = |id: &str, revision: i64| -> Option<bool> {
        instances
            .get(id)?
            .iter()
            .take_while(|(r, _)| *r <= revision)
            .last()
            .map(|(_, p)| *p)
    };
    let writes = ops.iter().filter(|o| {
        o.op != SessionOpKind::Lookup && o.outcome == Outcome::Ok && o.answer_epoch.is_some()
    });
    for op in writes {
        let answered = op.answer_epoch.unwrap_or_default();
        if answered < op.epoch {
            report.add(
                "R3 a register accepted a write routed by a newer map than its own",
                describe(op),
            );
        }
        if let Some(m) = by_epoch.get(&answered)
            && m.owners.get(usize::from(op.slot)).map(String::as_str) != Some(op.register.as_str())
        {
            report.add(
                "R3 a register accepted a write for a slot it does not own at the epoch it answered with",
                format!(
                    "{}; owner at epoch {answered}: {:?}",
                    describe(op),
                    m.owners.get(usize::from(op.slot))
                ),
            );
        }
        let superseded = maps.iter().find(|m| {
            m.epoch > answered
                && m.time <= op.call_time
                && m.owners.get(usize::from(op.slot)).map(String::as_str)
                    != Some(op.register.as_str())
                && present_at(&op.register, m.revision) == Some(false)
        });
        if let Some(m) = superseded {
            report.add(
                "R3 a stale owner accepted a write after its slot failed over",
                format!(
                    "{}\n      slot {} moved to {:?} at epoch {} (revision {}, seen at {}) after {}'s lease expired",
                    describe(op),
                    op.slot,
                    m.owners.get(usize::from(op.slot)),
                    m.epoch,
                    m.revision,
                    secs(m.time),
                    op.register
                ),
            );
        }
    }
}

/// What the final lookups must find: the open connections of every room, per user, as
/// `room/conn_id`.
pub fn expected_by_user(
    rooms: &[(String, Vec<(String, u64)>)],
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (room, open) in rooms {
        for (user, conn) in open {
            out.entry(user.clone())
                .or_default()
                .insert(format!("{room}/{conn}"));
        }
    }
    out
}

/// Compares one final lookup with what it must find: `None` if it matches (OK, not
/// rebuilding, exactly the expected sessions), else why not.
pub fn compare_final(op: &SessionOp, expected: &BTreeSet<String>) -> Option<String> {
    if op.outcome != Outcome::Ok {
        return Some(format!("not answered OK: {}", describe(op)));
    }
    if op.rebuilding {
        return Some(format!("still rebuilding: {}", describe(op)));
    }
    let found: BTreeSet<String> = op.found.iter().flatten().cloned().collect();
    let missing: Vec<&String> = expected.difference(&found).collect();
    let extra: Vec<&String> = found.difference(expected).collect();
    if missing.is_empty() && extra.is_empty() {
        return None;
    }
    Some(format!(
        "{}: missing (R1) {missing:?}, closed but present (R2) {extra:?}",
        describe(op)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::KeeperEvent;
    use crate::history::MapRecord;

    const S: u64 = 1_000_000_000;

    fn op(
        kind: SessionOpKind,
        room: &str,
        user: &str,
        conn: u64,
        t: (u64, u64),
        outcome: Outcome,
    ) -> SessionOp {
        SessionOp {
            client: 0,
            op: kind,
            room: room.into(),
            user: user.into(),
            conn_id: conn,
            slot: 5,
            register: "r1".into(),
            epoch: 1,
            call_time: t.0,
            return_time: t.1,
            outcome,
            status: Some(
                if outcome == Outcome::Ok {
                    "ok"
                } else {
                    "unavailable"
                }
                .into(),
            ),
            answer_epoch: (outcome == Outcome::Ok).then_some(1),
            found: None,
            rebuilding: false,
            sessions: None,
            error: None,
        }
    }

    fn attach(room: &str, user: &str, conn: u64, t: u64, outcome: Outcome) -> Entry {
        Entry::Session(op(
            SessionOpKind::Attach,
            room,
            user,
            conn,
            (t, t + 10),
            outcome,
        ))
    }

    fn detach(room: &str, user: &str, conn: u64, t: u64) -> Entry {
        Entry::Session(op(
            SessionOpKind::Detach,
            room,
            user,
            conn,
            (t, t + 10),
            Outcome::Ok,
        ))
    }

    fn lookup(user: &str, t: u64, found: &[&str], rebuilding: bool) -> Entry {
        let mut o = op(SessionOpKind::Lookup, "", user, 0, (t, t + 10), Outcome::Ok);
        o.found = Some(found.iter().map(|s| s.to_string()).collect());
        o.rebuilding = rebuilding;
        Entry::Session(o)
    }

    fn map(t: u64, revision: i64, epoch: u64, owner: &str) -> Entry {
        Entry::Keeper(KeeperEvent {
            time: t,
            revision,
            map: Some(MapRecord::encode(epoch, &vec![owner.to_string(); 1024])),
            instance: None,
        })
    }

    fn instance(t: u64, revision: i64, id: &str, present: bool) -> Entry {
        Entry::Keeper(KeeperEvent {
            time: t,
            revision,
            map: None,
            instance: Some((id.into(), present)),
        })
    }

    const W: Duration = Duration::from_secs(5);

    #[test]
    fn a_legal_history_passes() {
        let h = vec![
            map(0, 1, 1, "r1"),
            instance(0, 1, "r1", true),
            attach("a", "u1", 1, S, Outcome::Ok),
            lookup("u1", 2 * S, &["a/1"], false),
            // Overlapping the attach: may or may not see it.
            attach("a", "u1", 2, 3 * S, Outcome::Ok),
            lookup("u1", 3 * S + 5, &["a/1"], false),
            detach("a", "u1", 1, 4 * S),
            // Closed moments ago: may still be found (within the window).
            lookup("u1", 5 * S, &["a/1", "a/2"], false),
            // Rebuilding answers may be partial.
            lookup("u1", 6 * S, &[], true),
            // A failed attach may still land (unknown), and be found within the window.
            attach("b", "u1", 7, 7 * S, Outcome::Unknown),
            lookup("u1", 8 * S, &["a/2", "b/7"], false),
            lookup("u1", 20 * S, &["a/2"], false),
        ];
        assert_eq!(check(&h, W), Vec::<String>::new());
    }

    #[test]
    fn false_offline_is_r1() {
        let h = vec![
            attach("a", "u1", 1, S, Outcome::Ok),
            lookup("u1", 2 * S, &[], false),
        ];
        let v = check(&h, W);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].starts_with("R1") && v[0].contains("missing a/1"),
            "{v:?}"
        );
    }

    #[test]
    fn stale_phantom_and_foreign_sessions_are_r2() {
        let h = vec![
            attach("a", "u1", 1, S, Outcome::Ok),
            attach("a", "u2", 2, S, Outcome::Ok),
            detach("a", "u1", 1, 2 * S),
            lookup("u1", 10 * S, &["a/1"], false),
            lookup("u2", 10 * S, &["a/2", "a/9"], false),
            lookup("u1", 11 * S, &["a/2"], true),
        ];
        let v = check(&h, W).join("\n");
        assert!(v.contains("R2 a closed connection"), "{v}");
        assert!(
            v.contains("R2 a lookup found a session no room opened"),
            "{v}"
        );
        assert!(
            v.contains("R2 a lookup found another user's session"),
            "{v}"
        );
    }

    #[test]
    fn writes_at_a_stale_owner_are_r3() {
        // r1 owns everything at epoch 1; its lease expires (entry deleted at revision 5) and the
        // map moves to r2 at epoch 2 (revision 6), seen at 3 s.
        let base = vec![
            map(0, 1, 1, "r1"),
            instance(0, 2, "r1", true),
            instance(0, 3, "r2", true),
            instance(2 * S, 5, "r1", false),
            map(3 * S, 6, 2, "r2"),
        ];
        // Accepted at epoch 1 after the failover map was seen: stale owner.
        let mut h = base.clone();
        h.push(attach("a", "u1", 1, 4 * S, Outcome::Ok));
        let v = check(&h, W);
        assert!(v.iter().any(|a| a.starts_with("R3 a stale owner")), "{v:?}");
        // The same write sent before the map moved is fine.
        let mut h = base.clone();
        h.insert(4, attach("a", "u1", 1, S, Outcome::Ok));
        assert_eq!(check(&h, W), Vec::<String>::new());
        // A live hand-back (r1 still registered) is not a failover: serving the old epoch for a
        // moment is allowed by the design.
        let h = vec![
            map(0, 1, 1, "r1"),
            instance(0, 2, "r1", true),
            map(3 * S, 6, 2, "r2"),
            attach("a", "u1", 1, 4 * S, Outcome::Ok),
        ];
        assert_eq!(check(&h, W), Vec::<String>::new());
        // Answering with a map older than the caller's, or for a slot it does not own.
        let mut newer = op(SessionOpKind::Sync, "a", "", 0, (S, S + 1), Outcome::Ok);
        newer.epoch = 2;
        let mut not_owner = op(SessionOpKind::Detach, "a", "u1", 1, (S, S + 1), Outcome::Ok);
        not_owner.register = "r2".into();
        let h = vec![
            map(0, 1, 1, "r1"),
            Entry::Session(newer),
            Entry::Session(not_owner),
        ];
        let v = check(&h, W).join("\n");
        assert!(v.contains("routed by a newer map"), "{v}");
        assert!(v.contains("does not own"), "{v}");
    }

    #[test]
    fn final_lookups_must_match_exactly() {
        let expected = expected_by_user(&[("a".into(), vec![("u1".into(), 1)])]);
        let want = &expected["u1"];
        let Entry::Session(good) = lookup("u1", S, &["a/1"], false) else {
            unreachable!()
        };
        assert_eq!(compare_final(&good, want), None);
        let Entry::Session(extra) = lookup("u1", S, &["a/1", "a/2"], false) else {
            unreachable!()
        };
        assert!(compare_final(&extra, want).unwrap().contains("a/2"));
        let Entry::Session(partial) = lookup("u1", S, &["a/1"], true) else {
            unreachable!()
        };
        assert!(
            compare_final(&partial, want)
                .unwrap()
                .contains("rebuilding")
        );
    }
}
