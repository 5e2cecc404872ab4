//! The local HTTP surfaces, driven over real loopback connections with a
//! store filled directly: every status each endpoint can answer, and that
//! no error body carries a secret.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use credstream_agent::http::{self, AuthToken, LocalServer, advertised};
use credstream_agent::store::CredentialStore;
use credstream_proto::v1::CredentialKind;

const FLAVOR: (&str, &str) = ("Metadata-Flavor", "Google");
const HOUR: Option<Duration> = Some(Duration::from_secs(3600));

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{reply:?}"
    );
    assert_eq!(reply.json()["code"], code, "{reply:?}");
    assert!(
        reply.json()["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn aws_endpoint_requires_the_agents_token_as_is() {
    let agent = start(ready_store(), true).await;
    let path = http::AWS_CREDENTIALS_PATH;

    let missing = get(agent.addr, path, &[]).await;
    assert_error(&missing, 401, "missing_token");

    let wrong = get(agent.addr, path, &[("Authorization", "not-the-token")]).await;
    assert_error(&wrong, 403, "wrong_token");

    let bearer = format!("Bearer {}", agent.token());
    let prefixed = get(agent.addr, path, &[("Authorization", &bearer)]).await;
    assert_error(&prefixed, 403, "wrong_token");

    let ok = get(agent.addr, path, &[("Authorization", agent.token())]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("content-type"), Some("application/json"));
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    let body = ok.json();
    assert_eq!(body["AccessKeyId"], "ASIAFIRST");
    assert_eq!(body["SecretAccessKey"], format!("{AWS_SECRET}-ASIAFIRST"));
    assert_eq!(body["Token"], format!("{AWS_SESSION}-ASIAFIRST"));
    assert_eq!(body["AccountId"], "123456789012");
    let expiration = body["Expiration"].as_str().unwrap();
    assert!(expiration.ends_with('Z'), "{expiration}");
    // The credential lasts an hour; the endpoint advertises at most
    // AWS_LIFETIME of it, so that a revocation reaches cached SDK clients.
    let parsed = humantime::parse_rfc3339(expiration).unwrap();
    let left = parsed.duration_since(SystemTime::now()).unwrap();
    assert!(left <= advertised::AWS_LIFETIME, "{left:?}");
    assert!(left > Duration::from_secs(15 * 60), "{left:?}");
}

#[tokio::test]
async fn aws_endpoint_omits_an_unknown_account() {
    let store = CredentialStore::new();
    store.apply(info(&[CredentialKind::Aws], false, 1));
    let mut credential = credstream_proto::v1::AwsCredential::default();
    credential.access_key_id = "ASIANOACCOUNT".into();
    credential.secret_access_key = "s".into();
    credential.session_token = "t".into();
    store.apply(update(
        2,
        credstream_proto::v1::credential_update::Credential::Aws(credential),
        HOUR,
    ));
    let agent = start(store, true).await;
    let ok = get(
        agent.addr,
        http::AWS_CREDENTIALS_PATH,
        &[("Authorization", agent.token())],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert!(ok.json().get("AccountId").is_none(), "{}", ok.body);
}

#[tokio::test]
async fn aws_endpoint_answers_503_instead_of_an_expired_credential() {
    let store = CredentialStore::new();
    let agent = start(store.clone(), true).await;
    let auth = [("Authorization", agent.token())];
    let path = http::AWS_CREDENTIALS_PATH;

    let nothing = get(agent.addr, path, &auth).await;
    assert_error(&nothing, 503, "aws_credential_unavailable");
    assert!(nothing.body.contains("snapshot"), "{}", nothing.body);

    store.apply(info(&[CredentialKind::Aws], false, 1));
    let missing = get(agent.addr, path, &auth).await;
    assert_error(&missing, 503, "aws_credential_unavailable");
    assert!(
        missing.body.contains("no AWS credential"),
        "{}",
        missing.body
    );

    store.apply(aws(2, "ASIAEXPIRED", None));
    let expired = get(agent.addr, path, &auth).await;
    assert_error(&expired, 503, "aws_credential_unavailable");
    assert!(expired.body.contains("expired"), "{}", expired.body);
    assert!(!expired.body.contains(AWS_SECRET), "{}", expired.body);
    assert!(!expired.body.contains(AWS_SESSION), "{}", expired.body);

    store.apply(aws(3, "ASIAFRESH", HOUR));
    let fresh = get(agent.addr, path, &auth).await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.json()["AccessKeyId"], "ASIAFRESH");
}

#[tokio::test]
async fn aws_endpoint_says_when_the_cluster_does_not_publish_aws() {
    let store = CredentialStore::new();
    store.apply(info(&[CredentialKind::Gcp], false, 1));
    let agent = start(store, true).await;
    let reply = get(
        agent.addr,
        http::AWS_CREDENTIALS_PATH,
        &[("Authorization", agent.token())],
    )
    .await;
    assert_error(&reply, 503, "aws_credential_unavailable");
    assert!(reply.body.contains("does not publish"), "{}", reply.body);
}

#[tokio::test]
async fn gce_metadata_emulation_serves_what_google_auth_reads() {
    let agent = start(ready_store(), true).await;
    let base = "/computeMetadata/v1";

    let ping = get(agent.addr, "/", &[FLAVOR]).await;
    assert_eq!(ping.status, 200);
    assert_eq!(ping.header("metadata-flavor"), Some("Google"));

    let project = get(agent.addr, &format!("{base}/project/project-id"), &[FLAVOR]).await;
    assert_eq!(
        (project.status, project.body.as_str()),
        (200, "demo-project")
    );

    let info = get(
        agent.addr,
        &format!("{base}/instance/service-accounts/default/?recursive=true"),
        &[FLAVOR],
    )
    .await;
    assert_eq!(info.status, 200);
    assert_eq!(info.header("content-type"), Some("application/json"));
    let email = "worker@demo-project.iam.gserviceaccount.com";
    assert_eq!(info.json()["email"], email);
    assert_eq!(info.json()["aliases"][0], "default");
    assert_eq!(
        info.json()["scopes"][0],
        "https://www.googleapis.com/auth/cloud-platform"
    );

    for account in ["default", email] {
        let token = get(
            agent.addr,
            &format!("{base}/instance/service-accounts/{account}/token?scopes=a,b"),
            &[FLAVOR],
        )
        .await;
        assert_eq!(token.status, 200, "{token:?}");
        assert_eq!(token.header("content-type"), Some("application/json"));
        assert_eq!(token.header("cache-control"), Some("no-store"));
        let body = token.json();
        assert_eq!(body["access_token"], GCP_TOKEN);
        assert_eq!(body["token_type"], "Bearer");
        let expires_in = body["expires_in"].as_u64().unwrap();
        // An hour's token, advertised for at most GCP_LIFETIME.
        assert!(
            expires_in > 300 && expires_in <= advertised::GCP_LIFETIME.as_secs(),
            "{expires_in}"
        );
    }

    let text = |path: &str| {
        let path = format!("{base}/{path}");
        async move { get(agent.addr, &path, &[FLAVOR]).await }
    };
    let email_reply = text("instance/service-accounts/default/email").await;
    assert_eq!(email_reply.body, email);
    let scopes = text("instance/service-accounts/default/scopes").await;
    assert_eq!(
        scopes.body,
        "https://www.googleapis.com/auth/cloud-platform\n"
    );
    let universe = text("universe/universe-domain").await;
    assert_eq!(
        (universe.status, universe.body.as_str()),
        (200, "googleapis.com")
    );
    let listing = text("instance/service-accounts/").await;
    assert_eq!(listing.body, format!("default/\n{email}/\n"));

    let other_account = text("instance/service-accounts/someone@else/token").await;
    assert_error(&other_account, 404, "metadata_not_found");
    let unknown = text("instance/zone").await;
    assert_error(&unknown, 404, "metadata_not_found");
    assert_eq!(unknown.header("metadata-flavor"), Some("Google"));

    for reply in [ping, project, email_reply, scopes, universe, listing] {
        assert!(reply.header("content-type").is_some(), "{reply:?}");
        assert_eq!(reply.header("metadata-flavor"), Some("Google"), "{reply:?}");
    }
}

#[tokio::test]
async fn gce_metadata_refuses_requests_without_the_flavor_or_through_a_proxy() {
    let agent = start(ready_store(), true).await;
    let token_path = "/computeMetadata/v1/instance/service-accounts/default/token";
    for path in ["/", token_path] {
        let bare = get(agent.addr, path, &[]).await;
        assert_error(&bare, 403, "missing_metadata_flavor");
        assert_eq!(bare.header("metadata-flavor"), Some("Google"));

        let wrong = get(agent.addr, path, &[("Metadata-Flavor", "Amazon")]).await;
        assert_error(&wrong, 403, "missing_metadata_flavor");

        let proxied = get(agent.addr, path, &[FLAVOR, ("X-Forwarded-For", "10.0.0.1")]).await;
        assert_error(&proxied, 403, "forwarded_request");
        for reply in [bare, wrong, proxied] {
            assert!(!reply.body.contains(GCP_TOKEN));
        }
    }
}

/// A path, the headers a legitimate caller sends, and what the answer reveals.
type SecretRequest = (&'static str, Vec<(&'static str, String)>, String);

