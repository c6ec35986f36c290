//! Keeper register workload checker (K1): each key is a read/write/compare-and-swap register,
//! checked for linearizability key by key (P-compositionality, as Porcupine partitions).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;
use std::time::Instant;

use super::linearizable::Model;
use super::linearizable::Operation;
use super::linearizable::Verdict;
use super::linearizable::check;
use crate::history::Op;
use crate::history::OpKind;
use crate::history::Outcome;

/// A register holding `None` (absent key) or a unique value.
pub struct Register;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Get,
    Put(u64),
    Cas { expect: u64, value: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Get(Option<u64>),
    Put,
    Cas(bool),
    /// Outcome unknown: the write may have happened (at any time after its call) or not.
    Unknown,
}

impl Model for Register {
    type State = Option<u64>;
    type Input = Input;
    type Output = Output;

    fn init(&self) -> Option<u64> {
        None
    }

    fn step(&self, state: &Option<u64>, input: &Input, output: &Output) -> Option<Option<u64>> {
        match (input, output) {
            (Input::Get, Output::Get(v)) => (state == v).then_some(*state),
            (Input::Get, _) => None,
            (Input::Put(v), _) => Some(Some(*v)),
            (Input::Cas { expect, value }, Output::Cas(true)) => {
                (*state == Some(*expect)).then_some(Some(*value))
            }
            (Input::Cas { expect, .. }, Output::Cas(false)) => {
                (*state != Some(*expect)).then_some(*state)
            }
            // If it happened, it swapped exactly when the comparison held.
            (Input::Cas { expect, value }, _) => Some(if *state == Some(*expect) {
                Some(*value)
            } else {
                *state
            }),
        }
    }
}

/// Converts recorded operations on one key into checker operations: failed operations never
/// happened and are dropped, and so are reads with an unknown outcome (they changed nothing).
fn convert(ops: &[(usize, &Op)]) -> Result<Vec<Operation<Input, Output>>, String> {
    let mut out = Vec::new();
    for (id, op) in ops {
        if op.outcome == Outcome::Fail || (op.outcome == Outcome::Unknown && op.op == OpKind::Get) {
            continue;
        }
        let input = match op.op {
            OpKind::Get => Input::Get,
            OpKind::Put => Input::Put(
                op.args
                    .value
                    .ok_or_else(|| format!("put #{id} without a value"))?,
            ),
            OpKind::Cas => Input::Cas {
                expect: op
                    .args
                    .expect
                    .ok_or_else(|| format!("cas #{id} without expect"))?,
                value: op
                    .args
                    .value
                    .ok_or_else(|| format!("cas #{id} without a value"))?,
            },
        };
        let result = op.result.clone().unwrap_or_default();
        let (output, ret) = match op.outcome {
            Outcome::Unknown => (Output::Unknown, u64::MAX),
            _ => (
                match op.op {
                    OpKind::Get => Output::Get(result.value),
                    OpKind::Put => Output::Put,
                    OpKind::Cas => Output::Cas(
                        result
                            .succeeded
                            .ok_or_else(|| format!("ok cas #{id} without `succeeded`"))?,
                    ),
                },
                op.return_time,
            ),
        };
        out.push(Operation {
            id: *id,
            call: op.call_time,
            ret,
            input,
            output,
        });
    }
    Ok(out)
}

/// The verdict for one key.
#[derive(Debug, Clone)]
pub struct KeyVerdict {
    pub key: String,
    pub ops: usize,
    pub result: Result<(), String>,
}

/// Checks every key whose name starts with `prefix`; all keys share one time limit.
pub fn check_history(ops: &[Op], prefix: &str, limit: Duration) -> Vec<KeyVerdict> {
    let deadline = Instant::now() + limit;
    let mut by_key: BTreeMap<&str, Vec<(usize, &Op)>> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        if op.args.key.starts_with(prefix) {
            by_key.entry(&op.args.key).or_default().push((i, op));
        }
    }
    let mut verdicts = Vec::new();
    for (key, key_ops) in by_key {
        let result = match convert(&key_ops) {
            Err(e) => Err(format!("malformed history: {e}")),
            Ok(converted) => match check(&Register, &converted, deadline) {
                Verdict::Linearizable => Ok(()),
                Verdict::Timeout => Err(format!(
                    "checker timed out after {limit:?} ({} operations on this key): counted as a failure",
                    converted.len()
                )),
                Verdict::Illegal {
                    prefix,
                    stuck,
                    state,
                } => Err(report(ops, &prefix, stuck, state)),
            },
        };
        verdicts.push(KeyVerdict {
            key: key.to_string(),
            ops: key_ops.len(),
            result,
        });
    }
    verdicts
}

