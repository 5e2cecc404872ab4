//! A counting fake minter for tests of refresh logic. (The real AWS and GCP
//! minters are tested against moto and a token endpoint.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use credstream_client::mint::{MintError, MintFuture, Minter};
use credstream_proto::v1::CredentialKind;
use tokio::sync::{Notify, Semaphore};

use crate::broker::{aws_update, gcp_update};

/// Mints recognisable fake credentials and counts the calls.
#[derive(Debug)]
pub struct CountingMinter {
    kind: CredentialKind,
    lifetime: Duration,
    mints: AtomicU64,
    minted: Notify,
    /// When set, each mint waits for a permit (to hold a request in flight).
    gate: Option<Arc<Semaphore>>,
    /// When set, mints fail with this message.
    fail: std::sync::Mutex<Option<String>>,
    /// When set, mints fail with this message as a refusal, which retrying
    /// cannot fix (a permanent error).
    refuse: std::sync::Mutex<Option<String>>,
}

impl CountingMinter {
    /// A minter of `kind` whose credentials live `lifetime`.
    pub fn new(kind: CredentialKind, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            kind,
            lifetime,
            mints: AtomicU64::new(0),
            minted: Notify::new(),
            gate: None,
            fail: std::sync::Mutex::new(None),
            refuse: std::sync::Mutex::new(None),
        })
    }

    /// Like `new`, but each mint waits for a permit on `gate`.
    pub fn gated(kind: CredentialKind, lifetime: Duration, gate: Arc<Semaphore>) -> Arc<Self> {
        Arc::new(Self {
            kind,
            lifetime,
            mints: AtomicU64::new(0),
            minted: Notify::new(),
            gate: Some(gate),
            fail: std::sync::Mutex::new(None),
            refuse: std::sync::Mutex::new(None),
        })
    }

    /// Makes the following mints fail with an error worth retrying (or
    /// succeed again with `None`).
    pub fn fail_with(&self, message: Option<&str>) {
        *self.fail.lock().unwrap() = message.map(str::to_owned);
    }

    /// Makes the following mints fail with a refusal, an error retrying
    /// cannot fix (or succeed again with `None`).
    pub fn refuse_with(&self, message: Option<&str>) {
        *self.refuse.lock().unwrap() = message.map(str::to_owned);
    }

    /// How many mints started.
    pub fn count(&self) -> u64 {
        self.mints.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` mints started (fails after the test timeout).
    pub async fn wait_for(&self, n: u64) {
        tokio::time::timeout(crate::broker::WAIT, async {
            loop {
                let notified = self.minted.notified();
                if self.count() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} mints, saw {}", self.count()));
    }
}

impl Minter for CountingMinter {
    fn kind(&self) -> CredentialKind {
        self.kind
    }

    fn mint(&self) -> MintFuture<'_> {
        Box::pin(async move {
            let n = self.mints.fetch_add(1, Ordering::SeqCst) + 1;
            self.minted.notify_waiters();
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            if let Some(message) = self.refuse.lock().unwrap().clone() {
                return Err(MintError::Refused {
                    kind: "fake",
                    message,
                });
            }
            if let Some(message) = self.fail.lock().unwrap().clone() {
                return Err(MintError::Failed {
                    kind: "fake",
                    message,
                });
            }
            let tag = format!("mint{n}");
            Ok(match self.kind {
                CredentialKind::Gcp => gcp_update(&tag, self.lifetime),
                _ => aws_update(&tag, self.lifetime),
            })
        })
    }
}
