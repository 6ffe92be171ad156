//! Endpoint host names: the control side's cache of what each name
//! resolves to, and the lookup thread that refreshes it.
//!
//! A rule's endpoint is named as written (`account.game.svc:9000`); its
//! address is looked up when the name is first seen (config load, a Redis
//! read, a Consul answer) and then again by the lookup thread every
//! `backend.resolve_interval`, and soon after a dial to it failed. The
//! control loop publishes a new snapshot when an address changed, exactly
//! like any other route change (bindings to the old address are released
//! with reason 8, its connections retired).
//!
//! - A lookup that returns several addresses keeps the one in use while it
//!   is still among them (DNS answers rotate; without this every lookup
//!   could move sessions), else takes the first.
//! - A name that stops resolving keeps its last address (logged once).
//! - A name that never resolved is left out of its rule
//!   ([`super::routes::RouteSet::pending`]) and put in once it resolves.
//!
//! Lookups on the control thread itself happen only for names never seen
//! before; known names (resolving or failing) are answered from the cache
//! and refreshed by the lookup thread, so a slow DNS server delays route
//! updates, never signals or the drain.

use super::routes::{RouteSet, Slot};
use crate::routing::{Endpoint, Resolve};
use crate::state::{ControlEvent, ControlSender, Lookups};
use crossbeam_channel::Sender;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// Every address of `host:port`.
fn lookup_all(name: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = name.rsplit_once(':').ok_or_else(|| format!("{name:?} is not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{name:?} is not host:port"))?;
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(|e| e.to_string())?.collect();
    if addrs.is_empty() {
        return Err("no address".into());
    }
    Ok(addrs)
}

/// The address in use if it is still among `addrs`, else the first.
pub(crate) fn sticky(current: Option<SocketAddr>, addrs: &[SocketAddr]) -> SocketAddr {
    current.filter(|c| addrs.contains(c)).unwrap_or(addrs[0])
}

/// Starts the lookup thread: it answers each batch of names sent to the
/// returned channel with one [`ControlEvent::Resolved`].
pub(crate) fn spawn_lookups(tx: ControlSender) -> std::io::Result<Sender<Vec<Arc<str>>>> {
    let (req_tx, req_rx) = crossbeam_channel::unbounded::<Vec<Arc<str>>>();
    std::thread::Builder::new().name("gw-resolve".into()).spawn(move || {
        for batch in req_rx {
            let results = batch.into_iter().map(|n| {
                let r = lookup_all(&n);
                (n, r)
            });
            if tx.send(ControlEvent::Resolved(results.collect())).is_err() {
                return;
            }
        }
    })?;
    Ok(req_tx)
}

/// What one batch of lookups changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// (name, old address, new address) of names whose address moved.
    pub changed: Vec<(Arc<str>, SocketAddr, SocketAddr)>,
    /// Names that resolved for the first time (or again after failing
    /// without a previous address).
    pub fresh: Vec<Arc<str>>,
    /// Names that started failing (they keep their last address, if any).
    pub failing: Vec<(Arc<str>, String)>,
    /// Names that resolve again after failing.
    pub recovered: Vec<Arc<str>>,
}

impl Applied {
    /// Whether the published routes may differ.
    pub fn routes_changed(&self) -> bool {
        !self.changed.is_empty() || !self.fresh.is_empty()
    }
}

/// Name -> address cache (control thread only).
#[derive(Default)]
pub(crate) struct Names {
    cache: HashMap<Arc<str>, SocketAddr>,
    /// Names whose last lookup failed, with why.
    failing: BTreeMap<Arc<str>, String>,
    lookups: Option<Sender<Vec<Arc<str>>>>,
    in_flight: bool,
    queued: BTreeSet<Arc<str>>,
}

