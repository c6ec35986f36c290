//! Deliberate bugs for jepsen-tests, which must prove that its checkers can fail.
//!
//! Only the `unsafe-stale-reads` cargo feature compiles them in; the workspace's test build turns
//! it on (keeper's dev-dependency on itself), release builds of the binaries never have it. Even
//! then nothing changes until the process asks for it with the hidden `--unsafe-stale-reads`
//! flag.

#[cfg(feature = "unsafe-stale-reads")]
static STALE_READS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes linearizable reads skip the ReadIndex barrier and answer from the local replica.
#[cfg(feature = "unsafe-stale-reads")]
pub fn enable_stale_reads() {
    STALE_READS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether reads skip ReadIndex (never, unless the fault was compiled in and enabled).
pub(crate) fn stale_reads() -> bool {
    #[cfg(feature = "unsafe-stale-reads")]
    {
        STALE_READS.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "unsafe-stale-reads"))]
    {
        false
    }
}
