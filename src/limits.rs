//! Limits: token buckets and the per-IP admission table, state machines
//! driven by `now`.
//!
//! Per-session frame rates ([`MessageLimiter`]) belong to one core. Per-IP
//! limits and the connection cap are node-wide and exact: every worker admits
//! against one [`SharedAdmission`], touched at accept and close only, so the
//! kernel can spread connections over the workers by their whole 4-tuple
//! whatever the mix of source addresses.

use ahash::AHashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: u32, now: Instant) -> TokenBucket {
        TokenBucket { tokens: burst as f64, last: now }
    }

    /// The tokens left, as of `now` (refilled at `rate`, capped at `burst`):
    /// what a live upgrade carries.
    pub fn tokens_at(&self, rate: u32, burst: u32, now: Instant) -> f64 {
        let mut b = TokenBucket { tokens: self.tokens, last: self.last };
        if rate > 0 {
            b.refill(rate, burst.max(1), now);
        }
        b.tokens
    }

    /// A bucket holding `tokens` as of `now`.
    pub fn with_tokens(tokens: f64, now: Instant) -> TokenBucket {
        TokenBucket { tokens, last: now }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate as f64).min(burst as f64);
        self.last = now;
    }

    /// Takes one token if there is one.
    #[inline]
    pub fn try_take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Full again (nothing to remember about this key).
    pub fn is_full(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= burst as f64
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerIpConnections,
    PerIpRate,
    IpTableFull,
}

impl Refusal {
    /// Every refusal, for exporting each label at zero from the start.
    pub const ALL: [Refusal; 3] = [Refusal::PerIpConnections, Refusal::PerIpRate, Refusal::IpTableFull];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerIpConnections => "max_connections_per_ip",
            Refusal::PerIpRate => "connection_rate_per_ip",
            Refusal::IpTableFull => "ip_table_full",
        }
    }
}

#[derive(Debug)]
struct IpEntry {
    open: u32,
    bucket: TokenBucket,
}

/// Per-IP connection counts and connect-rate buckets of one worker.
///
/// Entries exist only while an IP has open connections or a bucket that is
/// not yet full again; [`PerIpTable::evict_idle`] drops the rest, and the table
/// never holds more than `max_entries`, so a spoofed-source flood cannot grow
/// it without bound.
#[derive(Debug)]
pub struct PerIpTable {
    entries: AHashMap<IpAddr, IpEntry>,
    max_entries: usize,
}

impl PerIpTable {
    pub fn new(max_entries: usize) -> PerIpTable {
        PerIpTable { entries: AHashMap::new(), max_entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Admission of a new connection from `ip`. `max_open` 0 and `rate` 0
    /// mean unlimited. On `Ok` the connection is counted until [`release`].
    ///
    /// [`release`]: PerIpTable::release
    pub fn admit(&mut self, ip: IpAddr, max_open: u32, rate: u32, now: Instant) -> Result<(), Refusal> {
        if max_open == 0 && rate == 0 {
            return Ok(());
        }
        if !self.entries.contains_key(&ip) && self.entries.len() >= self.max_entries {
            self.evict_idle(rate, now);
            if self.entries.len() >= self.max_entries {
                return Err(Refusal::IpTableFull);
            }
        }
        let burst = rate.max(1);
        let e = self.entries.entry(ip).or_insert_with(|| IpEntry { open: 0, bucket: TokenBucket::full(burst, now) });
        if max_open > 0 && e.open >= max_open {
            return Err(Refusal::PerIpConnections);
        }
        if rate > 0 && !e.bucket.try_take(rate, burst, now) {
            return Err(Refusal::PerIpRate);
        }
        e.open += 1;
        Ok(())
    }

    /// A connection a live upgrade brought over from the old process: counted
    /// like an admitted one, whatever the limits say (it is not new).
    pub fn adopt(&mut self, ip: IpAddr, now: Instant) {
        self.entries.entry(ip).or_insert_with(|| IpEntry { open: 0, bucket: TokenBucket::full(1, now) }).open += 1;
    }

    /// A connection admitted for `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(e) = self.entries.get_mut(&ip) {
            e.open = e.open.saturating_sub(1);
        }
    }

