//! Node endpoints per tier, with the two facts routing needs: is an endpoint healthy, and how many requests
//! does it have in flight. Requests go to the healthy endpoint with the fewest outstanding requests (ties go
//! round-robin), and a [`Lease`] keeps the count right however the request ends.

use crate::backend::Endpoint;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    pub tier: String,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
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

#[derive(Default)]
pub struct Pool {
    tiers: BTreeMap<String, Vec<Arc<EndpointState>>>,
    rotation: AtomicUsize,
}

impl Pool {
    /// Endpoints start healthy (the health checker corrects that within one interval; a failed request
    /// marks its endpoint unhealthy at once).
    pub fn new(endpoints: &BTreeMap<String, Vec<String>>) -> Self {
        let tiers = endpoints
            .iter()
            .map(|(tier, eps)| {
                let states = eps
                    .iter()
                    .map(|e| {
                        Arc::new(EndpointState {
                            endpoint: Endpoint(e.clone()),
                            tier: tier.clone(),
                            outstanding: AtomicUsize::new(0),
                            healthy: AtomicBool::new(true),
                        })
                    })
                    .collect();
                (tier.clone(), states)
            })
            .collect();
        Pool { tiers, rotation: AtomicUsize::new(0) }
    }

    pub fn has_tier(&self, tier: &str) -> bool {
        self.tiers.contains_key(tier)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<EndpointState>> {
        self.tiers.values().flatten()
    }

    pub fn has_healthy(&self, tier: &str) -> bool {
        self.tiers.get(tier).is_some_and(|eps| eps.iter().any(|e| e.healthy()))
    }

    /// Leases the healthy endpoint of `tier` with the fewest outstanding requests, skipping `tried`.
    pub fn pick(&self, tier: &str, tried: &[Endpoint]) -> Option<Lease> {
        let eps = self.tiers.get(tier)?;
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
        assert!(p.all().all(|e| e.outstanding() == 0));
    }

    #[test]
    fn unhealthy_and_tried_endpoints_are_skipped() {
        let p = pool();
        p.all().find(|e| e.endpoint.0 == "a:1").unwrap().set_healthy(false);
        for _ in 0..10 {
            let l = p.pick("fp8", &[Endpoint("b:1".into())]).unwrap();
            assert_eq!(l.endpoint().0, "c:1");
        }
        assert!(p.pick("fp8", &[Endpoint("b:1".into()), Endpoint("c:1".into())]).is_none());
        assert!(p.pick("empty", &[]).is_none() && p.pick("missing", &[]).is_none());
        assert!(p.has_healthy("fp8") && !p.has_healthy("empty"));
    }
}