/// Every path, with what a legitimate caller sends, and the secret it would
/// reveal.
fn secret_requests(agent: &Running) -> Vec<SecretRequest> {
    let auth = ("Authorization", agent.token().to_owned());
    let flavor = ("Metadata-Flavor", "Google".to_owned());
    vec![
        (
            http::AWS_CREDENTIALS_PATH,
            vec![auth.clone()],
            format!("{AWS_SECRET}-ASIAFIRST"),
        ),
        (http::ENV_PATH, vec![auth], "db-secret-value".to_owned()),
        (
            "/computeMetadata/v1/instance/service-accounts/default/token",
            vec![flavor.clone()],
            GCP_TOKEN.to_owned(),
        ),
        (
            "/computeMetadata/v1/project/project-id",
            vec![flavor.clone()],
            "demo-project".to_owned(),
        ),
        ("/", vec![flavor], "computeMetadata".to_owned()),
        (http::READY_PATH, vec![], "\"ready\"".to_owned()),
    ]
}

#[tokio::test]
async fn requests_for_a_foreign_host_are_refused_with_no_data() {
    // A web page whose name was rebound to 127.0.0.1 is same-origin with the
    // agent and may set any header, but its requests carry its own Host.
    let agent = start(ready_store(), true).await;
    let port = agent.addr.port();
    let foreign = [
        Some("attacker.example".to_owned()),
        Some(format!("attacker.example:{port}")),
        Some(format!("127.0.0.1.attacker.example:{port}")),
        Some("localhost.attacker.example".to_owned()),
        Some("10.0.0.1".to_owned()),
        Some("[::2]:80".to_owned()),
        Some("".to_owned()),
        Some("127.0.0.1:notaport".to_owned()),
        None,
    ];
    for (path, headers, secret) in secret_requests(&agent) {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        for host in &foreign {
            let reply = get_as(agent.addr, host.as_deref(), path, &headers).await;
            assert_error(&reply, 403, "host_not_allowed");
            assert!(!reply.body.contains(&secret), "{host:?} {path}: {reply:?}");
            assert!(!reply.body.contains("attacker"), "echoed: {reply:?}");
        }
        // Two Host headers, one of them ours: refused too.
        let twice = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: attacker.example\r\n{}Connection: close\r\n\r\n",
            headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect::<String>()
        );
        let reply = send_raw(agent.addr, twice.as_bytes()).await;
        assert!(reply.status == 400 || reply.status == 403, "{reply:?}");
        assert!(!reply.body.contains(&secret), "{reply:?}");
        // An absolute-form request naming another host.
        let absolute = format!(
            "GET http://attacker.example{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{}Connection: close\r\n\r\n",
            headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n"))
                .collect::<String>()
        );
        let reply = send_raw(agent.addr, absolute.as_bytes()).await;
        assert_error(&reply, 403, "host_not_allowed");
        assert!(!reply.body.contains(&secret), "{reply:?}");
    }
    // The metadata names are for the metadata paths only.
    for host in ["metadata.google.internal", "metadata:80"] {
        for path in [http::AWS_CREDENTIALS_PATH, http::ENV_PATH, http::READY_PATH] {
            let reply = get_as(
                agent.addr,
                Some(host),
                path,
                &[("Authorization", agent.token())],
            )
            .await;
            assert_error(&reply, 403, "host_not_allowed");
        }
    }
}

