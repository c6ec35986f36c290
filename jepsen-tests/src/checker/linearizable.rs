//! Linearizability checking: the Wing–Gong–Lowe search with memoisation of
//! (linearized-set, model state), as Porcupine implements it, with a time limit.
//!
//! Operations that may or may not have happened (`unknown` outcome) return at "infinity": the
//! search may place them anywhere after their call, including after everything else, where they
//! change nothing that was observed.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Instant;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash + Debug;
    type Input: Clone + Debug;
    type Output: Clone + Debug;
    fn init(&self) -> Self::State;
    /// The state after `input` answered `output` in `state`, or `None` if that answer is
    /// impossible there.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Option<Self::State>;
}

/// One operation as the checker sees it.
#[derive(Debug, Clone)]
pub struct Operation<I, O> {
    /// Index into the caller's list, used in reports.
    pub id: usize,
    pub call: u64,
    /// `u64::MAX` for operations whose outcome is unknown.
    pub ret: u64,
    pub input: I,
    pub output: O,
}

/// What the search concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<S> {
    Linearizable,
    /// No linearization exists. `stuck` is the operation that could not be placed after the
    /// longest linearizable prefix found (`prefix`, in linearization order), in `state`.
    Illegal {
        prefix: Vec<usize>,
        stuck: usize,
        state: S,
    },
    /// The time limit ran out; counted as a failure by callers.
    Timeout,
}

const NIL: usize = usize::MAX;

/// A node of the doubly linked list of call and return events.
#[derive(Clone, Copy)]
struct Node {
    /// Index into the operations slice.
    op: usize,
    /// For a call: the index of its return node. `NIL` for return nodes.
    matched: usize,
    prev: usize,
    next: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Checks one history (one partition, e.g. one key) against `model`, giving up at `deadline`.
pub fn check<M: Model>(
    model: &M,
    ops: &[Operation<M::Input, M::Output>],
    deadline: Instant,
) -> Verdict<M::State> {
    // Events sorted by time; at equal times calls come first, so touching operations count as
    // concurrent (the permissive reading).
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, 0, i));
        events.push((op.ret, 1, i));
    }
    events.sort_unstable();
    // Node 0 is the head sentinel.
    let mut nodes = vec![Node {
        op: NIL,
        matched: NIL,
        prev: NIL,
        next: NIL,
    }];
    let mut call_node = vec![NIL; ops.len()];
    for (_, kind, i) in &events {
        let idx = nodes.len();
        nodes.push(Node {
            op: *i,
            matched: NIL,
            prev: idx - 1,
            next: NIL,
        });
        nodes[idx - 1].next = idx;
        if *kind == 0 {
            call_node[*i] = idx;
        } else {
            nodes[call_node[*i]].matched = idx;
        }
    }

    let lift = |nodes: &mut Vec<Node>, e: usize| {
        let (p, n) = (nodes[e].prev, nodes[e].next);
        nodes[p].next = n;
        nodes[n].prev = p;
        let m = nodes[e].matched;
        let (mp, mn) = (nodes[m].prev, nodes[m].next);
        nodes[mp].next = mn;
        if mn != NIL {
            nodes[mn].prev = mp;
        }
    };
    let unlift = |nodes: &mut Vec<Node>, e: usize| {
        let m = nodes[e].matched;
        let (mp, mn) = (nodes[m].prev, nodes[m].next);
        nodes[mp].next = m;
        if mn != NIL {
            nodes[mn].prev = m;
        }
        let (p, n) = (nodes[e].prev, nodes[e].next);
        nodes[p].next = e;
        nodes[n].prev = e;
    };

    let mut state = model.init();
    let mut linearized = Bitset::new(ops.len());
    let mut cache: HashSet<(Bitset, M::State)> = HashSet::new();
    // Stack of (call node, state before it).
    let mut calls: Vec<(usize, M::State)> = Vec::new();
    let mut best: Option<(Vec<usize>, usize, M::State)> = None;
    let mut entry = nodes[0].next;
    let mut steps: u64 = 0;
    while nodes[0].next != NIL {
        steps += 1;
        // Look at the clock on the first step and every 4096 after.
        if steps % 4096 == 1 && Instant::now() >= deadline {
            return Verdict::Timeout;
        }
        let node = nodes[entry];
        if node.matched != NIL {
            let op = &ops[node.op];
            if let Some(next) = model.step(&state, &op.input, &op.output) {
                let mut now = linearized.clone();
                now.set(node.op);
                if cache.insert((now.clone(), next.clone())) {
                    calls.push((entry, std::mem::replace(&mut state, next)));
                    linearized = now;
                    lift(&mut nodes, entry);
                    entry = nodes[0].next;
                    continue;
                }
            }
            entry = node.next;
        } else {
            // A return: its operation had to be linearized by now and was not. Remember the
            // deepest such dead end for the report, then backtrack.
            if best.as_ref().is_none_or(|(p, _, _)| calls.len() > p.len()) {
                let prefix = calls.iter().map(|(e, _)| ops[nodes[*e].op].id).collect();
                best = Some((prefix, ops[node.op].id, state.clone()));
            }
            let Some((top, before)) = calls.pop() else {
                let (prefix, stuck, state) = best.expect("a dead end was recorded");
                return Verdict::Illegal {
                    prefix,
                    stuck,
                    state,
                };
            };
            state = before;
            linearized.clear(nodes[top].op);
            unlift(&mut nodes, top);
            entry = nodes[top].next;
        }
    }
    Verdict::Linearizable
}
