//! Connection slots for the local listener: a bounded set of open
//! connections, each known to be busy (a request in progress) or idle, so
//! that a new connection past the bound closes the least recently active
//! idle one instead of waiting for a slot (see [`super::LocalServer::serve`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::response::Response;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tower::ServiceExt;

/// The open connections.
pub(super) struct Slots {
    max: usize,
    epoch: Instant,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    slots: HashMap<u64, Arc<Slot>>,
}

/// One open connection.
pub(super) struct Slot {
    id: u64,
    /// Requests being answered on it (0 or 1 for HTTP/1 without pipelining).
    in_flight: AtomicU32,
    /// When it was accepted or last finished a request, in milliseconds
    /// since [`Slots::epoch`].
    last_active: AtomicU64,
    evict: Notify,
}

impl Slots {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            epoch: Instant::now(),
            open: Mutex::new(Open::default()),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a connection just accepted, closing the least recently
    /// active idle connection if the set is full; `None` when it is full of
    /// busy connections.
    pub(super) fn admit(&self) -> Option<Arc<Slot>> {
        let mut open = self.lock();
        if open.slots.len() >= self.max && !Self::evict_locked(&mut open) {
            return None;
        }
        let id = open.next_id;
        open.next_id += 1;
        let slot = Arc::new(Slot {
            id,
            in_flight: AtomicU32::new(0),
            last_active: AtomicU64::new(self.now()),
            evict: Notify::new(),
        });
        open.slots.insert(id, slot.clone());
        Some(slot)
    }

    /// Closes the least recently active idle connection, if there is one
    /// (to free its descriptor).
    pub(super) fn evict_one(&self) {
        Self::evict_locked(&mut self.lock());
    }

    fn evict_locked(open: &mut Open) -> bool {
        let oldest = open
            .slots
            .values()
            .filter(|slot| slot.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|slot| slot.last_active.load(Ordering::Acquire))
            .map(|slot| slot.id);
        match oldest.and_then(|id| open.slots.remove(&id)) {
            Some(slot) => {
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// The connection of `slot` ended.
    pub(super) fn release(&self, slot: &Slot) {
        self.lock().slots.remove(&slot.id);
    }
}

impl Slot {
    /// Resolves once the server chose to close this connection.
    pub(super) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

/// The routes as a hyper service that marks its slot busy while a request
/// is being answered.
pub(super) struct Tracked {
    router: Router,
    slot: Arc<Slot>,
    slots: Arc<Slots>,
}

impl Tracked {
    pub(super) fn new(router: Router, slot: Arc<Slot>, slots: Arc<Slots>) -> Self {
        Self {
            router,
            slot,
            slots,
        }
    }
}

/// Marks a slot busy until dropped (the response is ready, or the
/// connection went away mid-request).
struct Busy {
    slot: Arc<Slot>,
    slots: Arc<Slots>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot
            .last_active
            .store(self.slots.now(), Ordering::Release);
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.slot.in_flight.fetch_add(1, Ordering::AcqRel);
        let busy = Busy {
            slot: self.slot.clone(),
            slots: self.slots.clone(),
        };
        let answer = self
            .router
            .clone()
            .oneshot(request.map(axum::body::Body::new));
        Box::pin(async move {
            let response = answer.await;
            drop(busy);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_set_closes_the_least_recently_active_idle_connection() {
        let slots = Slots::new(3);
        let a = slots.admit().unwrap();
        let b = slots.admit().unwrap();
        let c = slots.admit().unwrap();
        // a is busy; b was active after c.
        a.in_flight.store(1, Ordering::Release);
        b.last_active.store(10, Ordering::Release);
        c.last_active.store(5, Ordering::Release);
        a.last_active.store(0, Ordering::Release);
        let d = slots.admit().expect("room is made");
        assert!(slots.lock().slots.contains_key(&a.id));
        assert!(slots.lock().slots.contains_key(&b.id));
        assert!(!slots.lock().slots.contains_key(&c.id), "c was evicted");
        assert!(slots.lock().slots.contains_key(&d.id));
        // c's connection task is told to close.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(c.evicted());
        // All busy: the newcomer is refused.
        for slot in [&b, &d] {
            slot.in_flight.store(1, Ordering::Release);
        }
        assert!(slots.admit().is_none());
        slots.release(&a);
        assert!(slots.admit().is_some());
    }
}
