//! `AdminService`: inspection without secrets (admin and publisher
//! tokens), and agent tokens issued to publishers only.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::admin_service_server::AdminService;
use credstream_proto::v1::{
    CreateAgentTokenRequest, CreateAgentTokenResponse, GetClusterRequest, GetClusterResponse,
    ListClustersRequest, ListClustersResponse,
};
use tonic::{Request, Response, Status};

use crate::audit;
use crate::auth::{self, Role, TokenKey};
use crate::hub::ClusterHub;
use crate::limits;

const DEFAULT_AGENT_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
const MAX_AGENT_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The lifetime of an issued agent token: never past the token that asked
/// for it (`issuer_left`), so that a token cannot be stretched by trading
/// it for another. The default is cut to what the issuer has left; an
/// explicit value beyond it is refused, since the caller asked for
/// something it cannot have.
fn issued_ttl(ttl_seconds: u64, issuer_left: Duration) -> Result<Duration, Status> {
    let ttl = match ttl_seconds {
        0 => return Ok(DEFAULT_AGENT_TOKEN_TTL.min(issuer_left)),
        secs => Duration::from_secs(secs),
    };
    if ttl > MAX_AGENT_TOKEN_TTL {
        return Err(Status::invalid_argument("ttl_seconds is more than 7 days"));
    }
    if ttl > issuer_left {
        return Err(Status::invalid_argument(format!(
            "ttl_seconds is {} but the calling token expires in {} s, and an issued token never outlives the token that asked for it; ask for less or use a longer-lived token",
            ttl.as_secs(),
            issuer_left.as_secs()
        )));
    }
    Ok(ttl)
}

/// The `AdminService` implementation.
#[derive(Debug, Clone)]
pub struct AdminServer {
    hub: Arc<ClusterHub>,
    key: TokenKey,
}

impl AdminServer {
    /// Inspects `hub`; issues agent tokens with `key`.
    pub fn new(hub: Arc<ClusterHub>, key: TokenKey) -> Self {
        Self { hub, key }
    }
}

#[tonic::async_trait]
impl AdminService for AdminServer {
    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        let claims = auth::claims(&request)?;
        let clusters = self
            .hub
            .all()
            .into_iter()
            .filter(|cluster| claims.covers(cluster.id()))
            .map(|cluster| cluster.summary())
            .collect();
        Ok(Response::new(ListClustersResponse { clusters }))
    }

    async fn get_cluster(
        &self,
        request: Request<GetClusterRequest>,
    ) -> Result<Response<GetClusterResponse>, Status> {
        let claims = auth::claims(&request)?;
        let routing = super::routing_cluster(&request)?;
        let id = &request.get_ref().cluster_id;
        limits::check_id("cluster_id", id)?;
        super::check_routing(routing.as_deref(), id, "request's cluster_id")?;
        claims.require_cluster(id)?;
        let cluster = self.hub.get(id).ok_or_else(|| {
            Status::not_found(format!("the broker holds no state for cluster {id:?}"))
        })?;
        Ok(Response::new(GetClusterResponse {
            cluster: Some(cluster.status()),
        }))
    }

    async fn create_agent_token(
        &self,
        request: Request<CreateAgentTokenRequest>,
    ) -> Result<Response<CreateAgentTokenResponse>, Status> {
        let claims = auth::claims(&request)?;
        let routing = super::routing_cluster(&request)?;
        let caller = audit::Caller::of(request.extensions());
        let body = request.get_ref();
        limits::check_id("cluster_id", &body.cluster_id)?;
        super::check_routing(routing.as_deref(), &body.cluster_id, "request's cluster_id")?;
        claims.require_cluster(&body.cluster_id)?;
        // The authentication gate already refused other roles; kept here
        // so that the service holds the rule even if mounted without it.
        if claims.role != Role::Publisher {
            return Err(auth::issuing_needs_a_publisher(claims.role));
        }
        let agent_id = (!body.agent_id.is_empty()).then_some(body.agent_id.as_str());
        if let Some(agent) = agent_id {
            limits::check_id("agent_id", agent)?;
        }
        let ttl = issued_ttl(body.ttl_seconds, claims.remaining())?;
        // Bound to the key behind the calling token (its own binding, if it
        // was issued in turn): once that key leaves the ring, so does this
        // token (docs/design.md §3, "Token lifetime").
        let issuer_key = claims
            .issuer_key
            .as_deref()
            .or(claims.key_id.as_deref())
            .ok_or_else(|| Status::internal("a verified token names its key"))?;
        let (token, issued) = self
            .key
            .issue_bound_agent(&body.cluster_id, agent_id, ttl, issuer_key)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(cluster = %body.cluster_id, issuer = %claims.role, agent = ?agent_id, ttl = ?ttl, %issuer_key, "issued an agent token");
        let expires = issued.expires;
        audit::record(audit::Event::TokenIssued {
            role: "agent",
            cluster: &body.cluster_id,
            agent_id,
            ttl_seconds: ttl.as_secs(),
            issued_token_id: format!("{:?}", auth::TokenId::of(&token)),
            caller: &caller,
        });
        Ok(Response::new(CreateAgentTokenResponse {
            token,
            expires_at: Some(timestamp(UNIX_EPOCH + Duration::from_secs(expires))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_token_never_outlives_its_issuer() {
        let left = Duration::from_secs(60);
        assert_eq!(issued_ttl(0, left).unwrap(), left);
        assert_eq!(issued_ttl(30, left).unwrap(), Duration::from_secs(30));
        let refused = issued_ttl(7 * 24 * 3600, left).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("expires in 60 s"), "{refused:?}");
        assert_eq!(
            issued_ttl(0, Duration::from_secs(30 * 24 * 3600)).unwrap(),
            DEFAULT_AGENT_TOKEN_TTL
        );
    }
}
