//! Node endpoints per tier, with the two facts routing needs: is an endpoint healthy, and how many requests
//! does it have in flight. Requests go to the healthy endpoint with the fewest outstanding requests (ties go
//! round-robin), and a [`Lease`] keeps the count right however the request ends.
//!
//! The endpoint set can be replaced while requests run ([`Pool::set`], fed by the Kubernetes source): an
//! endpoint that stays keeps its state (health, outstanding count), and a removed one is only unlisted, so the
//! requests it still serves finish on it and their leases release it as usual.

use crate::backend::{Endpoint, NodeInfo};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    pub tier: String,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// What the node reported in ModelInfo since it last became healthy (None: not read yet).
    info: Mutex<Option<NodeInfo>>,
}

impl EndpointState {
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }
    pub fn info(&self) -> Option<NodeInfo> {
        self.info.lock().expect("info lock").clone()
    }
    /// Records (or, with None, forgets) what the node reported in ModelInfo.
    pub fn set_info(&self, info: Option<NodeInfo>) {
        *self.info.lock().expect("info lock") = info;
    }
}

/// One outstanding request on an endpoint; dropping it releases the slot.
#[derive(Debug)]
pub struct Lease(Arc<EndpointState>);

impl Lease {
    pub fn endpoint(&self) -> &Endpoint {
        &self.0.endpoint
    }
    pub fn state(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

type Tiers = BTreeMap<String, Vec<Arc<EndpointState>>>;

#[derive(Default)]
pub struct Pool {
    tiers: RwLock<Tiers>,
    rotation: AtomicUsize,
}

/// What [`Pool::set`] changed: endpoints (as `tier/host:port`) added and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PoolChange {
    pub added: Vec<String>,
    pub removed: Vec<Endpoint>,
}

fn build(endpoints: &BTreeMap<String, Vec<String>>, previous: &Tiers) -> Tiers {
    endpoints
        .iter()
        .map(|(tier, eps)| {
            let kept = previous.get(tier);
            let states = eps
                .iter()
                .map(|e| {
                    kept.and_then(|k| k.iter().find(|s| s.endpoint.0 == *e)).cloned().unwrap_or_else(|| {
                        Arc::new(EndpointState {
                            endpoint: Endpoint(e.clone()),
                            tier: tier.clone(),
                            outstanding: AtomicUsize::new(0),
                            healthy: AtomicBool::new(true),
                            info: Mutex::new(None),
                        })
                    })
                })
                .collect();
            (tier.clone(), states)
        })
        .collect()
}

impl Pool {
    /// Endpoints start healthy (the health checker corrects that within one interval; a failed request
    /// marks its endpoint unhealthy at once).
    pub fn new(endpoints: &BTreeMap<String, Vec<String>>) -> Self {
        Pool { tiers: RwLock::new(build(endpoints, &Tiers::new())), rotation: AtomicUsize::new(0) }
    }

    /// Replaces the endpoint set (see the module documentation for what happens to running requests).
    pub fn set(&self, endpoints: &BTreeMap<String, Vec<String>>) -> PoolChange {
        let mut tiers = self.tiers.write().expect("pool lock");
        let next = build(endpoints, &tiers);
        let listed =
            |t: &Tiers, s: &Arc<EndpointState>| t.get(&s.tier).is_some_and(|v| v.iter().any(|x| Arc::ptr_eq(x, s)));
        let change = PoolChange {
            added: next
                .values()
                .flatten()
                .filter(|s| !listed(&tiers, s))
                .map(|s| format!("{}/{}", s.tier, s.endpoint))
                .collect(),
            removed: tiers.values().flatten().filter(|s| !listed(&next, s)).map(|s| s.endpoint.clone()).collect(),
        };
        *tiers = next;
        change
    }

    pub fn has_tier(&self, tier: &str) -> bool {
        self.tiers.read().expect("pool lock").contains_key(tier)
    }

    /// Every listed endpoint (a snapshot).
    pub fn all(&self) -> Vec<Arc<EndpointState>> {
        self.tiers.read().expect("pool lock").values().flatten().cloned().collect()
    }