#[tokio::test]
async fn loopback_hosts_and_the_metadata_names_are_served() {
    let agent = start(ready_store(), true).await;
    let port = agent.addr.port();
    let loopback = [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("127.1.2.3:{port}"),
        format!("localhost:{port}"),
        "LocalHost".to_owned(),
        format!("[::1]:{port}"),
        "[::1]".to_owned(),
    ];
    for (path, headers, secret) in secret_requests(&agent) {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        for host in &loopback {
            let reply = get_as(agent.addr, Some(host), path, &headers).await;
            assert_eq!(reply.status, 200, "{host} {path}: {reply:?}");
            assert!(reply.body.contains(&secret), "{host} {path}: {reply:?}");
        }
    }
    let token_path = "/computeMetadata/v1/instance/service-accounts/default/token";
    for host in [
        "metadata.google.internal",
        "Metadata.Google.Internal:80",
        "metadata",
    ] {
        for path in ["/", token_path] {
            let reply = get_as(agent.addr, Some(host), path, &[FLAVOR]).await;
            assert_eq!(reply.status, 200, "{host} {path}: {reply:?}");
        }
    }
}

#[tokio::test]
async fn cors_preflights_and_web_page_requests_get_no_cors_headers() {
    let agent = start(ready_store(), true).await;
    let port = agent.addr.port();
    for (path, headers, secret) in secret_requests(&agent) {
        let preflight = format!(
            "OPTIONS {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://attacker.example\r\n\
             Access-Control-Request-Method: GET\r\n\
             Access-Control-Request-Headers: metadata-flavor, authorization\r\nConnection: close\r\n\r\n"
        );
        let reply = send_raw(agent.addr, preflight.as_bytes()).await;
        assert!(reply.status >= 400, "{path}: {reply:?}");
        assert!(
            !reply
                .headers
                .iter()
                .any(|(name, _)| name.to_ascii_lowercase().starts_with("access-control-")),
            "{path}: {reply:?}"
        );
        // A request a page sends cross-origin (fetch with mode no-cors, or
        // after a preflight another server answered): refused outright.
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .chain([("Origin", "https://attacker.example")])
            .collect();
        let reply = get(agent.addr, path, &headers).await;
        assert_error(&reply, 403, "cross_origin_request");
        assert!(!reply.body.contains(&secret), "{reply:?}");
        assert!(
            !reply
                .headers
                .iter()
                .any(|(name, _)| name.to_ascii_lowercase().starts_with("access-control-")),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn gce_token_is_503_when_expired_or_missing() {
    let store = CredentialStore::new();
    store.apply(info(&[CredentialKind::Gcp], false, 1));
    let agent = start(store.clone(), true).await;
    let token_path = "/computeMetadata/v1/instance/service-accounts/default/token";

    let missing = get(agent.addr, token_path, &[FLAVOR]).await;
    assert_error(&missing, 503, "gcp_credential_unavailable");
    assert_eq!(missing.header("metadata-flavor"), Some("Google"));
    let info_missing = get(
        agent.addr,
        "/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
        &[FLAVOR],
    )
    .await;
    assert_error(&info_missing, 503, "gcp_credential_unavailable");

    store.apply(gcp(2, GCP_TOKEN, None));
    let expired = get(agent.addr, token_path, &[FLAVOR]).await;
    assert_error(&expired, 503, "gcp_credential_unavailable");
    assert!(expired.body.contains("expired"), "{}", expired.body);
    assert!(!expired.body.contains(GCP_TOKEN), "{}", expired.body);
    // The account's metadata does not expire with the token.
    let email = get(
        agent.addr,
        "/computeMetadata/v1/instance/service-accounts/default/email",
        &[FLAVOR],
    )
    .await;
    assert_eq!(email.status, 200);
}

#[tokio::test]
async fn gce_metadata_can_be_turned_off() {
    let agent = start(ready_store(), false).await;
    let ping = get(agent.addr, "/", &[FLAVOR]).await;
    assert_error(&ping, 404, "not_found");
    assert_eq!(ping.header("metadata-flavor"), None);
    let token = get(
        agent.addr,
        "/computeMetadata/v1/instance/service-accounts/default/token",
        &[FLAVOR],
    )
    .await;
    assert_error(&token, 404, "not_found");
}

#[tokio::test]
async fn env_endpoint_is_token_protected_json() {
    let agent = start(ready_store(), true).await;
    assert_error(
        &get(agent.addr, http::ENV_PATH, &[]).await,
        401,
        "missing_token",
    );
    assert_error(
        &get(agent.addr, http::ENV_PATH, &[("Authorization", "x")]).await,
        403,
        "wrong_token",
    );
    let ok = get(
        agent.addr,
        http::ENV_PATH,
        &[("Authorization", agent.token())],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.json(),
        serde_json::json!({"AUTH_TOKEN_FOR_CUSTOM_DATABASE": "db-secret-value"})
    );
}

#[tokio::test]
async fn env_endpoint_waits_for_a_declared_env_and_is_empty_without_one() {
    let store = CredentialStore::new();
    let agent = start(store.clone(), true).await;
    let auth = [("Authorization", agent.token())];
    assert_error(
        &get(agent.addr, http::ENV_PATH, &auth).await,
        503,
        "not_ready",
    );

    store.apply(info(&[], true, 1));
    let pending = get(agent.addr, http::ENV_PATH, &auth).await;
    assert_error(&pending, 503, "private_env_unavailable");

    store.apply(info(&[], false, 2));
    let none = get(agent.addr, http::ENV_PATH, &auth).await;
    assert_eq!((none.status, none.json()), (200, serde_json::json!({})));
}

#[tokio::test]
async fn readyz_tells_the_truth() {
    let store = CredentialStore::new();
    let agent = start(store.clone(), true).await;
    let ready = || get(agent.addr, http::READY_PATH, &[]);

    let before = ready().await;
    assert_error(&before, 503, "not_ready");
    assert!(before.body.contains("snapshot"), "{}", before.body);

    store.apply(info(&[CredentialKind::Aws, CredentialKind::Gcp], true, 1));
    store.apply(aws(2, "ASIAFIRST", HOUR));
    let missing = ready().await;
    assert_error(&missing, 503, "not_ready");
    assert!(missing.body.contains("gcp"), "{}", missing.body);

    store.apply(gcp(3, GCP_TOKEN, None));
    let expired = ready().await;
    assert!(expired.body.contains("expired"), "{}", expired.body);

    store.apply(gcp(4, GCP_TOKEN, HOUR));
    let no_env = ready().await;
    assert!(
        no_env.body.contains("private environment"),
        "{}",
        no_env.body
    );

    store.apply(env(5, &[]));
    let ok = ready().await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.json()["status"], "ready");
}

#[tokio::test]
async fn unknown_paths_and_methods_are_refused() {
    let agent = start(ready_store(), true).await;
    assert_error(&get(agent.addr, "/nope", &[]).await, 404, "not_found");
    assert_error(
        &get(agent.addr, "/aws/credentials/extra", &[]).await,
        404,
        "not_found",
    );
    let post = send_raw(
        agent.addr,
        format!(
            "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            http::AWS_CREDENTIALS_PATH
        )
        .as_bytes(),
    )
    .await;
    assert_error(&post, 405, "method_not_allowed");
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let agent = start(ready_store(), true).await;
    let huge = "a".repeat(http::MAX_HEADER_BYTES + 1);
    let reply = get(agent.addr, "/readyz", &[("X-Padding", &huge)]).await;
    assert_eq!(reply.status, 431, "{reply:?}");

    let many: Vec<(String, String)> = (0..=http::MAX_HEADERS)
        .map(|i| (format!("X-H{i}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let reply = get(agent.addr, "/readyz", &many).await;
    assert_eq!(reply.status, 431, "{reply:?}");
}

#[tokio::test]
async fn no_error_body_carries_a_secret() {
    let store = ready_store();
    let agent = start(store.clone(), true).await;
    let token = agent.token().to_owned();
    let secrets = [
        AWS_SECRET,
        AWS_SESSION,
        GCP_TOKEN,
        "db-secret-value",
        token.as_str(),
    ];
    let mut replies = vec![
        get(agent.addr, http::AWS_CREDENTIALS_PATH, &[]).await,
        get(
            agent.addr,
            http::AWS_CREDENTIALS_PATH,
            &[("Authorization", "x")],
        )
        .await,
        get(agent.addr, http::ENV_PATH, &[("Authorization", AWS_SECRET)]).await,
        get(
            agent.addr,
            "/computeMetadata/v1/instance/service-accounts/default/token",
            &[],
        )
        .await,
        get(agent.addr, &format!("/{GCP_TOKEN}"), &[]).await,
        get(agent.addr, "/nope", &[("Authorization", &token)]).await,
    ];
    // Expire everything, then ask again with the right credentials.
    store.apply(aws(10, "ASIAFIRST", None));
    store.apply(gcp(11, GCP_TOKEN, None));
    replies.push(
        get(
            agent.addr,
            http::AWS_CREDENTIALS_PATH,
            &[("Authorization", &token)],
        )
        .await,
    );
    replies.push(
        get(
            agent.addr,
            "/computeMetadata/v1/instance/service-accounts/default/token",
            &[FLAVOR],
        )
        .await,
    );
    replies.push(get(agent.addr, http::READY_PATH, &[]).await);
    for reply in replies {
        assert!(reply.status >= 400, "{reply:?}");
        for secret in secrets {
            assert!(!reply.body.contains(secret), "{secret} in {reply:?}");
            for (_, value) in &reply.headers {
                assert!(!value.contains(secret), "{secret} in a header of {reply:?}");
            }
        }
    }
}

#[tokio::test]
async fn the_listener_refuses_non_loopback_addresses() {
    let router = http::router(CredentialStore::new(), AuthToken::generate(), true);
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"] {
        let error = LocalServer::bind(addr.parse().unwrap(), router.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{addr} was accepted"));
        assert!(error.to_string().contains("loopback"), "{error}");
    }
}

#[tokio::test]
async fn child_env_points_at_the_endpoints_for_declared_kinds_only() {
    let store = ready_store();
    let agent = start(store.clone(), true).await;
    let now = SystemTime::now();
    let env = agent.endpoints.child_env(&store.current(), now);
    let port = agent.addr.port();
    assert_eq!(
        env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        Some(format!("http://127.0.0.1:{port}/aws/credentials").as_str())
    );
    assert_eq!(
        env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        Some(agent.token())
    );
    let token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").unwrap();
    assert_eq!(std::fs::read_to_string(token_file).unwrap(), agent.token());
    assert_eq!(env.get("AWS_DEFAULT_REGION"), Some("eu-west-3"));
    assert_eq!(env.get("AWS_REGION"), Some("eu-west-3"));
    let host = format!("127.0.0.1:{port}");
    assert_eq!(env.get("GCE_METADATA_HOST"), Some(host.as_str()));
    assert_eq!(env.get("GCE_METADATA_IP"), Some(host.as_str()));
    assert_eq!(env.get("CLOUDSDK_AUTH_ACCESS_TOKEN"), Some(GCP_TOKEN));
    assert_eq!(
        env.get("AUTH_TOKEN_FOR_CUSTOM_DATABASE"),
        Some("db-secret-value")
    );
    assert!(!format!("{env:?}").contains("db-secret-value"));

    // The private env's region wins, and wins for both variables.
    store.apply(env_msg_with_region());
    let env = agent.endpoints.child_env(&store.current(), now);
    assert_eq!(env.get("AWS_REGION"), Some("us-east-2"));
    assert_eq!(env.get("AWS_DEFAULT_REGION"), None);

    // An expired GCP token is not exported.
    store.apply(gcp(20, GCP_TOKEN, None));
    let env = agent
        .endpoints
        .child_env(&store.current(), SystemTime::now());
    assert_eq!(env.get("CLOUDSDK_AUTH_ACCESS_TOKEN"), None);

    // A cluster that publishes only GCP leaves AWS alone (the worker's own
    // role keeps working), and the emulation can be off.
    let gcp_only = CredentialStore::new();
    gcp_only.apply(info(&[CredentialKind::Gcp], false, 1));
    let env = agent.endpoints.child_env(&gcp_only.current(), now);
    assert_eq!(env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"), None);
    assert_eq!(env.get("GCE_METADATA_HOST"), Some(host.as_str()));
    let mut no_gce = agent.endpoints.clone();
    no_gce.gce_metadata = false;
    let env = no_gce.child_env(&gcp_only.current(), now);
    assert_eq!(env.get("GCE_METADATA_HOST"), None);
    assert_eq!(env.get("GCE_METADATA_IP"), None);
}

fn env_msg_with_region() -> credstream_proto::v1::subscribe_response::Message {
    env(30, &[("AWS_REGION", "us-east-2")])
}
