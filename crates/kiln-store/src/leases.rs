//! Network address leases (`net_leases`): which sandbox holds which IPv4 address of which
//! pool. Generic over pools: the bridge mode uses pool `bridge`, the user modes `user`.
//!
//! Owns the allocation *transaction* (lowest free address, then insert, under one
//! `BEGIN IMMEDIATE`), so two daemons or two connections never hand out one address twice.
//! Must not: know what a pool's addresses are used for, touch links or firewall rules.
//!
//! Invariants (enforced by the schema): an address is leased at most once (primary key), a
//! sandbox holds at most one address per pool (unique index). Host addresses handed out are
//! never the subnet's network address, its first host address (the gateway) or its broadcast.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_api_types::SandboxId;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::{Store, StoreError, query};

/// A pool's subnet: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSubnet {
    /// The network address (host bits are ignored).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl LeaseSubnet {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        }
    }

    fn network(self) -> u32 {
        u32::from(self.addr) & self.mask()
    }

    fn broadcast(self) -> u32 {
        self.network() | !self.mask()
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.network()
    }

    /// The first and last address a sandbox may get (after network and gateway, before
    /// broadcast), or `None` when there is none.
    fn host_range(self) -> Option<(u32, u32)> {
        if self.prefix > 30 {
            return None;
        }
        Some((self.network() + 2, self.broadcast() - 1))
    }
}

impl std::fmt::Display for LeaseSubnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network()), self.prefix)
    }
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLease {
    /// The leased address.
    pub ip: Ipv4Addr,
    /// The pool it came from (`bridge`, `user`).
    pub pool: String,
    /// The sandbox holding it.
    pub sandbox_id: SandboxId,
    /// The MAC the sandbox's interface uses with it.
    pub mac: String,
    /// When it was leased (seconds since the Unix epoch).
    pub created_unix: u64,
}

const SELECT: &str = "SELECT ip, pool, sandbox_id, mac, created_unix FROM net_leases";

fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn parse(raw: (String, String, String, String, i64)) -> Result<NetLease, StoreError> {
    let (ip, pool, sandbox_id, mac, created) = raw;
    Ok(NetLease {
        ip: Ipv4Addr::from_str(&ip)
            .map_err(|_| StoreError::Corrupt(format!("lease address {ip:?}")))?,
        sandbox_id: SandboxId::from_str(&sandbox_id)
            .map_err(|_| StoreError::Corrupt(format!("lease sandbox id {sandbox_id:?}")))?,
        pool,
        mac,
        created_unix: u64::try_from(created).unwrap_or(0),
    })
}

