//! [`Bell`]: wakes every agent stream of a cluster when its state changes.
//!
//! A `watch` channel would do the same job, but every waiting receiver
//! registers in one mutex-protected list each time it waits, and the sender
//! wakes them in batches under that lock; with 10,000 agents the woken
//! streams re-register on the other core while the sender still holds the
//! lock, and profiles showed that contention. Here each stream registers
//! once, when it connects, and afterwards only stores its waker in its own
//! [`AtomicWaker`]: waiting takes no shared lock, and ringing walks a slab
//! under one lock that only connects and disconnects also take.
//!
//! The bell carries no value: a woken stream reads the cluster's latest
//! state itself, so a ring can never be missed (a stream registers its waker
//! before it looks at the state) and a slow stream skips to the newest.

use std::sync::{Arc, Mutex};

use futures::task::AtomicWaker;
use slab::Slab;

/// The wakers of one cluster's agent streams.
#[derive(Debug, Default)]
pub struct Bell {
    waiters: Mutex<Slab<Arc<AtomicWaker>>>,
}

impl Bell {
    /// Wakes every registered stream.
    pub fn ring(&self) {
        for (_, waker) in self.lock().iter() {
            waker.wake();
        }
    }

    /// Registers a stream; it is woken by every [`ring`](Self::ring) until
    /// the returned handle drops.
    pub fn register(self: &Arc<Self>) -> BellHandle {
        let waker = Arc::new(AtomicWaker::new());
        let key = self.lock().insert(waker.clone());
        BellHandle {
            bell: self.clone(),
            key,
            waker,
        }
    }

    /// Registered streams.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no stream is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Arc<AtomicWaker>>> {
        // A panic while ringing leaves the slab intact.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's place on a [`Bell`].
#[derive(Debug)]
pub struct BellHandle {
    bell: Arc<Bell>,
    key: usize,
    waker: Arc<AtomicWaker>,
}

impl BellHandle {
    /// Stores the waker to wake on the next ring. Call it before checking
    /// for a change, so that a ring between the check and the wait is not
    /// lost.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

impl Drop for BellHandle {
    fn drop(&mut self) {
        self.bell.lock().remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn a_ring_wakes_every_registered_stream_once() {
        let bell = Arc::new(Bell::default());
        let handles: Vec<_> = (0..3).map(|_| bell.register()).collect();
        let counters: Vec<_> = handles
            .iter()
            .map(|handle| {
                let (counter, waker) = counting();
                handle.register(&waker);
                counter
            })
            .collect();
        bell.ring();
        // A waker is consumed by its wake: a second ring with no new
        // registration wakes nobody twice.
        bell.ring();
        for counter in &counters {
            assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn a_dropped_handle_leaves_the_bell() {
        let bell = Arc::new(Bell::default());
        let kept = bell.register();
        let dropped = bell.register();
        assert_eq!(bell.len(), 2);
        let (counter, waker) = counting();
        dropped.register(&waker);
        drop(dropped);
        assert_eq!(bell.len(), 1);
        bell.ring();
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        drop(kept);
        assert!(bell.is_empty());
    }
}