/// The smallest useful slice of the key's history around the failure: the last writes of the
/// longest linearizable prefix (how the register got its value), and every operation that
/// overlapped the one that could not be placed.
fn report(ops: &[Op], prefix: &[usize], stuck: usize, state: Option<u64>) -> String {
    let bad = &ops[stuck];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "not linearizable: after {} operations the register holds {}, and no order explains\n  {}",
        prefix.len(),
        show_value(state),
        describe(bad)
    );
    let tail: Vec<usize> = prefix.iter().rev().take(4).rev().copied().collect();
    let bad_ret = if bad.outcome == Outcome::Unknown {
        u64::MAX
    } else {
        bad.return_time
    };
    let mut window: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(i, op)| {
            op.args.key == bad.args.key
                && *i != stuck
                && op.outcome != Outcome::Fail
                && op.call_time <= bad_ret
                && (op.outcome == Outcome::Unknown || op.return_time >= bad.call_time)
        })
        .map(|(i, _)| i)
        .collect();
    // If the value read came from a write, show that write too.
    if let Some(v) = bad.result.as_ref().and_then(|r| r.value)
        && let Some(w) = ops
            .iter()
            .position(|op| op.args.value == Some(v) && op.args.key == bad.args.key)
    {
        window.push(w);
    }
    let _ = writeln!(out, "  last operations linearized before it:");
    for i in &tail {
        let _ = writeln!(out, "    {}", describe(&ops[*i]));
    }
    window.retain(|i| !tail.contains(i));
    window.sort_by_key(|i| ops[*i].call_time);
    window.dedup();
    let _ = writeln!(
        out,
        "  operations concurrent with it (or the write it read):"
    );
    for i in window.iter().take(30) {
        let _ = writeln!(out, "    {}", describe(&ops[*i]));
    }
    if window.len() > 30 {
        let _ = writeln!(out, "    ... {} more", window.len() - 30);
    }
    out
}

fn show_value(v: Option<u64>) -> String {
    v.map_or_else(|| "nothing".to_string(), |v| v.to_string())
}

