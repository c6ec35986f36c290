//! Push checker (P1, P2 of DESIGN.md §7) over the history of the push workload.
//!
//! - **P2**: every message a device receives was pushed (its key is in the history) to that
//!   device's user.
//! - **P1**: a QoS 1 push that center accepted for an online user (`200` with `sessions`,
//!   `users_online` or `retrying` non-zero) reaches that user at least once, provided the
//!   device's connection open at the push stayed open to the end, or the device came back to
//!   the same room process within the resume window (pending QoS 1 messages live in the room's
//!   memory until the saver exists, so a room killed or left for another room excuses the loss;
//!   these are counted, not hidden). And center must not answer "offline" for a user whose
//!   device was connected throughout the push and for [`LIVENESS_MARGIN`] after, on a room that
//!   no fault touched within [`ROOM_FAULT_GRACE`].

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use crate::history::DeviceWhat;
use crate::history::Entry;
use crate::history::Outcome;
use crate::history::PushOp;

/// How long after a push a device must still have been connected for "offline" to be wrong
/// (a device notices a dead connection within its 5 s liveness timeout).
pub const LIVENESS_MARGIN: Duration = Duration::from_secs(7);
/// After a fault on a room heals, its sessions may take this long to be registered again.
pub const ROOM_FAULT_GRACE: Duration = Duration::from_secs(20);
/// The room's default `resume_window_s`.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);

