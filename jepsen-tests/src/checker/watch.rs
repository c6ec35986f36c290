//! Keeper watch checker (K3): every watcher's events are ordered, unique, gap-free, carry what
//! was written at that revision, and replay to the final state; resumed watches miss nothing.
//!
//! The workload writes only single-key puts and single-put transactions under the watched
//! prefix, so every write creates exactly one revision and every revision from the first write
//! to the final one is an event for the prefix: a watcher's revisions must be consecutive.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt::Write;

use serde::Deserialize;
use serde::Serialize;

use crate::history::Op;
use crate::history::OpKind;
use crate::history::Outcome;

/// One event as a watcher received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: i64,
    pub key: String,
    /// The value put; `None` for a delete.
    pub value: Option<u64>,
    /// When it arrived (ns since the run started).
    pub time: u64,
}

/// Where a watcher (re)started its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub time: u64,
    /// The start revision asked for: one past the last event received.
    pub from_revision: i64,
    pub node: usize,
    /// Why the previous stream ended (`None` for the first stream).
    pub reason: Option<String>,
}

/// Everything one watcher saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherLog {
    pub watcher: usize,
    pub resumes: Vec<Resume>,
    pub events: Vec<WatchEvent>,
}

/// What the cluster held when the run ended.
#[derive(Debug, Clone)]
pub struct FinalState {
    /// Header revision of a linearizable read taken after the last write.
    pub revision: i64,
    /// Every key under the prefix and its value.
    pub kvs: BTreeMap<String, u64>,
}

/// Checks every watcher; returns one message per anomaly (empty when all is well).
pub fn check(watchers: &[WatcherLog], ops: &[Op], end: &FinalState) -> Vec<String> {
    // revision -> (key, value) of acknowledged writes; value -> key for writes that may have
    // happened (unknown outcome); values of writes that certainly did not happen.
    let mut acked: HashMap<i64, (&str, u64)> = HashMap::new();
    let mut maybe: HashMap<u64, &str> = HashMap::new();
    for op in ops {
        if op.op == OpKind::Get {
            continue;
        }
        let Some(value) = op.args.value else { continue };
        match op.outcome {
            Outcome::Ok => {
                let swapped = op.op == OpKind::Put
                    || op.result.as_ref().and_then(|r| r.succeeded) == Some(true);
                if let (true, Some(rev)) = (swapped, op.result.as_ref().and_then(|r| r.revision)) {
                    acked.insert(rev, (&op.args.key, value));
                }
            }
            Outcome::Unknown => {
                maybe.insert(value, &op.args.key);
            }
            Outcome::Fail => {}
        }
    }
    let first_expected = acked
        .keys()
        .copied()
        .chain(
            watchers
                .iter()
                .filter_map(|w| w.events.first().map(|e| e.revision)),
        )
        .min();

    let mut problems = Vec::new();
    // What the first watcher to report a revision saw there, for cross-watcher agreement.
    let mut seen_at: HashMap<i64, (usize, &str, Option<u64>)> = HashMap::new();
    for w in watchers {
        let mut replay: BTreeMap<&str, u64> = BTreeMap::new();
        let mut values_seen: HashMap<u64, i64> = HashMap::new();
        let mut prev: Option<i64> = None;
        let mut failed = false;
        for (i, e) in w.events.iter().enumerate() {
            let problem = if let Some(p) = prev {
                if e.revision == p {
                    Some(format!("duplicate event at revision {}", e.revision))
                } else if e.revision < p {
                    Some(format!("out of order: revision {} after {p}", e.revision))
                } else if e.revision != p + 1 {
                    Some(format!(
                        "gap: revisions {}..={} missing between {p} and {}",
                        p + 1,
                        e.revision - 1,
                        e.revision
                    ))
                } else {
                    None
                }
            } else if Some(e.revision) != first_expected {
                Some(format!(
                    "first event is revision {} but the first write was at revision {}",
                    e.revision,
                    first_expected.unwrap_or_default()
                ))
            } else {
                None
            };
            let problem = problem.or_else(|| content_problem(e, &acked, &maybe)).or_else(|| {
                let (key, value) = (e.key.as_str(), e.value);
                match seen_at.get(&e.revision) {
                    Some((other, k, v)) if (*k, *v) != (key, value) => Some(format!(
                        "watcher {other} saw {k}={v:?} at revision {} but this one saw {key}={value:?}",
                        e.revision
                    )),
                    _ => None,
                }
            });
            let problem = problem.or_else(|| {
                let v = e.value?;
                values_seen.insert(v, e.revision).map(|r| {
                    format!(
                        "value {v} delivered twice (revisions {r} and {})",
                        e.revision
                    )
                })
            });
            if let Some(problem) = problem {
                problems.push(format!(
                    "watcher {}: {problem}\n{}",
                    w.watcher,
                    context(w, i)
                ));
                failed = true;
                break;
            }
            seen_at
                .entry(e.revision)
                .or_insert((w.watcher, &e.key, e.value));
            match e.value {
                Some(v) => replay.insert(&e.key, v),
                None => replay.remove(e.key.as_str()),
            };
            prev = Some(e.revision);
        }
        if failed {
            continue;
        }
        let last = w.events.last().map(|e| e.revision);
        if first_expected.is_some() && last != Some(end.revision) {
            problems.push(format!(
                "watcher {}: stream ends at revision {} but the store is at revision {} \
                 (events missing at the end, or the watch never caught up)\n{}",
                w.watcher,
                last.unwrap_or_default(),
                end.revision,
                context(w, w.events.len().saturating_sub(1))
            ));
            continue;
        }
        let replayed: BTreeMap<String, u64> = replay
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if replayed != end.kvs {
            let mut diff = String::new();
            for (k, v) in &end.kvs {
                if replayed.get(k) != Some(v) {
                    let _ = writeln!(
                        diff,
                        "    {k}: store has {v}, replayed events give {:?}",
                        replayed.get(k)
                    );
                }
            }
            for (k, v) in &replayed {
                if !end.kvs.contains_key(k) {
                    let _ = writeln!(diff, "    {k}: replayed events give {v}, store has nothing");
                }
            }
            problems.push(format!(
                "watcher {}: replaying its events does not give the final state:\n{diff}",
                w.watcher
            ));
        }
    }
    problems
}