impl Resolve for Names {
    /// Known names from the cache (a failing one fails at once, without
    /// asking DNS again; the lookup thread retries it); a new name is looked
    /// up here, once.
    fn resolve(&mut self, host: &str, port: u16) -> Result<SocketAddr, String> {
        let name: Arc<str> = Arc::from(format!("{host}:{port}"));
        if let Some(a) = self.cache.get(&name) {
            return Ok(*a);
        }
        if let Some(why) = self.failing.get(&name) {
            return Err(why.clone());
        }
        match lookup_all(&name) {
            Ok(addrs) => {
                self.cache.insert(name, addrs[0]);
                Ok(addrs[0])
            }
            Err(e) => {
                self.failing.insert(name, e.clone());
                Err(e)
            }
        }
    }
}

impl Names {
    pub(crate) fn new(lookups: Option<Sender<Vec<Arc<str>>>>) -> Names {
        Names { lookups, ..Default::default() }
    }

    /// The address of an endpoint name from the cache (IP literals need none).
    pub(crate) fn cached(&self, name: &str) -> Option<SocketAddr> {
        name.parse::<SocketAddr>().ok().or_else(|| self.cache.get(name).copied())
    }

    /// Names waiting to resolve or whose lookup failed, with why.
    pub(crate) fn failing(&self) -> impl Iterator<Item = (&Arc<str>, &String)> {
        self.failing.iter()
    }

    /// Asks the lookup thread about `names` (queued while a batch is out).
    pub(crate) fn request(&mut self, names: impl IntoIterator<Item = Arc<str>>) {
        self.queued.extend(names);
        if self.in_flight || self.queued.is_empty() {
            return;
        }
        if let Some(tx) = &self.lookups {
            let batch: Vec<Arc<str>> = std::mem::take(&mut self.queued).into_iter().collect();
            self.in_flight = tx.send(batch).is_ok();
        }
    }

    /// Takes a batch of lookups in; sends the next queued batch.
    pub(crate) fn apply(&mut self, results: Lookups) -> Applied {
        self.in_flight = false;
        let mut out = Applied::default();
        for (name, r) in results {
            match r {
                Ok(addrs) if !addrs.is_empty() => {
                    let current = self.cache.get(&name).copied();
                    let next = sticky(current, &addrs);
                    if self.failing.remove(&name).is_some() && current.is_some() {
                        out.recovered.push(name.clone());
                    }
                    match current {
                        Some(c) if c == next => {}
                        Some(c) => out.changed.push((name.clone(), c, next)),
                        None => out.fresh.push(name.clone()),
                    }
                    self.cache.insert(name, next);
                }
                Ok(_) => {}
                Err(e) => {
                    if self.failing.insert(name.clone(), e.clone()).is_none() {
                        out.failing.push((name, e));
                    }
                }
            }
        }
        self.request(std::iter::empty());
        out
    }

    /// Forgets names no longer in use.
    pub(crate) fn retain(&mut self, in_use: &BTreeSet<Arc<str>>) {
        self.cache.retain(|k, _| in_use.contains(k));
        self.failing.retain(|k, _| in_use.contains(k));
    }

    /// Takes the addresses of host-named endpoints the cache does not know
    /// yet (the static rules are resolved when the config is loaded).
    pub(crate) fn learn(&mut self, set: &RouteSet) {
        let eps = set.rules.iter().flat_map(|r| r.endpoints.iter()).chain(set.realms.iter().map(|(_, e)| e));
        for e in eps.filter(|e| !e.is_literal()) {
            if !self.cache.contains_key(&e.name) {
                self.failing.remove(&e.name);
                self.cache.insert(e.name.clone(), e.addr);
            }
        }
    }

    /// Puts pending names that resolve by now into their rules and realms;
    /// the others stay pending.
    pub(crate) fn fill_pending(&self, set: &mut RouteSet) {
        let pending = std::mem::take(&mut set.pending);
        for p in pending {
            let Some(addr) = self.cached(&p.name) else {
                set.pending.push(p);
                continue;
            };
            let ep = Endpoint::with_addr(&p.name, addr);
            match p.slot {
                Slot::Rule(t, w) => {
                    if let Some(r) = set.rules.iter_mut().find(|r| r.key() == (t, w)) {
                        if !r.endpoints.iter().any(|e| e.name == ep.name) {
                            r.endpoints.push(ep);
                        }
                    }
                }
                Slot::Realm(realm) => {
                    if !set.realms.iter().any(|(r, _)| *r == realm) {
                        set.realms.push((realm, ep));
                        set.realms.sort_by_key(|(r, _)| *r);
                    }
                }
            }
        }
    }

