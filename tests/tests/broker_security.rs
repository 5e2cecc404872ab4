//! Tokens, roles, cluster isolation, TLS and mutual TLS, and the plaintext
//! rule.

use std::time::Duration;

use credstream_broker::auth::{Role, TokenKey};
use credstream_broker::server::{self, BrokerConfig};
use credstream_proto::connect::{BrokerAddress, CallCredentials, ClientIdentity};
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{
    CreateAgentTokenRequest, CredentialKind, EnvVar, GetClusterRequest, ListClustersRequest,
    PrivateEnv, publish_request, subscribe_response,
};
use credstream_tests::broker::{
    TestBroker, WAIT, aws_update, open_agent, open_publisher, publisher_hello,
};
use credstream_tests::pki::Pki;
use credstream_tests::publish::local_address;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn each_auth_failure_gets_the_documented_code() {
    let broker = TestBroker::start().await;
    let cluster = "auth";
    let hello = || Some(publisher_hello(cluster, &[], false));
    let cases: Vec<(&str, String, Code)> = vec![
        ("no token", String::new(), Code::Unauthenticated),
        (
            "bad signature",
            TokenKey::generate()
                .issue(Role::Publisher, Some(cluster), HOUR)
                .unwrap(),
            Code::Unauthenticated,
        ),
        (
            "expired",
            broker
                .key
                .issue(Role::Publisher, Some(cluster), Duration::ZERO)
                .unwrap(),
            Code::Unauthenticated,
        ),
        ("garbage", "not-a-token".into(), Code::Unauthenticated),
        (
            "wrong role",
            broker.token(Role::Agent, Some(cluster)),
            Code::PermissionDenied,
        ),
        (
            "wrong cluster",
            broker.token(Role::Publisher, Some("other")),
            Code::PermissionDenied,
        ),
    ];
    for (name, token, code) in cases {
        let status = if token.is_empty() {
            // No authorization metadata at all.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(credstream_proto::v1::PublishRequest { message: hello() })
                .await
                .unwrap();
            let mut client =
                credstream_proto::v1::publisher_service_client::PublisherServiceClient::new(
                    broker.channel(),
                );
            client
                .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|_| ())
                .unwrap_err()
        } else {
            match open_publisher(broker.channel(), &token, hello()).await {
                Err(status) => status,
                Ok(mut publisher) => publisher.ended_with().await,
            }
        };
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(!status.message().is_empty(), "{name}: the error says why");
    }
    // Admin: an agent token may not inspect; a publisher only its cluster.
    let admin_as = |token: String| {
        AdminServiceClient::with_interceptor(
            broker.channel(),
            CallCredentials::bearer(&token).unwrap(),
        )
    };
    let err = admin_as(broker.token(Role::Agent, Some(cluster)))
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin_as(broker.token(Role::Publisher, Some("mine")))
        .get_cluster(GetClusterRequest {
            cluster_id: "theirs".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_publisher_of_cluster_a_never_reaches_agents_of_b() {
    let broker = TestBroker::start().await;
    let mut agent_b = broker.agent("b", "agent-b").await;
    let _ = agent_b.expect().await;
    let publisher_a = broker.publisher("a", &[CredentialKind::Aws], false).await;
    publisher_a
        .send(publish_request::Message::Credential(aws_update(
            "for-a", HOUR,
        )))
        .await;
    let mut agent_a = broker.agent("a", "agent-a").await;
    // Agent A gets it (snapshot or update) ...
    loop {
        match agent_a.expect().await {
            subscribe_response::Message::Snapshot(s) if !s.credentials.is_empty() => break,
            subscribe_response::Message::Credential(_) => break,
            _ => {}
        }
    }
    // ... and B got nothing at all: the first thing it gets after A's
    // publish is B's own publisher's marker.
    let publisher_b = broker.publisher("b", &[CredentialKind::Aws], true).await;
    publisher_b
        .send(publish_request::Message::PrivateEnv(PrivateEnv {
            set: vec![EnvVar {
                name: "MARKER".into(),
                value: "b".into(),
            }],
            ..Default::default()
        }))
        .await;
    loop {
        match agent_b.expect().await {
            subscribe_response::Message::ClusterInfo(_) => {}
            subscribe_response::Message::PrivateEnv(env)
                if env.set.iter().any(|v| v.name == "MARKER") =>
            {
                break;
            }
            other => panic!("agent of b received {other:?}"),
        }
    }
    // An agent token for A cannot subscribe to B.
    let err = open_agent(
        broker.channel(),
        &broker.token(Role::Agent, Some("a")),
        "b",
        "sneaky",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn publishers_issue_agent_tokens_for_their_cluster_only() {
    let broker = TestBroker::start().await;
    let mut admin = AdminServiceClient::with_interceptor(
        broker.channel(),
        CallCredentials::bearer(&broker.token(Role::Publisher, Some("c"))).unwrap(),
    );
    let response = admin
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "c".into(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let claims = broker.key.verify(&response.token).unwrap();
    assert_eq!(
        (claims.role, claims.cluster.as_deref()),
        (Role::Agent, Some("c"))
    );
    assert!(
        !format!("{response:?}").contains(&response.token),
        "Debug hides the token"
    );
    let err = admin
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "d".into(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// Finding 7 (issue 34): an admin token inspects; it cannot mint an agent
/// token (and with it read a cluster's credentials). Issuing is the
/// publisher's, for its own cluster.
#[tokio::test]
async fn an_admin_token_cannot_issue_agent_tokens_and_a_publisher_still_can() {
    let broker = TestBroker::start().await;
    let mut publisher = broker
        .publisher("guarded", &[CredentialKind::Aws], false)
        .await;
    publisher.welcome().await;
    let request = || CreateAgentTokenRequest {
        cluster_id: "guarded".into(),
        ttl_seconds: 60,
        ..Default::default()
    };
    for admin in [
        broker.token(Role::Admin, None),
        broker.token(Role::Admin, Some("guarded")),
    ] {
        let mut client = AdminServiceClient::with_interceptor(
            broker.channel(),
            CallCredentials::bearer(&admin).unwrap(),
        );
        let refused = client.create_agent_token(request()).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("needs a publisher token"),
            "the refusal names the capability: {refused:?}"
        );
        assert!(!refused.message().contains(&admin), "{refused:?}");
        // The admin token still inspects.
        let listed = client
            .list_clusters(ListClustersRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(listed.clusters.iter().any(|c| c.cluster_id == "guarded"));
    }
    // The cluster's publisher issues one, and it subscribes.
    let mut issuer = AdminServiceClient::with_interceptor(
        broker.channel(),
        CallCredentials::bearer(&broker.token(Role::Publisher, Some("guarded"))).unwrap(),
    );
    let issued = issuer
        .create_agent_token(request())
        .await
        .unwrap()
        .into_inner();
    let mut agent = open_agent(broker.channel(), &issued.token, "guarded", "w-1")
        .await
        .unwrap();
    assert!(matches!(
        agent.expect().await,
        subscribe_response::Message::Snapshot(_)
    ));
}

#[tokio::test]
async fn an_admin_call_routed_for_another_cluster_gets_invalid_argument() {
    let broker = TestBroker::start().await;
    let publisher = broker
        .publisher("real", &[CredentialKind::Aws], false)
        .await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "routed", HOUR,
        )))
        .await;
    let held = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(status) = broker.status("real").await
                && status.version > 0
            {
                return status.version;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the credential is published");
    // An admin token may ask about any cluster, but a call whose routing
    // header names another cluster would reach that cluster's shard.
    let routed_to = |token: &str, cluster: &str| {
        let address = local_address(&broker.url(), token, cluster);
        AdminServiceClient::with_interceptor(broker.channel(), address.interceptor().unwrap())
    };
    let admin_routed_to = |cluster: &str| routed_to(&broker.token(Role::Admin, None), cluster);
    // Only a publisher issues agent tokens; its token is for "real", so a
    // header naming another cluster is refused before the body is read.
    let publisher_routed_to =
        |cluster: &str| routed_to(&broker.token(Role::Publisher, Some("real")), cluster);
    let err = admin_routed_to("elsewhere")
        .get_cluster(GetClusterRequest {
            cluster_id: "real".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        r#"the x-credstream-cluster header ("elsewhere") does not match the request's cluster_id ("real")"#
    );
    let err = publisher_routed_to("elsewhere")
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "real".into(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Nothing changed, and the same calls routed for their own cluster work.
    let status = admin_routed_to("real")
        .get_cluster(GetClusterRequest {
            cluster_id: "real".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert_eq!(status.version, held);
    assert!(broker.status("elsewhere").await.is_err(), "no cluster made");
    publisher_routed_to("real")
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "real".into(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn plaintext_on_a_non_loopback_address_is_refused() {
    let mut config = BrokerConfig::new("0.0.0.0:0".parse().unwrap(), TokenKey::generate());
    let err = server::start(config.clone()).await.unwrap_err().to_string();
    assert!(err.contains("refusing to serve plaintext"), "{err}");
    assert!(err.contains("--insecure"), "{err}");
    config.insecure = true;
    server::start(config)
        .await
        .expect("allowed with --insecure")
        .shutdown()
        .await;
}

#[tokio::test]
async fn tls_serves_the_protocol_and_the_client_library_verifies_the_server() {
    let pki = Pki::new("credstream test CA");
    let broker = TestBroker::start_with(|config| config.tls = Some(pki.broker_tls(false))).await;
    assert!(broker.url().starts_with("https://"));
    let port = broker.broker.local_addr.port();
    let address = BrokerAddress {
        url: format!("https://localhost:{port}"),
        token: broker.token(Role::Agent, Some("tls")),
        cluster_id: "tls".into(),
        ca_cert: Some(pki.ca_path()),
        client_identity: None,
        insecure: false,
        pins: Vec::new(),
    };
    let mut client =
        credstream_proto::v1::agent_service_client::AgentServiceClient::with_interceptor(
            address.channel().unwrap(),
            address.interceptor().unwrap(),
        );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(credstream_proto::v1::SubscribeRequest {
        message: Some(credstream_proto::v1::subscribe_request::Message::Hello(
            credstream_proto::v1::AgentHello {
                cluster_id: "tls".into(),
                agent_id: "a".into(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.message().await.unwrap().unwrap().message,
        Some(subscribe_response::Message::Snapshot(_))
    ));

    // A client that does not trust the CA fails the handshake.
    let other_pki = Pki::new("another CA");
    let untrusting = BrokerAddress {
        ca_cert: Some(other_pki.ca_path()),
        client_identity: None,
        ..address.clone()
    };
    let mut client = AdminServiceClient::with_interceptor(
        untrusting.channel().unwrap(),
        untrusting.interceptor().unwrap(),
    );
    let err = client
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap_err();
    assert!(
        err.message().contains("invalid peer certificate"),
        "{err:?}"
    );
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_signed_by_the_client_ca() {
    let pki = Pki::new("credstream test CA");
    let broker = TestBroker::start_with(|config| config.tls = Some(pki.broker_tls(true))).await;
    let port = broker.broker.local_addr.port();
    let admin_token = broker.token(Role::Admin, None);
    // Through the connection rules the CLIs use (`BrokerAddress`).
    let call = |client_identity: Option<ClientIdentity>| {
        let address = BrokerAddress {
            url: format!("https://localhost:{port}"),
            token: admin_token.clone(),
            cluster_id: String::new(),
            ca_cert: Some(pki.ca_path()),
            client_identity,
            insecure: false,
            pins: Vec::new(),
        };
        async move {
            AdminServiceClient::with_interceptor(
                address.channel().unwrap(),
                CallCredentials::bearer(&address.token).unwrap(),
            )
            .list_clusters(ListClustersRequest {})
            .await
        }
    };
    call(Some(pki.leaf("client", &["worker-1"]).client_identity()))
        .await
        .expect("a client certificate from the CA is accepted");
    let err = call(None).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("CertificateRequired"),
        "no client certificate: {err:?}"
    );
    let stranger = Pki::new("a stranger's CA");
    let err = call(Some(stranger.leaf("stranger", &["x"]).client_identity()))
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("alert"),
        "foreign client certificate: {err:?}"
    );
}

#[tokio::test]
async fn a_token_over_its_call_rate_gets_resource_exhausted_and_nothing_else_changes() {
    let broker = TestBroker::start_with(|config| {
        config.call_rate = credstream_broker::rate_limit::CallRate {
            // No refill within the test.
            per_second: 0.001,
            burst: 3.0,
        };
    })
    .await;
    let cluster = "limited";
    // An agent already subscribed before the admin token runs out.
    let mut agent = broker.agent(cluster, "worker-1").await;
    let _ = agent.expect().await;

    let mut admin = broker.admin();
    for _ in 0..3 {
        admin
            .list_clusters(ListClustersRequest {})
            .await
            .expect("within the burst");
    }
    let refused = admin
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("retry in"), "{refused:?}");

    // Other tokens are counted apart, the open stream is untouched, and
    // calls without a token (health) are not counted.
    let mut publisher = broker
        .publisher(cluster, &[CredentialKind::Aws], false)
        .await;
    let _ = publisher.welcome().await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "after", HOUR,
        )))
        .await;
    // (The publisher's declaration may come first.)
    while !matches!(
        agent.expect().await,
        subscribe_response::Message::Credential(_)
    ) {}
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel());
    for _ in 0..5 {
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health is not rate limited");
    }
}