impl Store {
    /// Leases the lowest free address of `subnet` in `pool` to `sandbox_id`, or returns the
    /// address it already holds in that pool (then `mac` is not changed). Allocation and
    /// insert are one immediate transaction: concurrent callers (other connections, other
    /// processes) serialize on the database's write lock.
    pub fn lease_acquire(
        &self,
        pool: &str,
        subnet: LeaseSubnet,
        sandbox_id: &SandboxId,
        mac: &str,
    ) -> Result<Ipv4Addr, StoreError> {
        let q = query("acquire a network lease");
        let (first, last) = subnet
            .host_range()
            .ok_or_else(|| StoreError::SubnetTooSmall(subnet.to_string()))?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&q)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT ip FROM net_leases WHERE pool = ?1 AND sandbox_id = ?2",
                params![pool, sandbox_id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(&q)?;
        if let Some(ip) = existing {
            return Ipv4Addr::from_str(&ip)
                .map_err(|_| StoreError::Corrupt(format!("lease address {ip:?}")));
        }
        // Every leased address in the subnet counts, whatever its pool: the primary key is
        // the address alone.
        let used: HashSet<u32> = {
            let mut stmt = tx.prepare_cached("SELECT ip FROM net_leases").map_err(&q)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(&q)?;
            let mut used = HashSet::new();
            for ip in rows {
                if let Ok(ip) = Ipv4Addr::from_str(&ip.map_err(&q)?)
                    && subnet.contains(ip)
                {
                    used.insert(u32::from(ip));
                }
            }
            used
        };
        let Some(ip) = (first..=last).find(|a| !used.contains(a)) else {
            return Err(StoreError::PoolExhausted {
                pool: pool.to_owned(),
                subnet: subnet.to_string(),
                capacity: u64::from(last - first) + 1,
            });
        };
        let ip = Ipv4Addr::from(ip);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tx.execute(
            "INSERT INTO net_leases (ip, pool, sandbox_id, mac, created_unix)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                ip.to_string(),
                pool,
                sandbox_id.as_str(),
                mac,
                i64::try_from(now).unwrap_or(i64::MAX)
            ],
        )
        .map_err(&q)?;
        tx.commit().map_err(&q)?;
        Ok(ip)
    }

    /// Releases every lease `sandbox_id` holds (in any pool); returns how many there were.
    pub fn lease_release(&self, sandbox_id: &SandboxId) -> Result<usize, StoreError> {
        self.conn()
            .execute(
                "DELETE FROM net_leases WHERE sandbox_id = ?1",
                params![sandbox_id.as_str()],
            )
            .map_err(query("release a network lease"))
    }

    /// Every lease, ordered by pool then address.
    pub fn leases(&self) -> Result<Vec<NetLease>, StoreError> {
        let q = query("list network leases");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(SELECT).map_err(&q)?;
        let raw = stmt
            .query_map([], read)
            .map_err(&q)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(&q)?;
        let mut out = raw.into_iter().map(parse).collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
        Ok(out)
    }

    /// The lease `sandbox_id` holds (a sandbox has one network, so one lease; if it held
    /// several, the first by pool name).
    pub fn lease_of(&self, sandbox_id: &SandboxId) -> Result<Option<NetLease>, StoreError> {
        let q = query("read a network lease");
        let conn = self.conn();
        let raw = conn
            .query_row(
                &format!("{SELECT} WHERE sandbox_id = ?1 ORDER BY pool LIMIT 1"),
                params![sandbox_id.as_str()],
                read,
            )
            .optional()
            .map_err(&q)?;
        raw.map(parse).transpose()
    }

    /// Releases the leases of every sandbox not in `live` (the janitor, after a crash);
    /// returns the released leases. One transaction.
    pub fn leases_release_except(
        &self,
        live: &HashSet<SandboxId>,
    ) -> Result<Vec<NetLease>, StoreError> {
        let q = query("release dead sandboxes' network leases");
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&q)?;
        let raw = {
            let mut stmt = tx.prepare_cached(SELECT).map_err(&q)?;
            stmt.query_map([], read)
                .map_err(&q)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&q)?
        };
        let mut released = Vec::new();
        for r in raw {
            let ip = r.0.clone();
            // A row this binary cannot read belongs to no live sandbox: release it too.
            let dead = match parse(r.clone()) {
                Ok(lease) if live.contains(&lease.sandbox_id) => None,
                Ok(lease) => Some(Some(lease)),
                Err(_) => Some(None),
            };
            if let Some(lease) = dead {
                tx.execute("DELETE FROM net_leases WHERE ip = ?1", params![ip])
                    .map_err(&q)?;
                released.extend(lease);
            }
        }
        tx.commit().map_err(&q)?;
        released.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(a: [u8; 4], prefix: u8) -> LeaseSubnet {
        LeaseSubnet {
            addr: Ipv4Addr::from(a),
            prefix,
        }
    }

    fn id(n: u64) -> SandboxId {
        format!("sb-{n:012x}").parse().unwrap()
    }

    #[test]
    fn lease_acquire_gives_lowest_free_after_gateway() {
        let s = Store::open_in_memory().unwrap();
        let sub = net([10, 9, 0, 0], 24);
        assert_eq!(
            s.lease_acquire("bridge", sub, &id(1), "02:00:00:00:00:01")
                .unwrap(),
            Ipv4Addr::new(10, 9, 0, 2)
        );
        assert_eq!(
            s.lease_acquire("bridge", sub, &id(2), "m2").unwrap(),
            Ipv4Addr::new(10, 9, 0, 3)
        );
        // Release the first: its address is the lowest free one again.
        assert_eq!(s.lease_release(&id(1)).unwrap(), 1);
        assert_eq!(
            s.lease_acquire("bridge", sub, &id(3), "m3").unwrap(),
            Ipv4Addr::new(10, 9, 0, 2)
        );
        assert_eq!(s.lease_release(&id(1)).unwrap(), 0);
    }

    #[test]
    fn lease_acquire_twice_returns_the_existing_lease() {
        let s = Store::open_in_memory().unwrap();
        let sub = net([10, 9, 0, 0], 24);
        let a = s.lease_acquire("bridge", sub, &id(1), "m1").unwrap();
        let b = s.lease_acquire("bridge", sub, &id(1), "other").unwrap();
        assert_eq!(a, b);
        assert_eq!(s.leases().unwrap().len(), 1);
        let l = s.lease_of(&id(1)).unwrap().unwrap();
        assert_eq!((l.ip, l.mac.as_str(), l.pool.as_str()), (a, "m1", "bridge"));
        assert!(s.lease_of(&id(2)).unwrap().is_none());
        // Another pool is another lease, and never the same address.
        let u = s.lease_acquire("user", sub, &id(1), "m1").unwrap();
        assert_ne!(u, a);
        assert_eq!(s.leases().unwrap().len(), 2);
    }

    #[test]
    fn lease_acquire_exhausted_pool_is_a_clear_error() {
        let s = Store::open_in_memory().unwrap();
        let sub = net([10, 9, 0, 0], 29); // .2 to .6: five addresses
        for n in 0..5 {
            s.lease_acquire("bridge", sub, &id(n), "m").unwrap();
        }
        let e = s.lease_acquire("bridge", sub, &id(9), "m").unwrap_err();
        assert!(
            matches!(e, StoreError::PoolExhausted { capacity: 5, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("10.9.0.0/29"), "{e}");
        let e = s
            .lease_acquire("bridge", net([10, 9, 0, 0], 31), &id(9), "m")
            .unwrap_err();
        assert!(matches!(e, StoreError::SubnetTooSmall(_)), "{e}");
    }

    #[test]
    fn leases_release_except_keeps_only_live_sandboxes() {
        let s = Store::open_in_memory().unwrap();
        let sub = net([10, 9, 0, 0], 24);
        for n in 0..4 {
            s.lease_acquire("bridge", sub, &id(n), "m").unwrap();
        }
        let live: HashSet<SandboxId> = [id(1), id(3)].into_iter().collect();
        let released = s.leases_release_except(&live).unwrap();
        let ids: Vec<_> = released.iter().map(|l| l.sandbox_id.clone()).collect();
        assert_eq!(ids, vec![id(0), id(2)]);
        let left: Vec<_> = s
            .leases()
            .unwrap()
            .into_iter()
            .map(|l| l.sandbox_id)
            .collect();
        assert_eq!(left, vec![id(1), id(3)]);
    }

    #[test]
    fn lease_acquire_from_two_connections_never_shares_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let a = std::sync::Arc::new(Store::open(&path).unwrap());
        let b = std::sync::Arc::new(Store::open(&path).unwrap());
        let sub = net([10, 9, 0, 0], 24);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = [(a, 0u64), (b, 100u64)]
            .into_iter()
            .map(|(store, base)| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..40)
                        .map(|n| {
                            store
                                .lease_acquire("bridge", sub, &id(base + n), "m")
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "an address was leased twice");
        assert_eq!(n, 80);
        // Dense: the 80 lowest addresses.
        assert_eq!(all[0], Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(all[79], Ipv4Addr::new(10, 9, 0, 81));
        let reopened = Store::open(&path).unwrap();
        assert_eq!(reopened.leases().unwrap().len(), 80);
    }
}