    /// Gives every endpoint named by a host name its cached address.
    pub(crate) fn overlay(&self, set: &mut RouteSet) {
        let eps =
            set.rules.iter_mut().flat_map(|r| r.endpoints.iter_mut()).chain(set.realms.iter_mut().map(|(_, e)| e));
        for e in eps {
            if let Some(a) = self.cache.get(&e.name) {
                e.addr = *a;
            }
        }
    }
}

/// Endpoint names in `set` that are host names (not IP literals), and the
/// pending ones.
pub(crate) fn host_names(set: &RouteSet) -> BTreeSet<Arc<str>> {
    let eps = set.rules.iter().flat_map(|r| r.endpoints.iter()).chain(set.realms.iter().map(|(_, e)| e));
    eps.filter(|e| !e.is_literal()).map(|e| e.name.clone()).chain(set.pending.iter().map(|p| p.name.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::routes::Pending;
    use crate::routing::RawRule;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_rotating_answer_keeps_the_address_in_use() {
        let (x, y, z) = (a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1"));
        assert_eq!(sticky(Some(y), &[x, y]), y);
        assert_eq!(sticky(Some(y), &[y, x]), y);
        assert_eq!(sticky(Some(z), &[x, y]), x, "gone: the first");
        assert_eq!(sticky(None, &[y, x]), y);
    }

    #[test]
    fn lookups_change_fill_and_keep_last_good() {
        let mut n = Names::new(None);
        let name: Arc<str> = Arc::from("svc.example:7000");
        let r = n.apply(vec![(name.clone(), Err("NXDOMAIN".into()))]);
        assert_eq!(r.failing.len(), 1);
        assert!(!r.routes_changed());
        assert_eq!(n.resolve("svc.example", 7000), Err("NXDOMAIN".into()), "known failing: no new DNS query");
        let r = n.apply(vec![(name.clone(), Ok(vec![a("10.0.0.1:7000")]))]);
        assert_eq!(r.fresh, vec![name.clone()]);
        assert_eq!(n.resolve("svc.example", 7000), Ok(a("10.0.0.1:7000")));
        let r = n.apply(vec![(name.clone(), Ok(vec![a("10.0.0.2:7000"), a("10.0.0.1:7000")]))]);
        assert!(!r.routes_changed(), "still among the answers");
        let r = n.apply(vec![(name.clone(), Err("SERVFAIL".into()))]);
        assert_eq!(r.failing.len(), 1);
        assert_eq!(n.cached(&name), Some(a("10.0.0.1:7000")), "failing keeps the last address");
        let r = n.apply(vec![(name.clone(), Ok(vec![a("10.0.0.9:7000")]))]);
        assert_eq!(r.changed, vec![(name.clone(), a("10.0.0.1:7000"), a("10.0.0.9:7000"))]);
        assert_eq!(r.recovered, vec![name.clone()]);

        // Pending names go in once cached; the overlay moves stale addresses.
        let mut set = RouteSet {
            rules: vec![RawRule::new(10, 0, "round_robin", &["127.0.0.1:1".into()]).validate().unwrap()],
            pending: vec![
                Pending { slot: Slot::Rule(10, 0), name: name.clone() },
                Pending { slot: Slot::Realm(7), name: "other.example:1".into() },
            ],
            ..Default::default()
        };
        n.fill_pending(&mut set);
        assert_eq!(set.rules[0].endpoints.len(), 2);
        assert_eq!(set.pending.len(), 1, "the unknown name stays pending");
        set.rules[0].endpoints[1].addr = a("10.0.0.1:7000");
        n.overlay(&mut set);
        assert_eq!(set.rules[0].endpoints[1].addr, a("10.0.0.9:7000"));
        assert_eq!(host_names(&set).len(), 2);
        n.retain(&BTreeSet::new());
        assert_eq!(n.cached(&name), None);
    }
}
