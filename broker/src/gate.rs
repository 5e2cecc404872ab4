//! [`GateLayer`]: the tower layer that lets each call through or answers it
//! with a status before it reaches a service. Authentication
//! ([`Authenticator`](crate::auth::Authenticator)) and the per-token call
//! limit ([`TokenRateLimiter`](crate::rate_limit::TokenRateLimiter)) are
//! gates; the layer holds the tower plumbing they share.

use std::task::{Context, Poll};

use tonic::Status;

/// A check on each new call.
pub trait Gate {
    /// `Ok` lets the call through (the gate may add request extensions);
    /// `Err` answers it with that status.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status>;
}

/// A layer applying `G` to every call.
#[derive(Clone, Debug)]
pub struct GateLayer<G> {
    gate: G,
}

impl<G> GateLayer<G> {
    /// A layer applying `gate`.
    pub fn new(gate: G) -> Self {
        Self { gate }
    }
}

impl<G: Clone, S> tower::Layer<S> for GateLayer<G> {
    type Service = GateService<G, S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            gate: self.gate.clone(),
            inner,
        }
    }
}

/// See [`GateLayer`].
#[derive(Clone, Debug)]
pub struct GateService<G, S> {
    gate: G,
    inner: S,
}

impl<G, S, B, RB> tower::Service<http::Request<B>> for GateService<G, S>
where
    G: Gate,
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<RB>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.admit(&mut request) {
            Ok(()) => futures::future::Either::Left(self.inner.call(request)),
            Err(status) => {
                let path = request.uri().path();
                tracing::debug!(
                    path = %credstream_proto::rules::text::printable(path, crate::audit::MAX_CLIENT_TEXT_BYTES),
                    code = ?status.code(),
                    "call refused"
                );
                crate::audit::call_refused(path, status.code(), request.extensions());
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
