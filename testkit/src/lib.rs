//! Test harness shared by integration tests: starts the real binaries as processes, writes their
//! config to a temp dir, captures their logs to files, waits for readiness by polling, and prints
//! the tail of every log when a test fails (processes are killed on drop).

mod bin;
mod keeper;
mod process;

pub use bin::bin;
pub use keeper::KeeperCluster;
pub use keeper::KeeperNode;
pub use process::Process;
pub use process::free_port;
pub use process::wait_until;