/// One device connection, from the history.
#[derive(Debug, Clone)]
struct Conn {
    room: String,
    conn_id: u64,
    incarnation: u32,
    start: u64,
    end: Option<u64>,
    reason: Option<String>,
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct PushVerdict {
    pub anomalies: Vec<String>,
    /// Messages received (with duplicates).
    pub received: usize,
    /// Accepted pushes delivered at least once.
    pub delivered: usize,
    /// Accepted pushes received more than once.
    pub duplicated: usize,
    /// Accepted pushes not delivered, excused (device not connected at the push, its room
    /// killed, or it moved to another room), by reason.
    pub excused: BTreeMap<String, usize>,
    /// Accepted pushes that must still arrive (the run waits for these before checking).
    pub owed: Vec<u64>,
}

fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

fn describe(p: &PushOp) -> String {
    format!(
        "[{} .. {}] client {} push k={} to {} -> {:?} {:?}",
        secs(p.call_time),
        secs(p.return_time),
        p.client,
        p.key,
        p.user,
        p.outcome,
        p.answer
    )
}

fn describe_conn(c: &Conn) -> String {
    format!(
        "{}#{} conn {} [{} .. {}]{}",
        c.room,
        c.incarnation,
        c.conn_id,
        secs(c.start),
        c.end.map(secs).unwrap_or_else(|| "end".into()),
        c.reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    )
}

/// Per user, its connections in order.
fn connections(entries: &[Entry]) -> HashMap<String, Vec<Conn>> {
    let mut out: HashMap<String, Vec<Conn>> = HashMap::new();
    for e in entries {
        let Entry::Device(d) = e else { continue };
        let conns = out.entry(d.user.clone()).or_default();
        match &d.what {
            DeviceWhat::Connected {
                room,
                conn_id,
                incarnation,
                ..
            } => conns.push(Conn {
                room: room.clone(),
                conn_id: *conn_id,
                incarnation: *incarnation,
                start: d.time,
                end: None,
                reason: None,
            }),
            DeviceWhat::Disconnected { reason } => {
                if let Some(c) = conns.last_mut().filter(|c| c.end.is_none()) {
                    c.end = Some(d.time);
                    c.reason = Some(reason.clone());
                }
            }
            DeviceWhat::Received { .. } => {}
        }
    }
    out
}

/// The nemesis detail of a partition that cuts a process off from the keeper only. Such a room
/// still answers center and the registers, which keep its sessions (docs/decisions.md, "A room's
/// sessions outlive its lease while it answers"), so it excuses no "offline" answer.
pub const KEEPER_CUT: &str = "cut off from the keeper";

/// Time intervals during which a fault made each process unreachable or dead (from nemesis
/// lines `"<names>: ..."`), extended by nothing; open faults end at `u64::MAX`.
fn fault_intervals(entries: &[Entry]) -> HashMap<String, Vec<(u64, u64)>> {
    let mut open: HashMap<(String, String), u64> = HashMap::new();
    let mut out: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for e in entries {
        let Entry::Nemesis(n) = e else { continue };
        if !["kill", "pause", "partition"].contains(&n.fault.as_str())
            || n.detail.contains(KEEPER_CUT)
        {
            continue;
        }
        let names = n.detail.split(':').next().unwrap_or_default();
        for name in names.split_whitespace() {
            let key = (n.fault.clone(), name.to_string());
            match n.action.as_str() {
                "start" => {
                    open.insert(key, n.time);
                }
                "heal" => {
                    if let Some(s) = open.remove(&key) {
                        out.entry(name.to_string()).or_default().push((s, n.time));
                    }
                }
                _ => {}
            }
        }
    }
    for ((_, name), s) in open {
        out.entry(name).or_default().push((s, u64::MAX));
    }
    out
}

/// Whether center accepted the push for an online user.
fn accepted(p: &PushOp) -> bool {
    p.outcome == Outcome::Ok
        && p.answer
            .as_ref()
            .is_some_and(|a| a.sessions > 0 || a.users_online > 0 || a.retrying > 0)
}

/// Checks P1 and P2. With `final_check` false, undelivered pushes whose connection is still
/// open are only listed in `owed` (the run waits for them), not reported.
pub fn check(entries: &[Entry], final_check: bool) -> PushVerdict {
    let mut v = PushVerdict::default();
    let pushes: HashMap<u64, &PushOp> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Push(p) => Some((p.key, p)),
            _ => None,
        })
        .collect();
    let mut got: HashMap<u64, usize> = HashMap::new();
    let mut p2 = Vec::new();
    for e in entries {
        let Entry::Device(d) = e else { continue };
        let DeviceWhat::Received { id, key, to, .. } = &d.what else {
            continue;
        };
        v.received += 1;
        let pushed = key.and_then(|k| pushes.get(&k));
        match pushed {
            None => p2.push(format!(
                "[{}] {} received {id} with key {key:?}, which nobody pushed",
                secs(d.time),
                d.user
            )),
            Some(p) if p.user != d.user || to.as_deref() != Some(d.user.as_str()) => {
                p2.push(format!(
                    "[{}] {} received {id} addressed to {to:?}: {}",
                    secs(d.time),
                    d.user,
                    describe(p)
                ))
            }
            Some(p) => *got.entry(p.key).or_default() += 1,
        }
    }
    if !p2.is_empty() {
        v.anomalies.push(format!(
            "P2 a message reached a user it was not addressed to: {} times, e.g.\n    {}",
            p2.len(),
            p2.iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n    ")
        ));
    }
    let conns = connections(entries);
    let faults = fault_intervals(entries);
    let none = Vec::new();
    let mut lost = Vec::new();
    let mut offline = Vec::new();
    let mut ordered: Vec<&&PushOp> = pushes.values().collect();
    ordered.sort_by_key(|p| p.call_time);
    for p in ordered {
        let user_conns = conns.get(&p.user).unwrap_or(&none);
        let at_call = user_conns
            .iter()
            .position(|c| c.start < p.call_time && c.end.is_none_or(|e| e > p.call_time));
        if p.outcome == Outcome::Ok && !accepted(p) {
            let conn = at_call.map(|i| &user_conns[i]);
            if let Some(why) = check_offline(p, conn, &faults) {
                match why {
                    Offline::Wrong(line) => offline.push(line),
                    Offline::RoomFaulted => {
                        *v.excused
                            .entry(
                                "answered offline while the device's room was under a fault".into(),
                            )
                            .or_default() += 1
                    }
                }
            }
            continue;
        }
        if !accepted(p) {
            continue;
        }
        if let Some(n) = got.get(&p.key) {
            v.delivered += 1;
            if *n > 1 {
                v.duplicated += 1;
            }
            continue;
        }
        let Some(i) = at_call else {
            *v.excused
                .entry("device not connected at the push".into())
                .or_default() += 1;
            continue;
        };
        let c = &user_conns[i];
        let Some(end) = c.end else {
            if final_check {
                lost.push(format!(
                    "{}\n      connection {} never closed",
                    describe(p),
                    describe_conn(c)
                ));
            } else {
                v.owed.push(p.key);
            }
            continue;
        };
        match user_conns.get(i + 1) {
            Some(next)
                if next.room == c.room
                    && next.incarnation == c.incarnation
                    && next.start.saturating_sub(end) <= RESUME_WINDOW.as_nanos() as u64 =>
            {
                if final_check {
                    lost.push(format!(
                        "{}\n      connection {} then {} on the same room process: not resumed",
                        describe(p),
                        describe_conn(c),
                        describe_conn(next)
                    ));
                } else {
                    v.owed.push(p.key);
                }
            }
            Some(next) if next.room == c.room => {
                *v.excused
                    .entry("room restarted (pending QoS 1 kept in memory)".into())
                    .or_default() += 1
            }
            Some(_) => {
                *v.excused
                    .entry("device moved to another room".into())
                    .or_default() += 1
            }
            None => {
                *v.excused
                    .entry("device did not reconnect".into())
                    .or_default() += 1
            }
        }
    }
    if !lost.is_empty() {
        v.anomalies.push(format!(
            "P1 a QoS 1 message accepted for an online user was never delivered: {} times, e.g.\n    {}",
            lost.len(),
            lost.iter().take(3).cloned().collect::<Vec<_>>().join("\n    ")
        ));
    }
    if !offline.is_empty() {
        v.anomalies.push(format!(
            "P1 center answered offline for a connected user (the message was dropped): {} times, e.g.\n    {}",
            offline.len(),
            offline.iter().take(3).cloned().collect::<Vec<_>>().join("\n    ")
        ));
    }
    v
}

