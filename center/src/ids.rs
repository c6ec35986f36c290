//! Ids for pushes, broadcasts and webhook events: unique across processes without coordination
//! (a per-process prefix from start time and pid, then a counter).

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

static NEXT: AtomicU64 = AtomicU64::new(0);
static PREFIX: OnceLock<String> = OnceLock::new();

/// A new id such as `m-5f3a9c1e2b7d-1f`: `kind`, a process prefix, a counter (all hex).
pub fn new_id(kind: &str) -> String {
    let prefix = PREFIX.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mixed = xxhash_rust::xxh3::xxh3_64(
            &[
                nanos.to_le_bytes(),
                u64::from(std::process::id()).to_le_bytes(),
            ]
            .concat(),
        );
        format!("{:012x}", mixed & 0xffff_ffff_ffff)
    });
    format!("{kind}-{prefix}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_typed() {
        let a = super::new_id("m");
        let b = super::new_id("m");
        assert_ne!(a, b);
        assert!(a.starts_with("m-"));
        assert_eq!(a.rsplit_once('-').unwrap().0, b.rsplit_once('-').unwrap().0);
    }
}
