//! The systems under test, each as a [`Peer`]: something that connects one
//! subscribing agent (its own connection) and publishes one round.
//!
//! - [`grpc`]: the credstream protocol, spoken to the credstream broker and
//!   to the minimal tonic fan-out alike.
//! - [`etcd`]: one etcd client and watch per agent; publishing is a put.
//! - [`nats`]: one NATS connection and subscription per agent.
//! - [`redis`]: one Redis pub/sub connection per agent.

pub mod etcd;
pub mod grpc;
pub mod nats;
pub mod redis;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::recorder::Recorder;

/// A system under test.
pub trait Peer {
    /// Connects agent `index` on its own connection and subscribes it; the
    /// returned task records every round it receives into `recorder` until
    /// aborted. Resolves once the subscription is in place.
    fn connect_agent(
        &self,
        index: usize,
        recorder: Arc<Recorder>,
    ) -> impl Future<Output = Result<JoinHandle<()>>>;

    /// Publishes the credential of `round`; returns once the publish call
    /// returned (not once it was delivered).
    fn publish(&mut self, round: u64) -> impl Future<Output = Result<()>>;
}

/// Connected agents; dropping them aborts their tasks, which closes their
/// connections.
#[derive(Debug, Default)]
pub struct Agents(Vec<JoinHandle<()>>);

impl Agents {
    /// How many are connected.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Connects `recorder.agents()` agents, `concurrency` at a time; each
/// connection is tried three times before the whole step fails.
pub async fn connect_all<P: Peer>(
    peer: &P,
    recorder: &Arc<Recorder>,
    concurrency: usize,
) -> Result<Agents> {
    let results: Vec<Result<JoinHandle<()>>> = futures::stream::iter(0..recorder.agents())
        .map(|index| async move {
            let mut attempt = 0;
            loop {
                match peer.connect_agent(index, recorder.clone()).await {
                    Ok(task) => return Ok(task),
                    Err(error) if attempt >= 2 => {
                        return Err(error.context(format!("agent {index} cannot subscribe")));
                    }
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut agents = Agents(Vec::with_capacity(results.len()));
    let mut first_error = None;
    for result in results {
        match result {
            Ok(task) => agents.0.push(task),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        None => Ok(agents),
        Some(error) => Err(error).context(format!(
            "only {} of {} agents subscribed",
            agents.len(),
            recorder.agents()
        )),
    }
}
