//! Keeper durability checker (K2): every acknowledged write is readable after the run, after a
//! kill -9 of every node too, and on every replica; nothing that failed or was never written
//! shows up. The workload writes each durability key once, with a unique value.

use std::collections::BTreeMap;
use std::collections::HashMap;

use crate::history::Op;
use crate::history::OpKind;
use crate::history::Outcome;

/// Compares what was written under `prefix` with `read` (every key under the prefix and its
/// value, read back at some point after the run). `when` names that point in messages.
pub fn check(ops: &[Op], prefix: &str, read: &BTreeMap<String, u64>, when: &str) -> Vec<String> {
    let mut fate: HashMap<&str, (u64, Outcome)> = HashMap::new();
    for op in ops {
        if op.op != OpKind::Put || !op.args.key.starts_with(prefix) {
            continue;
        }
        if let Some(v) = op.args.value {
            fate.insert(&op.args.key, (v, op.outcome));
        }
    }
    let mut problems = Vec::new();
    let mut lost: Vec<String> = Vec::new();
    for (key, (value, outcome)) in &fate {
        if *outcome != Outcome::Ok {
            continue;
        }
        match read.get(*key) {
            Some(v) if v == value => {}
            Some(v) => problems.push(format!(
                "{when}: acknowledged write {key}={value} reads back as {v}"
            )),
            None => lost.push(format!("{key}={value}")),
        }
    }
    if !lost.is_empty() {
        lost.sort();
        let total = lost.len();
        lost.truncate(10);
        problems.push(format!(
            "{when}: {total} acknowledged writes lost, e.g. {}",
            lost.join(", ")
        ));
    }
    for (key, value) in read {
        match fate.get(key.as_str()) {
            Some((v, Outcome::Fail)) if v == value => problems.push(format!(
                "{when}: {key}={value} is present although its write failed"
            )),
            Some((v, _)) if v == value => {}
            _ => problems.push(format!(
                "{when}: {key}={value} is present but nobody wrote it"
            )),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Args;

    fn put(key: &str, value: u64, outcome: Outcome) -> Op {
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
            result: None,
            error: None,
            node: None,
        }
    }

    fn ops() -> Vec<Op> {
        vec![
            put("d/1", 1, Outcome::Ok),
            put("d/2", 2, Outcome::Unknown),
            put("d/3", 3, Outcome::Fail),
            put("d/4", 4, Outcome::Ok),
        ]
    }

    #[test]
    fn all_acknowledged_present_passes_with_or_without_unknown() {
        let read: BTreeMap<String, u64> = [("d/1".into(), 1), ("d/4".into(), 4)].into();
        assert!(check(&ops(), "d/", &read, "end").is_empty());
        let mut with_unknown = read;
        with_unknown.insert("d/2".into(), 2);
        assert!(check(&ops(), "d/", &with_unknown, "end").is_empty());
    }

    #[test]
    fn lost_write_is_caught() {
        let read: BTreeMap<String, u64> = [("d/1".into(), 1)].into();
        let problems = check(&ops(), "d/", &read, "after kill -9 of all nodes");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("1 acknowledged writes lost, e.g. d/4=4"),
            "{problems:?}"
        );
        assert!(problems[0].starts_with("after kill -9 of all nodes"));
    }

    #[test]
    fn failed_or_phantom_write_present_is_caught() {
        let read: BTreeMap<String, u64> = [
            ("d/1".into(), 1),
            ("d/3".into(), 3),
            ("d/4".into(), 4),
            ("d/9".into(), 9),
        ]
        .into();
        let problems = check(&ops(), "d/", &read, "end");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("d/3=3 is present although its write failed"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("d/9=9 is present but nobody wrote it"))
        );
    }
}
