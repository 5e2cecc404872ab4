//! The broker's stream contract over real TCP: snapshots, versions, fan-out,
//! acks, half-close, takeover, bad input and shutdown.

use std::time::Duration;

use credstream_broker::auth::Role;
use credstream_proto::v1::{
    CredentialKind, EnvVar, PrivateEnv, RefreshError, Revoke, publish_request, publish_response,
    subscribe_request, subscribe_response,
};
use credstream_tests::broker::{
    TestBroker, WAIT, aws_update, gcp_update, open_agent, open_agent_with, open_publisher,
    publisher_hello,
};
use futures::future::join_all;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);
const AWS: CredentialKind = CredentialKind::Aws;
const GCP: CredentialKind = CredentialKind::Gcp;

fn env(vars: &[(&str, &str)]) -> PrivateEnv {
    PrivateEnv {
        set: vars
            .iter()
            .map(|(n, v)| EnvVar {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect(),
        ..Default::default()
    }
}

fn version_of(message: &subscribe_response::Message) -> u64 {
    match message {
        subscribe_response::Message::Snapshot(s) => s.version,
        subscribe_response::Message::Credential(c) => c.version,
        subscribe_response::Message::PrivateEnv(e) => e.version,
        subscribe_response::Message::Revocation(r) => r.version,
        subscribe_response::Message::ClusterInfo(i) => i.version,
        subscribe_response::Message::TokenRenewal(_) => 0,
    }
}

#[tokio::test]
async fn hundred_agents_receive_the_snapshot_and_every_update_in_version_order() {
    let broker = TestBroker::start().await;
    let cluster = "fanout";
    let mut publisher = broker.publisher(cluster, &[AWS], false).await;
    publisher.welcome().await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "first", HOUR,
        )))
        .await;
    // Wait until the broker holds it.
    let first_version = loop {
        let status = broker.status(cluster).await.unwrap();
        if let Some(c) = status.credentials.first() {
            break c.version;
        }
        tokio::task::yield_now().await;
    };

    // 100 agents over 10 connections.
    let channels: Vec<_> = (0..10).map(|_| broker.channel()).collect();
    let token = broker.token(Role::Agent, Some(cluster));
    let ids: Vec<String> = (0..100).map(|i| format!("agent-{i}")).collect();
    let mut agents = join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| open_agent(channels[i % 10].clone(), &token, cluster, id)),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect::<Vec<_>>();
    for agent in &mut agents {
        let subscribe_response::Message::Snapshot(snapshot) = agent.expect().await else {
            panic!("snapshot first")
        };
        assert_eq!(snapshot.credentials.len(), 1);
        assert_eq!(snapshot.credentials[0].version, first_version);
        assert!(snapshot.info.as_ref().unwrap().publisher_connected);
    }

    // Five updates; every agent sees each one, versions strictly increasing.
    let mut last = vec![first_version; agents.len()];
    for round in 0..5 {
        publisher
            .send(publish_request::Message::Credential(aws_update(
                &format!("r{round}"),
                HOUR,
            )))
            .await;
        let results = join_all(agents.iter_mut().map(|agent| async move {
            let message = agent.expect().await;
            let subscribe_response::Message::Credential(update) = &message else {
                panic!("expected a credential, got {message:?}")
            };
            let v = update.version;
            agent
                .send(subscribe_request::Message::Ack(
                    credstream_proto::v1::AgentAck { version: v },
                ))
                .await;
            (v, update.clone())
        }))
        .await;
        for (i, (version, update)) in results.iter().enumerate() {
            assert!(*version > last[i], "versions strictly increase");
            last[i] = *version;
            let Some(credstream_proto::v1::credential_update::Credential::Aws(aws)) =
                &update.credential
            else {
                panic!()
            };
            assert_eq!(aws.access_key_id, format!("ASIAr{round}"));
        }
        assert!(
            results.windows(2).all(|w| w[0].0 == w[1].0),
            "every agent got the same version"
        );
        // The publisher learns that all 100 hold it.
        let target = results[0].0;
        publisher
            .until(|m| match &m.message {
                Some(publish_response::Message::UpdateAck(ack))
                    if ack.version == target && ack.agents_current == 100 =>
                {
                    Some(())
                }
                _ => None,
            })
            .await;
    }
    let status = broker.status(cluster).await.unwrap();
    assert_eq!(status.agents.len(), 100);
    assert!(status.agents.iter().all(|a| a.acked_version == last[0]));

    // A late agent gets the latest state in its snapshot.
    let mut late = open_agent(broker.channel(), &token, cluster, "late")
        .await
        .unwrap();
    let subscribe_response::Message::Snapshot(snapshot) = late.expect().await else {
        panic!()
    };
    assert_eq!(snapshot.credentials[0].version, last[0]);
}

