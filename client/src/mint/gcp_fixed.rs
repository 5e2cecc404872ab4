//! A fixed GCP access token, handed in as `GOOGLE_OAUTH_ACCESS_TOKEN` (the
//! variable Terraform's Google provider and other tools read): a source
//! that cannot refresh. Every mint forwards the same token, so workers keep
//! access only until it expires; the minter says so in `access_end`.
//!
//! A bare token says nothing about itself, so its expiry, account and
//! scopes come from Google's token info endpoint
//! (`POST https://oauth2.googleapis.com/tokeninfo`, form body
//! `access_token=…`: in the body, never in a URL that a proxy might log).
//! It answers `{"exp": "<unix seconds>", "expires_in": "<seconds>",
//! "email": …, "scope": "<space-separated>"}` for a live token and 400 for
//! an invalid or expired one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use zeroize::Zeroizing;

use super::MintError;

/// The variable a fixed token is read from.
pub const ACCESS_TOKEN_ENV: &str = "GOOGLE_OAUTH_ACCESS_TOKEN";
/// Google's token info endpoint.
pub const TOKENINFO_URL: &str = "https://oauth2.googleapis.com/tokeninfo";
/// How long the token info endpoint may take.
const TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read (a real one is a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

const KIND: &str = "GCP";

/// What the token info endpoint says about a token.
#[derive(Debug)]
pub(super) struct TokenInfo {
    pub expires_at: SystemTime,
    pub email: Option<String>,
    pub scopes: Vec<String>,
}

/// The fixed token from the environment, if one is set.
pub(super) fn from_env() -> Option<Zeroizing<String>> {
    std::env::var(ACCESS_TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(Zeroizing::new)
}

/// Asks `url` (the token info endpoint) about `token`.
pub(super) async fn token_info(url: &str, token: &str) -> Result<TokenInfo, MintError> {
    let failed = |message: String| MintError::Failed {
        kind: KIND,
        message,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| failed(format!("the token info URL {url:?} is not a URL")))?;
    // ring, deprecated in rustls 0.23.48 for lacking post-quantum key exchange,
    // stays until the switch to aws-lc-rs (README "Decisions": TLS uses ring).
    #[allow(deprecated)]
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .map_err(|err| failed(format!("cannot load the TLS root certificates: {err}")))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let body = Zeroizing::new(format!("access_token={}", form_encode(token)));
    let request = hyper::Request::post(uri)
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|err| failed(format!("cannot build the token info request: {err}")))?;
    let unreachable = |what: String| {
        failed(format!(
            "could not ask {url} about {ACCESS_TOKEN_ENV}: {what}"
        ))
    };
    let response = tokio::time::timeout(TIMEOUT, client.request(request))
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", TIMEOUT.as_secs())))?
        .map_err(|err| unreachable(err.to_string()))?;
    let status = response.status();
    let collected = tokio::time::timeout(
        TIMEOUT,
        http_body_util::Limited::new(response.into_body(), MAX_ANSWER).collect(),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {}s", TIMEOUT.as_secs())))?
    .map_err(|err| unreachable(err.to_string()))?
    .to_bytes();
    if status.is_client_error() {
        return Err(MintError::NoCredentials {
            kind: KIND,
            hint: format!(
                "the access token in {ACCESS_TOKEN_ENV} is invalid or has expired (Google's token info says {status}): set a new one (`gcloud auth print-access-token`) or unset it to mint from your own login"
            ),
        });
    }
    if !status.is_success() {
        return Err(unreachable(format!("it answered {status}")));
    }
    parse(&collected, SystemTime::now())
}

fn parse(answer: &[u8], now: SystemTime) -> Result<TokenInfo, MintError> {
    let bad = |what: &str| MintError::Failed {
        kind: KIND,
        message: format!("Google's token info answer {what}"),
    };
    let json: serde_json::Value = serde_json::from_slice(answer).map_err(|_| bad("is not JSON"))?;
    // Both are strings of digits in Google's answer; accept numbers too.
    let number = |name: &str| {
        json.get(name).and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    };
    let expires_at = match (number("exp"), number("expires_in")) {
        (Some(exp), _) => UNIX_EPOCH + Duration::from_secs(exp),
        (None, Some(left)) => now + Duration::from_secs(left),
        (None, None) => return Err(bad("gives no expiry (neither exp nor expires_in)")),
    };
    let text = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    Ok(TokenInfo {
        expires_at,
        email: text("email"),
        scopes: text("scope")
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_s_answer_gives_the_expiry_account_and_scopes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let info = parse(
            br#"{"azp":"x","aud":"x","scope":"https://www.googleapis.com/auth/cloud-platform openid","exp":"1700000000","expires_in":"3599","email":"me@example.com","email_verified":"true","access_type":"online"}"#,
            now,
        )
        .unwrap();
        assert_eq!(
            info.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(info.email.as_deref(), Some("me@example.com"));
        assert_eq!(
            info.scopes,
            ["https://www.googleapis.com/auth/cloud-platform", "openid"]
        );
        let only_left = parse(br#"{"expires_in": 60}"#, now).unwrap();
        assert_eq!(only_left.expires_at, now + Duration::from_secs(60));
    }

    #[test]
    fn an_answer_without_an_expiry_is_an_error() {
        let err = parse(br#"{"email":"me@example.com"}"#, SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("gives no expiry"), "{err}");
        let err = parse(b"<html>", SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("is not JSON"), "{err}");
    }

    #[test]
    fn a_token_is_form_encoded() {
        assert_eq!(form_encode("ya29.a0-_~x"), "ya29.a0-_~x");
        assert_eq!(form_encode("a+b/c= d&"), "a%2Bb%2Fc%3D%20d%26");
    }
}