/// One line per operation: `[call..return] client op(args) -> outcome result`.
pub fn describe(op: &Op) -> String {
    let secs = |t: u64| format!("{:.3}s", t as f64 / 1e9);
    let ret = if op.outcome == Outcome::Unknown {
        format!("{}(gave up)", secs(op.return_time))
    } else {
        secs(op.return_time)
    };
    let args = match op.op {
        OpKind::Get => op.args.key.clone(),
        OpKind::Put => format!("{}, {}", op.args.key, show_value(op.args.value)),
        OpKind::Cas => format!(
            "{}, {} -> {}",
            op.args.key,
            show_value(op.args.expect),
            show_value(op.args.value)
        ),
    };
    let result = match (&op.outcome, &op.result) {
        (Outcome::Ok, Some(r)) => match op.op {
            OpKind::Get => format!(" = {}", show_value(r.value)),
            OpKind::Cas => format!(" swapped={}", r.succeeded.unwrap_or(false)),
            OpKind::Put => String::new(),
        },
        _ => String::new(),
    };
    let node = op.node.map(|n| format!(" @n{}", n + 1)).unwrap_or_default();
    format!(
        "[{} .. {}] client {}{} {:?}({}) -> {:?}{}",
        secs(op.call_time),
        ret,
        op.client,
        node,
        op.op,
        args,
        op.outcome,
        result
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Args;
    use crate::history::OpResult;

    /// Builds histories tersely: times in milliseconds.
    struct H(Vec<Op>);

    impl H {
        fn new() -> Self {
            Self(Vec::new())
        }
        fn push(
            &mut self,
            client: u64,
            op: OpKind,
            args: Args,
            t: (u64, u64),
            outcome: Outcome,
            result: Option<OpResult>,
        ) -> &mut Self {
            self.0.push(Op {
                client,
                op,
                args,
                call_time: t.0 * 1_000_000,
                return_time: t.1 * 1_000_000,
                outcome,
                result,
                error: None,
                node: None,
            });
            self
        }
        fn put(&mut self, c: u64, v: u64, t: (u64, u64)) -> &mut Self {
            self.put_outcome(c, v, t, Outcome::Ok)
        }
        fn put_outcome(&mut self, c: u64, v: u64, t: (u64, u64), o: Outcome) -> &mut Self {
            let args = Args {
                key: "k".into(),
                value: Some(v),
                expect: None,
            };
            let result = (o == Outcome::Ok).then(OpResult::default);
            self.push(c, OpKind::Put, args, t, o, result)
        }
        fn get(&mut self, c: u64, v: Option<u64>, t: (u64, u64)) -> &mut Self {
            let args = Args {
                key: "k".into(),
                value: None,
                expect: None,
            };
            let result = Some(OpResult {
                value: v,
                ..Default::default()
            });
            self.push(c, OpKind::Get, args, t, Outcome::Ok, result)
        }
        fn cas(&mut self, c: u64, from: u64, to: u64, ok: bool, t: (u64, u64)) -> &mut Self {
            let args = Args {
                key: "k".into(),
                value: Some(to),
                expect: Some(from),
            };
            let result = Some(OpResult {
                succeeded: Some(ok),
                ..Default::default()
            });
            self.push(c, OpKind::Cas, args, t, Outcome::Ok, result)
        }
        fn verdict(&self) -> Result<(), String> {
            let v = check_history(&self.0, "", Duration::from_secs(10));
            assert_eq!(v.len(), 1);
            v[0].result.clone()
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = H::new();
        h.get(0, None, (0, 1))
            .put(0, 1, (2, 3))
            .get(1, Some(1), (4, 5))
            .cas(1, 1, 2, true, (6, 7))
            .cas(0, 1, 3, false, (8, 9))
            .get(0, Some(2), (10, 11));
        assert_eq!(h.verdict(), Ok(()));
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        // A read overlapping a write may return the old or the new value.
        let mut old = H::new();
        old.put(0, 1, (0, 1))
            .put(1, 2, (2, 10))
            .get(2, Some(1), (3, 4));
        assert_eq!(old.verdict(), Ok(()));
        let mut new = H::new();
        new.put(0, 1, (0, 1))
            .put(1, 2, (2, 10))
            .get(2, Some(2), (3, 4));
        assert_eq!(new.verdict(), Ok(()));
        // Two overlapping reads may disagree only in the write's favour once one has seen it:
        // new then old is legal if the reads overlap each other and the write.
        let mut both = H::new();
        both.put(0, 1, (0, 1))
            .put(1, 2, (2, 20))
            .get(2, Some(2), (3, 12))
            .get(3, Some(1), (4, 11));
        assert_eq!(both.verdict(), Ok(()));
    }

    #[test]
    fn stale_read_is_caught() {
        // The read starts after the write of 2 was acknowledged but returns 1.
        let mut h = H::new();
        h.put(0, 1, (0, 1))
            .put(1, 2, (2, 3))
            .get(2, Some(1), (4, 5));
        let err = h.verdict().unwrap_err();
        assert!(err.contains("not linearizable"), "{err}");
        assert!(err.contains("Get(k)"), "report names the read: {err}");
    }

    #[test]
    fn sequential_reads_going_back_in_time_are_caught() {
        // Both reads overlap the write, but the second starts after the first returned: once
        // a read saw 2, a later read must not see 1.
        let mut h = H::new();
        h.put(0, 1, (0, 1))
            .put(1, 2, (2, 20))
            .get(2, Some(2), (3, 4))
            .get(3, Some(1), (5, 6));
        assert!(h.verdict().is_err());
    }

    #[test]
    fn lost_write_is_caught() {
        // An acknowledged write vanishes: a later read sees the key absent.
        let mut h = H::new();
        h.put(0, 7, (0, 1)).get(1, None, (2, 3));
        assert!(h.verdict().is_err());
    }

    #[test]
    fn cas_anomalies_are_caught() {
        // Two compare-and-swaps from the same value both succeed.
        let mut double = H::new();
        double
            .put(0, 1, (0, 1))
            .cas(1, 1, 2, true, (2, 5))
            .cas(2, 1, 3, true, (3, 6));
        assert!(double.verdict().is_err());
        // A swap succeeds although the value differs.
        let mut wrong = H::new();
        wrong.put(0, 1, (0, 1)).cas(1, 9, 2, true, (2, 3));
        assert!(wrong.verdict().is_err());
        // A swap fails although the value matched and nothing else ran.
        let mut refused = H::new();
        refused.put(0, 1, (0, 1)).cas(1, 1, 2, false, (2, 3));
        assert!(refused.verdict().is_err());
        // A later read misses a successful swap.
        let mut missed = H::new();
        missed
            .put(0, 1, (0, 1))
            .cas(1, 1, 2, true, (2, 3))
            .get(2, Some(1), (4, 5));
        assert!(missed.verdict().is_err());
    }

    #[test]
    fn concurrent_cas_one_winner_is_legal() {
        let mut h = H::new();
        h.put(0, 1, (0, 1))
            .cas(1, 1, 2, true, (2, 6))
            .cas(2, 1, 3, false, (3, 5))
            .get(3, Some(2), (7, 8));
        assert_eq!(h.verdict(), Ok(()));
    }

    #[test]
    fn unknown_write_may_take_effect_late_or_never() {
        // The write timed out at 5 ms but is first seen at 30 ms: legal.
        let mut late = H::new();
        late.put(0, 1, (0, 1))
            .put_outcome(1, 2, (2, 5), Outcome::Unknown)
            .get(2, Some(1), (10, 11))
            .get(2, Some(2), (30, 31));
        assert_eq!(late.verdict(), Ok(()));
        let mut never = H::new();
        never
            .put(0, 1, (0, 1))
            .put_outcome(1, 2, (2, 5), Outcome::Unknown)
            .get(2, Some(1), (30, 31));
        assert_eq!(never.verdict(), Ok(()));
        // But once seen, it cannot be undone.
        let mut flicker = H::new();
        flicker
            .put(0, 1, (0, 1))
            .put_outcome(1, 2, (2, 5), Outcome::Unknown)
            .get(2, Some(2), (10, 11))
            .get(2, Some(1), (30, 31));
        assert!(flicker.verdict().is_err());
    }

    #[test]
    fn failed_write_must_not_be_observed() {
        let mut h = H::new();
        h.put(0, 1, (0, 1))
            .put_outcome(1, 2, (2, 3), Outcome::Fail)
            .get(2, Some(2), (4, 5));
        assert!(h.verdict().is_err());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = H::new();
        h.put(0, 1, (0, 1)).get(1, Some(1), (2, 3));
        let mut other = h.0[1].clone();
        other.args.key = "other".into();
        other.result = Some(OpResult {
            value: Some(1),
            ..Default::default()
        });
        h.0.push(other);
        let v = check_history(&h.0, "", Duration::from_secs(5));
        assert_eq!(v.len(), 2);
        assert!(v.iter().any(|k| k.key == "k" && k.result.is_ok()));
        assert!(v.iter().any(|k| k.key == "other" && k.result.is_err()));
    }

    #[test]
    fn timeout_counts_as_failure() {
        // Many concurrent unknown writes and reads that force a wide search, with no time.
        let mut h = H::new();
        for i in 0..200 {
            h.put_outcome(i, i + 1, (0, 1), Outcome::Unknown);
        }
        for i in 0..200 {
            h.get(1000 + i, Some(200 - i), (10 + 2 * i, 11 + 2 * i));
        }
        let v = check_history(&h.0, "", Duration::ZERO);
        let err = v[0].result.clone().unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn long_concurrent_history_checks_quickly() {
        // 4 clients, 2000 overlapping operations, all consistent with a single order.
        let mut h = H::new();
        let mut value = 0;
        for round in 0..500u64 {
            let t = round * 10;
            value += 1;
            h.put(0, value, (t, t + 6));
            h.get(1, Some(value - 1).filter(|v| *v > 0), (t, t + 1));
            h.get(2, Some(value), (t + 7, t + 8));
            h.cas(3, value, value, true, (t + 8, t + 9));
        }
        let started = Instant::now();
        assert_eq!(h.verdict(), Ok(()));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