    /// Drops entries with no open connection and a full bucket.
    pub fn evict_idle(&mut self, rate: u32, now: Instant) {
        let burst = rate.max(1);
        self.entries.retain(|_, e| e.open > 0 || (rate > 0 && !e.bucket.is_full(rate, burst, now)));
    }
}

/// Per-session frame rate: `messages_per_second` with a burst.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimiter {
    bucket: TokenBucket,
}

impl MessageLimiter {
    pub fn new(burst: u32, now: Instant) -> MessageLimiter {
        MessageLimiter { bucket: TokenBucket::full(burst, now) }
    }

    /// The bucket (a live upgrade carries its tokens).
    pub fn bucket(&self) -> &TokenBucket {
        &self.bucket
    }

    /// A limiter whose bucket is `bucket`.
    pub fn from_bucket(bucket: TokenBucket) -> MessageLimiter {
        MessageLimiter { bucket }
    }

    /// `rate` 0 = unlimited.
    #[inline]
    pub fn allow(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        rate == 0 || self.bucket.try_take(rate, burst.max(1), now)
    }
}

/// Admission state every worker shares: per-IP connection counts and
/// connect-rate buckets, and the node's open-connection count.
///
/// Connections land on workers by the kernel's SO_REUSEPORT hash of the
/// whole 4-tuple, so load stays balanced whatever the mix of source
/// addresses (one balancer, a NAT, carrier-grade NAT); the limits stay exact
/// for the real client address (a PROXY header's included) because every
/// worker admits against this one table. It is touched once when a
/// connection is admitted and once when it ends, never per frame: the
/// per-IP table is split into [`ADMISSION_SHARDS`] independently locked
/// shards by address, so two cores rarely meet on one lock, and the
/// connection count is one atomic.
pub struct SharedAdmission {
    shards: Box<[std::sync::Mutex<PerIpTable>]>,
    open: std::sync::atomic::AtomicU64,
}

/// Independently locked parts of the shared per-IP table.
pub const ADMISSION_SHARDS: usize = 64;
/// IPs tracked at once, over all shards (a spoofed-source flood cannot grow
/// the table past this; further new addresses are refused as `ip_table_full`).
pub const MAX_SHARED_IP_ENTRIES: usize = 262_144;

