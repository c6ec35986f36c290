//! jepsen-tests: fault injection against real Longlink processes, in the spirit of Jepsen and
//! etcd's robustness tests. Processes run in their own network namespaces so partitions are
//! real; clients record every operation; checkers decide whether DESIGN.md §7 held.
//!
//! - [`net`]: namespaces, veths, a bridge, iptables partitions, and cleanup on every exit path.
//! - [`cluster`]: keeper processes in those namespaces (start, kill -9, pause, membership).
//! - [`nemesis`]: faults on a schedule, each recorded in the history.
//! - [`workload`]: clients that record `{client, op, args, call_time, return_time, outcome}`.
//! - [`checker`]: linearizability (WGL), watch and durability checkers.
//! - [`report`]: what a run found, the steps every run shares, and the summary of many.
//! - [`run`]: one keeper run end to end.
//! - [`svc`], [`svcnemesis`], [`keeperio`]: register / room / center processes, faults on
//!   them, and the harness's own keeper traffic.
//! - [`regwork`], [`run_register`]: test rooms and lookups against registers (R1-R3).
//! - [`pushwork`], [`run_push`]: devices and pushes through center (P1-P2).

pub mod checker;
pub mod cluster;
pub mod guard;
pub mod history;
pub mod keeperio;
pub mod nemesis;
pub mod net;
pub mod pushwork;
pub mod regwork;
pub mod report;
pub mod run;
pub mod run_push;
pub mod run_register;
pub mod svc;
pub mod svcnemesis;
pub mod workload;
