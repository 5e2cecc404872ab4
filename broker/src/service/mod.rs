//! The gRPC services: thin adapters between streams and the hub.
//!
//! - [`publisher`] — `PublisherService.Publish`.
//! - [`agent`] — `AgentService.Subscribe`.
//! - [`admin`] — `AdminService`.

pub mod admin;
pub mod agent;
pub mod publisher;

use tonic::{Request, Status};

use credstream_proto::connect::CLUSTER_HEADER;

/// The `x-credstream-cluster` header of a request, if any.
fn routing_cluster<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    request
        .metadata()
        .get(CLUSTER_HEADER)
        .map(|value| {
            value.to_str().map(str::to_owned).map_err(|_| {
                Status::invalid_argument(format!("{CLUSTER_HEADER} is not valid ASCII"))
            })
        })
        .transpose()
}

/// Checks that the routing header (if sent) names the cluster the call is
/// about (a stream's hello, an admin request's `cluster_id`): a proxy routes
/// on the header, so a call whose header names another cluster would reach
/// a shard that does not hold the cluster it speaks for.
fn check_routing(header: Option<&str>, cluster_id: &str, what: &str) -> Result<(), Status> {
    match header {
        Some(header) if header != cluster_id => Err(Status::invalid_argument(format!(
            "the {CLUSTER_HEADER} header ({header:?}) does not match the {what} ({cluster_id:?})"
        ))),
        _ => Ok(()),
    }
}

/// How long a stream may stay open without its hello: a peer that connects
/// and says nothing must not hold a task forever.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The status for a stream whose hello did not come within [`HELLO_TIMEOUT`].
fn no_hello() -> Status {
    Status::deadline_exceeded(format!(
        "no hello within {} seconds",
        HELLO_TIMEOUT.as_secs()
    ))
}

/// The status that ends every stream when the broker shuts down.
fn shutting_down() -> Status {
    Status::unavailable("the broker is shutting down; reconnect with backoff")
}

/// Resolves once the broker starts shutting down (holds no borrow of the
/// channel across the await, so the future stays `Send`).
async fn shutdown_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|down| *down).await.is_err() {
        // The hub is gone: nothing will ever signal; treat as shutdown.
    }
}