#[tokio::test]
async fn a_stalled_agent_does_not_delay_others_and_converges_on_the_latest() {
    let broker = TestBroker::start().await;
    let cluster = "stall";
    let publisher = broker.publisher(cluster, &[], true).await;
    let token = broker.token(Role::Agent, Some(cluster));
    // The stalled agent has its own connection with a 64 KiB window and
    // never reads after the snapshot.
    let small_window = tonic::transport::Endpoint::from_shared(broker.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect_lazy();
    let mut stalled = open_agent(small_window, &token, cluster, "stalled")
        .await
        .unwrap();
    let _ = stalled.expect().await;
    let mut healthy = open_agent(broker.channel(), &token, cluster, "healthy")
        .await
        .unwrap();
    let _ = healthy.expect().await;

    // 400 env updates of ~8 KiB each: ~3 MiB, far beyond the HTTP/2 window.
    let big = "x".repeat(8 * 1024);
    let mut last_version = 0;
    for i in 0..400 {
        publisher
            .send(publish_request::Message::PrivateEnv(env(&[
                ("BIG", &big),
                ("ROUND", &i.to_string()),
            ])))
            .await;
        // The healthy agent keeps up (it may skip versions, never stalls).
        loop {
            let message = healthy.expect().await;
            if let subscribe_response::Message::PrivateEnv(e) = &message
                && e.set
                    .iter()
                    .any(|v| v.name == "ROUND" && v.value == i.to_string())
            {
                assert!(e.version > last_version);
                last_version = e.version;
                break;
            }
        }
    }
    // The stalled agent now reads: it converges on the latest version, and
    // it was sent only what its 64 KiB window and the server's HTTP/2 send
    // buffer (400 KiB in hyper) hold — about 58 messages of 8 KiB — not all
    // 400: the broker queued nothing of its own for it.
    let mut received = 0;
    loop {
        let message = stalled.expect().await;
        received += 1;
        if version_of(&message) == last_version {
            break;
        }
    }
    assert!(
        received <= 64,
        "the stalled agent was queued {received} messages"
    );
}

#[tokio::test]
async fn a_half_closed_agent_keeps_receiving() {
    let broker = TestBroker::start().await;
    let cluster = "halfclose";
    let publisher = broker.publisher(cluster, &[AWS], false).await;
    let mut agent = broker.agent(cluster, "a1").await;
    let _ = agent.expect().await;
    // Half-close: drop the sending side.
    let (dummy, _) = tokio::sync::mpsc::channel(1);
    drop(std::mem::replace(&mut agent.tx, dummy));
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "after-close",
            HOUR,
        )))
        .await;
    loop {
        if let subscribe_response::Message::Credential(update) = agent.expect().await {
            assert!(update.version > 0);
            break;
        }
    }
}