/// Why an "offline" answer for a connected device matters.
enum Offline {
    /// A P1 violation (the line describes it).
    Wrong(String),
    /// Excused: a fault touched the device's room recently (counted).
    RoomFaulted,
}

/// An `OK` push that found no session although the user's device was connected throughout
/// (and for [`LIVENESS_MARGIN`] after): wrong unless a fault touched that room recently.
fn check_offline(
    p: &PushOp,
    conn: Option<&Conn>,
    faults: &HashMap<String, Vec<(u64, u64)>>,
) -> Option<Offline> {
    let c = conn?;
    let margin = LIVENESS_MARGIN.as_nanos() as u64;
    let grace = ROOM_FAULT_GRACE.as_nanos() as u64;
    if c.end.is_some_and(|e| e <= p.return_time + margin) {
        return None;
    }
    let room_faulted = faults
        .get(&c.room)
        .into_iter()
        .flatten()
        .any(|(s, h)| *s <= p.return_time && h.saturating_add(grace) >= p.call_time);
    Some(if room_faulted {
        Offline::RoomFaulted
    } else {
        Offline::Wrong(format!(
            "{}\n      while connected: {}",
            describe(p),
            describe_conn(c)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::DeviceEvent;
    use crate::history::NemesisEvent;
    use crate::history::PushAnswer;

    const S: u64 = 1_000_000_000;

    fn push(key: u64, user: &str, t: u64, sessions: u64, offline: u64) -> Entry {
        Entry::Push(PushOp {
            client: 0,
            user: user.into(),
            key,
            call_time: t,
            return_time: t + 10,
            outcome: Outcome::Ok,
            http_status: Some(200),
            answer: Some(PushAnswer {
                id: format!("m-{key}"),
                sessions,
                users_online: u64::from(sessions > 0),
                users_offline: offline,
                ..Default::default()
            }),
            error: None,
        })
    }

    fn dev(user: &str, t: u64, what: DeviceWhat) -> Entry {
        Entry::Device(DeviceEvent {
            time: t,
            user: user.into(),
            what,
        })
    }

    fn connected(user: &str, t: u64, room: &str, incarnation: u32) -> Entry {
        dev(
            user,
            t,
            DeviceWhat::Connected {
                room: room.into(),
                conn_id: t,
                incarnation,
                resumed: 0,
            },
        )
    }

    fn gone(user: &str, t: u64) -> Entry {
        dev(
            user,
            t,
            DeviceWhat::Disconnected {
                reason: "closed".into(),
            },
        )
    }

    fn got(user: &str, t: u64, key: u64, to: &str) -> Entry {
        dev(
            user,
            t,
            DeviceWhat::Received {
                id: format!("m-{key}"),
                key: Some(key),
                to: Some(to.into()),
                qos: 1,
            },
        )
    }

    fn nemesis(t: u64, fault: &str, action: &str, detail: &str) -> Entry {
        Entry::Nemesis(NemesisEvent {
            time: t,
            fault: fault.into(),
            action: action.into(),
            detail: detail.into(),
        })
    }

    #[test]
    fn offline_while_the_room_is_only_cut_off_from_the_keeper_is_an_anomaly() {
        let h = vec![
            connected("u2", 0, "room-2", 0),
            nemesis(S, "partition", "start", "room-2: cut off from the keeper"),
            push(1, "u2", 2 * S, 0, 1),
            nemesis(3 * S, "partition", "heal", "room-2: iptables rules flushed"),
        ];
        let v = check(&h, true);
        assert_eq!(v.anomalies.len(), 1, "{:?}", v.anomalies);
        assert!(v.anomalies[0].contains("offline"), "{:?}", v.anomalies);
        let mut isolated = h.clone();
        isolated[1] = nemesis(
            S,
            "partition",
            "start",
            "room-2: isolated from every node and the harness",
        );
        assert_eq!(check(&isolated, true).anomalies, Vec::<String>::new());
    }

    #[test]
    fn a_legal_history_passes() {
        let h = vec![
            connected("u1", 0, "room-1", 0),
            connected("u2", 0, "room-2", 0),
            push(1, "u1", S, 1, 0),
            got("u1", S + 100, 1, "u1"),
            got("u1", S + 200, 1, "u1"),
            // Lost with its room: excused.
            push(2, "u2", 2 * S, 1, 0),
            nemesis(2 * S + 50, "kill", "start", "room-2: kill -9"),
            gone("u2", 2 * S + 60),
            nemesis(3 * S, "kill", "heal", "room-2: restarted"),
            connected("u2", 3 * S + 10, "room-2", 1),
            // Resumed on the same room process after a disconnect.
            push(3, "u1", 4 * S, 1, 0),
            gone("u1", 4 * S + 20),
            connected("u1", 4 * S + 30, "room-1", 0),
            got("u1", 4 * S + 40, 3, "u1"),
            // Offline while its room was under a fault: not an anomaly.
            push(4, "u2", 3 * S + 5 * S, 0, 1),
        ];
        let mut h2 = h.clone();
        h2.insert(
            13,
            nemesis(3 * S + 4 * S, "pause", "start", "room-2: SIGSTOP"),
        );
        let v = check(&h2, true);
        assert_eq!(v.anomalies, Vec::<String>::new());
        assert_eq!((v.delivered, v.duplicated), (2, 1));
        assert_eq!(v.excused.values().sum::<usize>(), 2, "{:?}", v.excused);
    }

    #[test]
    fn wrong_user_and_phantoms_are_p2() {
        let h = vec![
            connected("u1", 0, "room-1", 0),
            connected("u2", 0, "room-1", 0),
            push(1, "u1", S, 1, 0),
            got("u1", S + 1, 1, "u1"),
            got("u2", S + 2, 1, "u1"),
            got("u2", S + 3, 77, "u2"),
        ];
        let v = check(&h, true);
        assert_eq!(v.anomalies.len(), 1, "{:?}", v.anomalies);
        assert!(v.anomalies[0].starts_with("P2") && v.anomalies[0].contains("2 times"));
    }

    #[test]
    fn undelivered_to_a_connected_device_is_p1() {
        let h = vec![connected("u1", 0, "room-1", 0), push(1, "u1", S, 1, 0)];
        let early = check(&h, false);
        assert!(early.anomalies.is_empty());
        assert_eq!(early.owed, vec![1]);
        let v = check(&h, true);
        assert!(
            v.anomalies[0].starts_with("P1 a QoS 1 message"),
            "{:?}",
            v.anomalies
        );
        // Not resumed although the device came back to the same room process.
        let h = vec![
            connected("u1", 0, "room-1", 0),
            push(1, "u1", S, 1, 0),
            gone("u1", 2 * S),
            connected("u1", 3 * S, "room-1", 0),
        ];
        let v = check(&h, true);
        assert!(v.anomalies[0].contains("not resumed"), "{:?}", v.anomalies);
    }

    #[test]
    fn offline_for_a_connected_user_is_p1() {
        let h = vec![connected("u1", 0, "room-1", 0), push(1, "u1", S, 0, 1)];
        let v = check(&h, true);
        assert!(
            v.anomalies[0].contains("answered offline"),
            "{:?}",
            v.anomalies
        );
        // Disconnected right after: it may really have been gone.
        let h = vec![
            connected("u1", 0, "room-1", 0),
            push(1, "u1", S, 0, 1),
            gone("u1", 2 * S),
        ];
        assert!(check(&h, true).anomalies.is_empty());
    }
}
