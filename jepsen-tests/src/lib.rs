//! jepsen-tests: fault injection against real Longlink processes, in the spirit of Jepsen and
//! etcd's robustness tests. Processes run in their own network namespaces so partitions are
//! real; clients record every operation; checkers decide whether DESIGN.md §7 held.
//!
//! - [`net`]: namespaces, veths, a bridge, iptables partitions, and cleanup on every exit path.
//! - [`cluster`]: keeper processes in those namespaces (start, kill -9, pause, membership).
//! - [`nemesis`]: faults on a schedule, each recorded in the history.
//! - [`workload`]: clients that record `{client, op, args, call_time, return_time, outcome}`.
//! - [`checker`]: linearizability (WGL), watch and durability checkers.
//! - [`run`]: one run end to end, and the summary of many.

pub mod checker;
pub mod cluster;
pub mod guard;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod run;
pub mod workload;