#[tokio::test]
async fn snapshot_carries_credentials_env_and_declaration() {
    let broker = TestBroker::start().await;
    let cluster = "snap";
    let mut publisher = broker.publisher(cluster, &[AWS, GCP], true).await;
    let welcome = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::Welcome(w)) => Some(w.clone()),
            _ => None,
        })
        .await;
    assert_eq!(welcome.missing.len(), 2);
    assert!(welcome.private_env_missing);
    publisher
        .send(publish_request::Message::Credential(aws_update("a", HOUR)))
        .await;
    publisher
        .send(publish_request::Message::Credential(gcp_update("g", HOUR)))
        .await;
    publisher
        .send(publish_request::Message::PrivateEnv(env(&[(
            "AUTH_TOKEN_FOR_CUSTOM_DATABASE",
            "db-secret",
        )])))
        .await;
    let status = loop {
        let status = broker.status(cluster).await.unwrap();
        if status.credentials.len() == 2 && status.private_env.is_some() {
            break status;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(
        status.private_env.unwrap().names,
        vec!["AUTH_TOKEN_FOR_CUSTOM_DATABASE"]
    );
    let mut agent = broker.agent(cluster, "a").await;
    let subscribe_response::Message::Snapshot(snapshot) = agent.expect().await else {
        panic!()
    };
    assert_eq!(snapshot.credentials.len(), 2);
    assert_eq!(
        snapshot.private_env.as_ref().unwrap().set[0].value,
        "db-secret"
    );
    assert!(snapshot.private_env.unwrap().replace_all);
    let info = snapshot.info.unwrap();
    assert_eq!(info.kinds, vec![AWS as i32, GCP as i32]);
    assert!(info.private_env);
}

#[tokio::test]
async fn a_new_publisher_takes_over_and_the_old_stream_ends_aborted() {
    let broker = TestBroker::start().await;
    let cluster = "takeover";
    let token = broker.token(Role::Publisher, Some(cluster));
    let mut old = open_publisher(
        broker.channel(),
        &token,
        Some(publisher_hello(cluster, &[AWS], false)),
    )
    .await
    .unwrap();
    old.welcome().await;
    let mut new = open_publisher(
        broker.channel(),
        &token,
        Some(publisher_hello(cluster, &[AWS], false)),
    )
    .await
    .unwrap();
    new.welcome().await;
    let status = old.ended_with().await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("took over"));
}

#[tokio::test]
async fn revocation_reaches_every_agent() {
    let broker = TestBroker::start().await;
    let cluster = "revoke";
    let publisher = broker.publisher(cluster, &[AWS], true).await;
    publisher
        .send(publish_request::Message::Credential(aws_update("r", HOUR)))
        .await;
    publisher
        .send(publish_request::Message::PrivateEnv(env(&[("K", "v")])))
        .await;
    let token = broker.token(Role::Agent, Some(cluster));
    let mut agents = Vec::new();
    for i in 0..20 {
        let mut agent = open_agent(broker.channel(), &token, cluster, &format!("a{i}"))
            .await
            .unwrap();
        loop {
            // Wait until this agent holds the env (snapshot or update).
            match agent.expect().await {
                subscribe_response::Message::Snapshot(s)
                    if s.private_env.is_some() && !s.credentials.is_empty() =>
                {
                    break;
                }
                subscribe_response::Message::PrivateEnv(_) => break,
                _ => {}
            }
        }
        agents.push(agent);
    }
    publisher
        .send(publish_request::Message::Revoke(Revoke {
            kinds: vec![],
            all: true,
        }))
        .await;
    for agent in &mut agents {
        let revocation = loop {
            if let subscribe_response::Message::Revocation(r) = agent.expect().await {
                break r;
            }
        };
        // Both the AWS slot and the env are revoked (possibly in one or two
        // messages); collect until both seen.
        let mut kinds = revocation.kinds.clone();
        let mut env = revocation.private_env;
        while !(env && kinds.contains(&(AWS as i32))) {
            if let subscribe_response::Message::Revocation(r) = agent.expect().await {
                kinds.extend(r.kinds);
                env |= r.private_env;
            }
        }
    }
    let status = broker.status(cluster).await.unwrap();
    assert!(status.credentials.is_empty());
    assert!(status.private_env.is_none());
}

