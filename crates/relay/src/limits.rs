//! Per-peer bounds: how many connections an address and the server hold
//! (a slot taken at accept, before any HTTP is read, and given back when
//! the connection ends), and token buckets for ingress rates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::telemetry;

/// Open connections, in total and per address, and the sessions each
/// address holds.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    max_sessions_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, PerIp>)>,
}

/// What one address holds.
#[derive(Debug, Default)]
struct PerIp {
    connections: usize,
    sessions: usize,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// The server holds its most connections.
    Total,
    /// This address holds its most connections.
    PerIp,
}

impl Full {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Full::Total => "connections",
            Full::PerIp => "connections_per_ip",
        }
    }
}

impl ConnLimits {
    pub(crate) fn new(
        max_total: usize,
        max_per_ip: usize,
        max_sessions_per_ip: usize,
    ) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            max_sessions_per_ip,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, PerIp>)> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for a connection from `ip`, or says which bound is
    /// reached.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<PeerSlot>, Full> {
        let mut open = self.lock();
        let (total, per_ip) = &mut *open;
        if *total >= self.max_total {
            return Err(Full::Total);
        }
        let mine = per_ip.entry(ip).or_default();
        if mine.connections >= self.max_per_ip {
            return Err(Full::PerIp);
        }
        mine.connections += 1;
        *total += 1;
        metrics::gauge!(telemetry::TCP_CONNECTIONS).set(*total as f64);
        Ok(Arc::new(PeerSlot {
            limits: self.clone(),
            ip,
            since: Instant::now(),
            sessions: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    fn release(&self, ip: IpAddr, sessions: usize) {
        let mut open = self.lock();
        let (total, per_ip) = &mut *open;
        *total -= 1;
        if let Some(mine) = per_ip.get_mut(&ip) {
            mine.connections -= 1;
            mine.sessions -= sessions;
            if mine.connections == 0 {
                per_ip.remove(&ip);
            }
        }
        metrics::gauge!(telemetry::TCP_CONNECTIONS).set(*total as f64);
    }
}

/// One admitted connection's slot: given back when the last holder (the
/// HTTP connection, then its WebSocket) drops it.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
    since: Instant,
    /// Sessions this connection opened (held until it ends).
    sessions: std::sync::atomic::AtomicUsize,
}

impl PeerSlot {
    /// The peer's address.
    pub(crate) fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Counts a session opened by this connection against its address;
    /// `false` if the address holds its most sessions.
    pub(crate) fn open_session(&self) -> bool {
        let mut open = self.limits.lock();
        let Some(mine) = open.1.get_mut(&self.ip) else {
            return false;
        };
        if mine.sessions >= self.limits.max_sessions_per_ip {
            return false;
        }
        mine.sessions += 1;
        self.sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Milliseconds since the connection was accepted.
    pub(crate) fn elapsed_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.limits.release(self.ip, *self.sessions.get_mut());
    }
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens, in thousandths (so a millisecond adds `rate` of them).
    milli_tokens: u64,
    at_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: u64, burst: u64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            milli_tokens: burst.saturating_mul(1000),
            at_ms: 0,
        }
    }

    /// Takes `n` tokens at time `now_ms`; `false` if the bucket has too
    /// few (a request larger than the burst never passes).
    pub(crate) fn take(&mut self, n: u64, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = self.at_ms.max(now_ms);
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.burst.saturating_mul(1000));
        let need = n.saturating_mul(1000);
        if need > self.milli_tokens {
            return false;
        }
        self.milli_tokens -= need;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        let mut b = TokenBucket::new(1000, 5000);
        assert!(b.take(5000, 0));
        assert!(!b.take(1, 0));
        assert!(b.take(500, 500));
        assert!(!b.take(600, 500));
        assert!(b.take(5000, 100_000), "refills up to the burst");
        assert!(!b.take(5001, 1_000_000), "never more than the burst");
    }

    #[test]
    fn connection_slots_are_bounded_per_address_and_returned() {
        let limits = ConnLimits::new(3, 2, 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Full::PerIp);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Full::Total);
        assert!(a1.open_session() && a1.open_session() && _a2.open_session());
        assert!(!_a2.open_session(), "the address holds its most sessions");
        assert!(_b1.open_session(), "another address is not concerned");
        drop(a1);
        assert!(limits.admit(a).is_ok());
        assert!(
            _a2.open_session(),
            "sessions of a closed connection are returned"
        );
    }
}
