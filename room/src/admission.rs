//! Who may hold a connection: deny/allow CIDRs, a per-IP cap and a cap on all connections (a
//! counting semaphore whose capacity follows the live `room` config). A [`Permit`] is held for the
//! life of a connection and released on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use ipnet::IpNet;

use crate::config::RoomLimits;
use crate::error::code;

/// Why a connection is refused before its first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

/// Parsed CIDR lists for one version of the limits.
#[derive(Debug)]
struct Nets {
    /// The limits these were parsed from (compared by pointer to notice a new version).
    from: Arc<RoomLimits>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// Connection admission shared by every listener.
#[derive(Debug)]
pub struct Admission {
    /// Connections holding a permit.
    count: AtomicUsize,
    /// Connections per source IP; entries are removed at zero so the map holds only live IPs.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    nets: Mutex<Option<Nets>>,
}

/// Held by one connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.count.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self
            .admission
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new() -> Arc<Admission> {
        Arc::new(Admission {
            count: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            nets: Mutex::new(None),
        })
    }

    /// Connections currently admitted.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn check_nets(&self, ip: IpAddr, limits: &Arc<RoomLimits>) -> Result<(), Refusal> {
        let mut nets = self.nets.lock().unwrap_or_else(|e| e.into_inner());
        if nets.as_ref().is_none_or(|n| !Arc::ptr_eq(&n.from, limits)) {
            // Validated before it was applied; an unparsable entry is skipped, never fatal.
            let (allow, deny) = limits.networks().unwrap_or_default();
            *nets = Some(Nets {
                from: limits.clone(),
                allow,
                deny,
            });
        }
        let nets = nets.as_ref().expect("just set");
        let ip = canonical(ip);
        if nets.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal {
                code: code::FORBIDDEN,
                message: format!("{ip} is in deny_cidrs"),
            });
        }
        if !nets.allow.is_empty() && !nets.allow.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal {
                code: code::FORBIDDEN,
                message: format!("{ip} is not in allow_cidrs"),
            });
        }
        Ok(())
    }

    /// Admits a connection from `ip` under `limits`, or says why not.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Arc<RoomLimits>,
    ) -> Result<Permit, Refusal> {
        let ip = canonical(ip);
        self.check_nets(ip, limits)?;
        // Reserve globally first, then per IP; undo on refusal.
        let prev = self.count.fetch_add(1, Ordering::AcqRel);
        if prev >= limits.max_connections {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal {
                code: code::TOO_MANY_CONNECTIONS,
                message: format!(
                    "room holds max_connections = {} connections",
                    limits.max_connections
                ),
            });
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_ip {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal {
                code: code::TOO_MANY_FROM_IP,
                message: format!(
                    "{ip} holds max_connections_per_ip = {} connections",
                    limits.max_connections_per_ip
                ),
            });
        }
        *n += 1;
        Ok(Permit {
            admission: self.clone(),
            ip,
        })
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) are matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut RoomLimits)) -> Arc<RoomLimits> {
        let mut l = RoomLimits::default();
        f(&mut l);
        Arc::new(l)
    }

    #[test]
    fn caps_and_release() {
        let a = Admission::new();
        let l = limits(|l| {
            l.max_connections = 3;
            l.max_connections_per_ip = 2;
        });
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = a.admit(ip1, &l).unwrap();
        let _p2 = a.admit(ip1, &l).unwrap();
        assert_eq!(a.admit(ip1, &l).unwrap_err().code, code::TOO_MANY_FROM_IP);
        let _p3 = a.admit(ip2, &l).unwrap();
        let err = a.admit(ip2, &l).unwrap_err();
        assert_eq!(err.code, code::TOO_MANY_CONNECTIONS);
        assert!(
            err.message.contains("max_connections = 3"),
            "{}",
            err.message
        );
        drop(p1);
        assert_eq!(a.count(), 2);
        a.admit(ip1, &l).unwrap();
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let a = Admission::new();
        let l = limits(|l| {
            l.allow_cidrs = vec!["10.0.0.0/8".into()];
            l.deny_cidrs = vec!["10.1.0.0/16".into()];
        });
        assert!(a.admit("10.2.3.4".parse().unwrap(), &l).is_ok());
        assert_eq!(
            a.admit("10.1.3.4".parse().unwrap(), &l).unwrap_err().code,
            code::FORBIDDEN
        );
        assert_eq!(
            a.admit("192.168.1.1".parse().unwrap(), &l)
                .unwrap_err()
                .code,
            code::FORBIDDEN
        );
        // IPv4-mapped IPv6 is matched as IPv4.
        assert!(a.admit("::ffff:10.2.3.4".parse().unwrap(), &l).is_ok());
        // A new version of the limits is noticed.
        let open = limits(|_| {});
        assert!(a.admit("192.168.1.1".parse().unwrap(), &open).is_ok());
    }
}