/// Expects the stream to end with `code`, and returns the message.
async fn publisher_error(
    broker: &TestBroker,
    cluster: &str,
    messages: Vec<publish_request::Message>,
) -> tonic::Status {
    let mut iter = messages.into_iter();
    let first = iter.next();
    let mut publisher = match open_publisher(
        broker.channel(),
        &broker.token(Role::Publisher, Some(cluster)),
        first,
    )
    .await
    {
        Ok(p) => p,
        Err(status) => return status,
    };
    for message in iter {
        let _ = publisher
            .tx
            .send(credstream_proto::v1::PublishRequest {
                message: Some(message),
            })
            .await;
    }
    publisher.ended_with().await
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_keeps_the_state() {
    let broker = TestBroker::start().await;
    let cluster = "bad";
    // Establish a good state first.
    let good = broker.publisher(cluster, &[AWS], true).await;
    good.send(publish_request::Message::Credential(aws_update(
        "good", HOUR,
    )))
    .await;
    good.send(publish_request::Message::PrivateEnv(env(&[("GOOD", "1")])))
        .await;
    let before = loop {
        let s = broker.status(cluster).await.unwrap();
        if !s.credentials.is_empty() && s.private_env.is_some() {
            break s;
        }
        tokio::task::yield_now().await;
    };
    let mut agent = broker.agent(cluster, "watcher").await;
    let _ = agent.expect().await;

    let hello = || publisher_hello(cluster, &[AWS], true);
    // Each bad message comes on a new stream that takes over first, so test
    // the message rather than the takeover: messages after a valid hello.
    let cases: Vec<(&str, Vec<publish_request::Message>, Code, &str)> = vec![
        (
            "no hello",
            vec![publish_request::Message::Credential(aws_update("x", HOUR))],
            Code::FailedPrecondition,
            "first message",
        ),
        (
            "second hello",
            vec![hello(), hello()],
            Code::FailedPrecondition,
            "second hello",
        ),
        (
            "bad env name",
            vec![
                hello(),
                publish_request::Message::PrivateEnv(env(&[("BAD-NAME", "v")])),
            ],
            Code::InvalidArgument,
            "BAD-NAME",
        ),
        (
            "too many env vars",
            vec![
                hello(),
                publish_request::Message::PrivateEnv(PrivateEnv {
                    set: (0..1001)
                        .map(|i| EnvVar {
                            name: format!("V{i}"),
                            value: "v".into(),
                        })
                        .collect(),
                    ..Default::default()
                }),
            ],
            Code::InvalidArgument,
            "at most 1000",
        ),
        (
            "expired credential",
            vec![
                hello(),
                publish_request::Message::Credential({
                    let mut u = aws_update("old", HOUR);
                    u.expires_at = Some(credstream_proto::convert::timestamp(
                        std::time::SystemTime::now() - HOUR,
                    ));
                    u.issued_at = None;
                    u
                }),
            ],
            Code::InvalidArgument,
            "already expired",
        ),
        (
            "long-term keys",
            vec![
                hello(),
                publish_request::Message::Credential({
                    let mut u = aws_update("lt", HOUR);
                    if let Some(credstream_proto::v1::credential_update::Credential::Aws(aws)) =
                        &mut u.credential
                    {
                        aws.session_token.clear();
                    }
                    u
                }),
            ],
            Code::InvalidArgument,
            "session_token is required",
        ),
        (
            "empty message",
            vec![
                hello(),
                publish_request::Message::RefreshError(RefreshError::default()),
            ],
            Code::InvalidArgument,
            "refresh_request_id",
        ),
        (
            "oversized",
            vec![
                hello(),
                publish_request::Message::PrivateEnv(env(&[("HUGE", &"x".repeat(300 * 1024))])),
            ],
            Code::OutOfRange,
            "too large",
        ),
    ];
    for (name, messages, code, needle) in cases {
        // Reconnect the good publisher state check after each case.
        let status = publisher_error(&broker, cluster, messages).await;
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: {:?}",
            status.message()
        );
        assert!(!status.message().contains("SECRETKEY"), "{name}");
        let after = broker.status(cluster).await.unwrap();
        assert_eq!(
            after.credentials, before.credentials,
            "{name}: credentials intact"
        );
        assert_eq!(after.private_env, before.private_env, "{name}: env intact");
    }
    // Agents never saw a change to the credentials or env: a good publisher
    // now sends a marker, and everything the agent got before it is a
    // publisher declaration (each case's hello), nothing else.
    let marker = broker.publisher(cluster, &[AWS], true).await;
    marker
        .send(publish_request::Message::PrivateEnv(env(&[(
            "MARKER", "1",
        )])))
        .await;
    loop {
        match agent.expect().await {
            subscribe_response::Message::ClusterInfo(_) => {}
            subscribe_response::Message::PrivateEnv(env)
                if env.set.iter().any(|v| v.name == "MARKER") =>
            {
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // Agent-side bad input.
    let token = broker.token(Role::Agent, Some(cluster));
    let err = open_agent_with(
        broker.channel(),
        &token,
        Some(subscribe_request::Message::Ack(Default::default())),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = open_agent(broker.channel(), &token, cluster, "bad id!")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("agent_id"));
    let mut agent = open_agent(broker.channel(), &token, cluster, "twice")
        .await
        .unwrap();
    let _ = agent.expect().await;
    agent
        .send(subscribe_request::Message::Hello(Default::default()))
        .await;
    let status = agent.ended_with().await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    let _ = WAIT;
}

#[tokio::test]
async fn a_hello_for_another_cluster_than_the_token_and_header_is_denied() {
    let broker = TestBroker::start().await;
    // A publisher token for "a", the routing header "a", a hello for "b".
    let address = broker.address(Role::Publisher, "a");
    let channel = address.channel().unwrap();
    let creds = address.interceptor().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(credstream_proto::v1::PublishRequest {
        message: Some(publisher_hello("b", &[], false)),
    })
    .await
    .unwrap();
    let mut client =
        credstream_proto::v1::publisher_service_client::PublisherServiceClient::with_interceptor(
            channel, creds,
        );
    let mut stream = client
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable_and_health_turns_not_serving() {
    let broker = TestBroker::start().await;
    let cluster = "shutdown";
    let mut agent = broker.agent(cluster, "a").await;
    let _ = agent.expect().await;
    let mut publisher = broker.publisher(cluster, &[], false).await;
    publisher.welcome().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1, "SERVING");
    let TestBroker {
        broker: running, ..
    } = broker;
    let stopping = tokio::spawn(running.shutdown());
    let status = agent.ended_with().await;
    assert_eq!(status.code(), Code::Unavailable);
    let status = publisher.ended_with().await;
    assert_eq!(status.code(), Code::Unavailable);
    // The health watch saw NOT_SERVING before the server went away.
    let mut saw_not_serving = false;
    while let Ok(Some(update)) = watch.message().await {
        if update.status == 2 {
            saw_not_serving = true;
            break;
        }
    }
    assert!(saw_not_serving);
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_never_says_hello_is_ended_after_30_seconds() {
    let broker = TestBroker::start().await;
    let cluster = "silent";
    let mut publisher = open_publisher(
        broker.channel(),
        &broker.token(Role::Publisher, Some(cluster)),
        None,
    )
    .await
    .unwrap();
    // The paused clock jumps to the broker's 30 s deadline; the harness's
    // usual 20 s wait would run out first.
    let status = tokio::time::timeout(Duration::from_secs(60), publisher.rx.message())
        .await
        .expect("ended within 60 s")
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("no hello"));
    let err = open_agent_with(
        broker.channel(),
        &broker.token(Role::Agent, Some(cluster)),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test]
async fn a_compressed_subscribe_is_refused_and_the_connected_agents_stay() {
    use credstream_proto::v1::agent_service_client::AgentServiceClient;
    use credstream_proto::v1::{AgentHello, SubscribeRequest};

    let broker = TestBroker::start().await;
    let cluster = "compressed";
    let mut publisher = broker.publisher(cluster, &[AWS], false).await;
    let _ = publisher.welcome().await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "one", HOUR,
        )))
        .await;
    let mut plain = broker.agent(cluster, "plain").await;
    let _ = plain.expect().await;

    // The broker decodes no compressed messages; the header alone is
    // refused, before any message is read.
    let token = broker.token(Role::Agent, Some(cluster));
    let authorization: tonic::metadata::MetadataValue<_> =
        format!("Bearer {token}").parse().unwrap();
    let mut client = AgentServiceClient::with_interceptor(
        broker.channel(),
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
            request
                .metadata_mut()
                .insert("grpc-encoding", "gzip".parse().unwrap());
            Ok(request)
        },
    );
    let hello = SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(AgentHello {
            cluster_id: cluster.into(),
            agent_id: "gzip".into(),
            ..Default::default()
        })),
    };
    let status = tokio::time::timeout(WAIT, client.subscribe(futures::stream::iter([hello])))
        .await
        .expect("answered")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("uncompressed"), "{status:?}");

    // Nothing changed: one agent, which still gets the next version.
    let agents = broker.status(cluster).await.unwrap().agents;
    let ids: Vec<_> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["plain"]);
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "two", HOUR,
        )))
        .await;
    assert!(matches!(
        plain.expect().await,
        subscribe_response::Message::Credential(_)
    ));
}