    pub fn has_healthy(&self, tier: &str) -> bool {
        self.tiers.read().expect("pool lock").get(tier).is_some_and(|eps| eps.iter().any(|e| e.healthy()))
    }

    /// Leases the healthy endpoint of `tier` with the fewest outstanding requests, skipping `tried`.
    pub fn pick(&self, tier: &str, tried: &[Endpoint]) -> Option<Lease> {
        let tiers = self.tiers.read().expect("pool lock");
        let eps = tiers.get(tier)?;
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
        let best = (0..n)
            .map(|i| &eps[(start + i) % n])
            .filter(|e| e.healthy() && !tried.contains(&e.endpoint))
            .min_by_key(|e| e.outstanding())?;
        best.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease(best.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        let mut m = BTreeMap::new();
        m.insert("fp8".to_owned(), vec!["a:1".to_owned(), "b:1".to_owned(), "c:1".to_owned()]);
        m.insert("empty".to_owned(), vec![]);
        Pool::new(&m)
    }

    #[test]
    fn least_outstanding_wins_and_leases_release() {
        let p = pool();
        let l1 = p.pick("fp8", &[]).unwrap();
        let l2 = p.pick("fp8", &[]).unwrap();
        let l3 = p.pick("fp8", &[]).unwrap();
        let mut picked = vec![l1.endpoint().0.clone(), l2.endpoint().0.clone(), l3.endpoint().0.clone()];
        picked.sort();
        assert_eq!(picked, ["a:1", "b:1", "c:1"], "three requests spread over three idle endpoints");
        let freed = l2.endpoint().clone();
        drop(l2);
        assert_eq!(p.pick("fp8", &[]).unwrap().endpoint(), &freed, "the only endpoint with nothing in flight");
        drop((l1, l3));
        assert!(p.all().iter().all(|e| e.outstanding() == 0));
    }

    #[test]
    fn unhealthy_and_tried_endpoints_are_skipped() {
        let p = pool();
        p.all().iter().find(|e| e.endpoint.0 == "a:1").unwrap().set_healthy(false);
        for _ in 0..10 {
            let l = p.pick("fp8", &[Endpoint("b:1".into())]).unwrap();
            assert_eq!(l.endpoint().0, "c:1");
        }
        assert!(p.pick("fp8", &[Endpoint("b:1".into()), Endpoint("c:1".into())]).is_none());
        assert!(p.pick("empty", &[]).is_none() && p.pick("missing", &[]).is_none());
        assert!(p.has_healthy("fp8") && !p.has_healthy("empty"));
    }

    #[test]
    fn replacing_the_set_keeps_the_state_of_staying_endpoints_and_running_leases() {
        let p = pool();
        let on_a = loop {
            let l = p.pick("fp8", &[]).unwrap();
            if l.endpoint().0 == "a:1" {
                break l;
            }
        };
        p.all().iter().find(|e| e.endpoint.0 == "b:1").unwrap().set_healthy(false);
        let mut next = BTreeMap::new();
        next.insert("fp8".to_owned(), vec!["b:1".to_owned(), "d:1".to_owned()]);
        next.insert("int4".to_owned(), vec!["e:1".to_owned()]);
        let change = p.set(&next);
        assert_eq!(change.added, ["fp8/d:1", "int4/e:1"]);
        assert_eq!(change.removed, [Endpoint("a:1".into()), Endpoint("c:1".into())]);
        // b keeps its health; a is unlisted but its running request still holds (and then releases) it.
        assert!(!p.all().iter().find(|e| e.endpoint.0 == "b:1").unwrap().healthy());
        for _ in 0..5 {
            assert_eq!(p.pick("fp8", &[]).unwrap().endpoint().0, "d:1");
        }
        assert!(!p.has_tier("empty") && p.has_tier("int4"));
        let state = on_a.state().clone();
        assert_eq!(state.outstanding(), 1);
        drop(on_a);
        assert_eq!(state.outstanding(), 0);
        assert_eq!(p.set(&next), PoolChange::default(), "the same set changes nothing");
    }
}