/// An event must carry what was acknowledged at its revision, or a value whose write may have
/// happened; anything else was never written.
fn content_problem(
    e: &WatchEvent,
    acked: &HashMap<i64, (&str, u64)>,
    maybe: &HashMap<u64, &str>,
) -> Option<String> {
    match (acked.get(&e.revision), e.value) {
        (Some((k, v)), Some(got)) if *k == e.key && *v == got => None,
        (Some((k, v)), _) => Some(format!(
            "revision {} was acknowledged as {k}={v} but the event says {}={:?}",
            e.revision, e.key, e.value
        )),
        (None, Some(got)) if maybe.get(&got) == Some(&e.key.as_str()) => None,
        (None, got) => Some(format!(
            "event {}={got:?} at revision {} matches no write that may have happened",
            e.key, e.revision
        )),
    }
}

/// The events around index `i` and the resumptions near them.
fn context(w: &WatcherLog, i: usize) -> String {
    let mut out = String::new();
    let lo = i.saturating_sub(3);
    let hi = (i + 3).min(w.events.len());
    let span = w.events.get(lo).map(|e| e.time).unwrap_or(0)
        ..=w.events
            .get(hi.saturating_sub(1))
            .map(|e| e.time)
            .unwrap_or(u64::MAX);
    for r in &w.resumes {
        if span.contains(&r.time) || r.from_revision == w.events.get(i).map_or(-1, |e| e.revision) {
            let _ = writeln!(
                out,
                "    [{:.3}s] (re)started on n{} from revision {} ({})",
                r.time as f64 / 1e9,
                r.node,
                r.from_revision,
                r.reason.as_deref().unwrap_or("first stream")
            );
        }
    }
    for e in &w.events[lo..hi] {
        let _ = writeln!(
            out,
            "    [{:.3}s] rev {} {}={:?}",
            e.time as f64 / 1e9,
            e.revision,
            e.key,
            e.value
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Args;
    use crate::history::OpResult;

    fn write(key: &str, value: u64, revision: Option<i64>, outcome: Outcome) -> Op {
        Op {
            client: 0,
            op: OpKind::Put,
            args: Args {
                key: key.into(),
                value: Some(value),
                expect: None,
            },
            call_time: 0,
            return_time: 1,
            outcome,
            result: revision.map(|r| OpResult {
                revision: Some(r),
                ..Default::default()
            }),
            error: None,
            node: None,
        }
    }

    fn event(revision: i64, key: &str, value: u64) -> WatchEvent {
        WatchEvent {
            revision,
            key: key.into(),
            value: Some(value),
            time: revision as u64,
        }
    }

    /// Writes a=1 (rev 2), b=2 (rev 3), a=3 (rev 4, unknown outcome), b=4 (rev 5).
    fn scenario() -> (Vec<Op>, Vec<WatchEvent>, FinalState) {
        let ops = vec![
            write("a", 1, Some(2), Outcome::Ok),
            write("b", 2, Some(3), Outcome::Ok),
            write("a", 3, None, Outcome::Unknown),
            write("b", 4, Some(5), Outcome::Ok),
            write("b", 99, None, Outcome::Fail),
        ];
        let events = vec![
            event(2, "a", 1),
            event(3, "b", 2),
            event(4, "a", 3),
            event(5, "b", 4),
        ];
        let end = FinalState {
            revision: 5,
            kvs: [("a".to_string(), 3), ("b".to_string(), 4)].into(),
        };
        (ops, events, end)
    }

    fn watcher(events: Vec<WatchEvent>) -> WatcherLog {
        WatcherLog {
            watcher: 0,
            resumes: Vec::new(),
            events,
        }
    }

    #[test]
    fn complete_stream_passes() {
        let (ops, events, end) = scenario();
        let problems = check(&[watcher(events.clone()), watcher(events)], &ops, &end);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn gap_is_caught() {
        let (ops, mut events, end) = scenario();
        events.remove(1);
        let problems = check(&[watcher(events)], &ops, &end);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("gap: revisions 3..=3"), "{problems:?}");
    }

    #[test]
    fn resumed_watch_that_skips_an_event_is_caught() {
        // The stream broke after revision 3 and resumed from 5 instead of 4.
        let (ops, mut events, end) = scenario();
        events.remove(2);
        let mut w = watcher(events);
        w.resumes.push(Resume {
            time: 4,
            from_revision: 5,
            node: 2,
            reason: Some("node killed".into()),
        });
        let problems = check(&[w], &ops, &end);
        assert!(problems[0].contains("gap"), "{problems:?}");
        assert!(
            problems[0].contains("node killed"),
            "context shows the resume: {problems:?}"
        );
    }

    #[test]
    fn duplicate_and_out_of_order_are_caught() {
        let (ops, events, end) = scenario();
        let mut dup = events.clone();
        dup.insert(2, events[1].clone());
        let problems = check(&[watcher(dup)], &ops, &end);
        assert!(problems[0].contains("duplicate"), "{problems:?}");
        let mut swapped = events;
        swapped.swap(1, 2);
        let problems = check(&[watcher(swapped)], &ops, &end);
        assert!(!problems.is_empty());
    }

    #[test]
    fn wrong_or_phantom_content_is_caught() {
        let (ops, mut events, end) = scenario();
        events[3].value = Some(99); // the failed write
        let problems = check(&[watcher(events)], &ops, &end);
        assert!(problems[0].contains("acknowledged as b=4"), "{problems:?}");
        let (ops, mut events, end) = scenario();
        events[2].value = Some(42); // nobody wrote 42
        let problems = check(&[watcher(events)], &ops, &end);
        assert!(problems[0].contains("matches no write"), "{problems:?}");
    }

    #[test]
    fn missing_tail_and_final_state_mismatch_are_caught() {
        let (ops, mut events, end) = scenario();
        events.pop();
        let problems = check(&[watcher(events)], &ops, &end);
        assert!(problems[0].contains("ends at revision 4"), "{problems:?}");
        let (ops, events, mut end) = scenario();
        end.kvs.insert("c".into(), 7);
        let problems = check(&[watcher(events)], &ops, &end);
        assert!(problems[0].contains("final state"), "{problems:?}");
    }

    #[test]
    fn watchers_must_agree_on_unknown_writes() {
        // The unknown write at revision 4 is legal, but two watchers cannot disagree on it.
        let (mut ops, events, end) = scenario();
        ops.push(write("a", 8, None, Outcome::Unknown));
        let mut other = events.clone();
        other[2].value = Some(8);
        let mut w2 = watcher(other);
        w2.watcher = 1;
        let problems = check(&[watcher(events), w2], &ops, &end);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("watcher 0 saw a=Some(3)")),
            "{problems:?}"
        );
    }
}