impl Default for SharedAdmission {
    fn default() -> Self {
        SharedAdmission {
            shards: (0..ADMISSION_SHARDS)
                .map(|_| std::sync::Mutex::new(PerIpTable::new(MAX_SHARED_IP_ENTRIES / ADMISSION_SHARDS)))
                .collect(),
            open: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl SharedAdmission {
    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, PerIpTable> {
        let h = match ip {
            IpAddr::V4(v4) => u32::from(v4) as u64,
            IpAddr::V6(v6) => xxhash_rust::xxh3::xxh3_64(&v6.octets()),
        };
        let i = (xxhash_rust::xxh3::xxh3_64(&h.to_le_bytes()) % ADMISSION_SHARDS as u64) as usize;
        // A poisoned shard (a panic while holding it) still holds valid counts.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Per-IP admission (see [`PerIpTable::admit`]).
    pub fn admit_ip(&self, ip: IpAddr, max_open: u32, rate: u32, now: Instant) -> Result<(), Refusal> {
        if max_open == 0 && rate == 0 {
            return Ok(());
        }
        self.shard(ip).admit(ip, max_open, rate, now)
    }

    /// A connection handed over by a live upgrade: it takes an open slot
    /// and, when `ip` is given, counts for its address, with no limit
    /// checked (it was admitted by the old process).
    pub fn adopt(&self, ip: Option<IpAddr>, now: Instant) {
        self.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Some(ip) = ip {
            self.shard(ip).adopt(ip, now);
        }
    }

    /// A connection admitted by [`SharedAdmission::admit_ip`] ended.
    pub fn release_ip(&self, ip: IpAddr) {
        self.shard(ip).release(ip);
    }

    /// Takes one of `max` open-connection slots for the node.
    pub fn try_open(&self, max: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Gives back a slot taken by [`SharedAdmission::try_open`].
    pub fn close_one(&self) {
        use std::sync::atomic::Ordering;
        let _ = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
    }

    /// Open connections on the node.
    pub fn open(&self) -> u64 {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drops idle per-IP entries, skipping shards another core holds now.
    pub fn evict_idle(&self, rate: u32, now: Instant) {
        for s in self.shards.iter() {
            if let Ok(mut t) = s.try_lock() {
                t.evict_idle(rate, now);
            }
        }
    }
}

/// How often idle per-IP entries are evicted.
pub const IP_EVICT_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        assert!(b.try_take(10, 3, t0) && b.try_take(10, 3, t0) && b.try_take(10, 3, t0));
        assert!(!b.try_take(10, 3, t0));
        assert!(b.try_take(10, 3, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(10, 3, t0 + Duration::from_millis(100)));
        assert!(b.is_full(10, 3, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn per_ip_connection_cap_and_release() {
        let t0 = Instant::now();
        let mut t = PerIpTable::new(100);
        for _ in 0..3 {
            t.admit(ip("10.0.0.1"), 3, 0, t0).unwrap();
        }
        assert_eq!(t.admit(ip("10.0.0.1"), 3, 0, t0), Err(Refusal::PerIpConnections));
        t.admit(ip("10.0.0.2"), 3, 0, t0).unwrap();
        t.release(ip("10.0.0.1"));
        t.admit(ip("10.0.0.1"), 3, 0, t0).unwrap();
    }

    #[test]
    fn per_ip_rate() {
        let t0 = Instant::now();
        let mut t = PerIpTable::new(100);
        for _ in 0..5 {
            t.admit(ip("10.0.0.1"), 0, 5, t0).unwrap();
        }
        assert_eq!(t.admit(ip("10.0.0.1"), 0, 5, t0), Err(Refusal::PerIpRate));
        t.admit(ip("10.0.0.1"), 0, 5, t0 + Duration::from_millis(250)).unwrap();
    }

    #[test]
    fn idle_entries_are_evicted_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut t = PerIpTable::new(10);
        for i in 0..10 {
            let a = ip(&format!("10.0.1.{i}"));
            t.admit(a, 5, 0, t0).unwrap();
            t.release(a);
        }
        // Full of idle entries: a new IP evicts them instead of being refused.
        t.admit(ip("10.0.2.1"), 5, 0, t0).unwrap();
        assert_eq!(t.len(), 1);
        for i in 0..9 {
            t.admit(ip(&format!("10.0.3.{i}")), 5, 0, t0).unwrap();
        }
        assert_eq!(t.admit(ip("10.0.4.1"), 5, 0, t0), Err(Refusal::IpTableFull));
    }

    #[test]
    fn unlimited_tracks_nothing() {
        let mut t = PerIpTable::new(1);
        for i in 0..100 {
            t.admit(ip(&format!("10.0.0.{i}")), 0, 0, Instant::now()).unwrap();
        }
        assert!(t.is_empty());
    }

    #[test]
    fn message_limiter_burst_then_rate() {
        let t0 = Instant::now();
        let mut m = MessageLimiter::new(4, t0);
        let allowed = (0..10).filter(|_| m.allow(2, 4, t0)).count();
        assert_eq!(allowed, 4);
        assert!(m.allow(2, 4, t0 + Duration::from_millis(600)));
        assert!(MessageLimiter::new(1, t0).allow(0, 0, t0));
    }
}
