//! GCP: OAuth2 access tokens from the user's application default
//! credentials (ADC).
//!
//! Sources, in the order gcp_auth (and Google's own libraries) use:
//!
//! 0. [`GcpMinterBuilder::credentials_file`], if given; then a fixed access
//!    token in `GOOGLE_OAUTH_ACCESS_TOKEN` (as Terraform's Google provider
//!    reads it, before any credentials file): forwarded as it is, since it
//!    cannot be refreshed, with its expiry as the update's `access_end`
//!    (see `gcp_fixed`).
//! 1. `GOOGLE_APPLICATION_CREDENTIALS`: a service account key file. Its
//!    `token_uri` is honoured, plain http included, which is how tests use
//!    a local token endpoint.
//! 2. gcloud's ADC file, `~/.config/gcloud/application_default_credentials.json`
//!    (`gcloud auth application-default login`): an authorized user.
//! 3. The GCE metadata server (on a Google Cloud VM).
//! 4. The `gcloud` CLI's own login (`gcloud auth login`), through
//!    `gcloud config config-helper`, which reports the token's real expiry
//!    (gcp_auth's own gcloud provider assumes one hour, which would lie to
//!    the broker's refresh planning).
//!
//! **Every mint fetches a new token.** A gcp_auth `TokenProvider` caches
//! its token until 20 seconds before expiry, so asking a long-lived provider
//! twice returns the same token — useless when the broker asks for a refresh
//! at half-life. This minter therefore builds a new provider on every mint
//! (its cache starts empty, so it must ask the token endpoint; the ADC and
//! metadata providers fetch in their constructor). That also re-reads the
//! key or ADC file, so a rotated key or a new `gcloud auth
//! application-default login` is picked up without restarting. The cost is
//! one file read and loading the TLS roots per mint, which happens at most
//! every half hour or so. (The metadata server keeps its own cache and may
//! return the token it holds; its `expires_in` is still the real one.)
//!
//! Scopes apply to service account keys. Authorized-user, metadata and
//! gcloud tokens carry the scopes granted at login.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::{
    AccessEnd, CredentialKind, CredentialUpdate, GcpCredential, credential_update,
};
use gcp_auth::{
    ConfigDefaultCredentials, CustomServiceAccount, MetadataServiceAccount, TokenProvider,
};
use tracing::{debug, instrument};

use super::{MintError, MintFuture, Minter, gcp_fixed};
use crate::whoami::GcpIdentity;

const KIND: &str = "GCP";

/// The scope asked for when none is given: every Google Cloud API (IAM
/// still decides what the principal may do).
pub const DEFAULT_SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];

const NO_CREDENTIALS_HINT: &str = "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file";
/// How long `gcloud config config-helper` may take (it may refresh a token).
const GCLOUD_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`GcpMinter`].
#[derive(Debug, Default)]
pub struct GcpMinterBuilder {
    scopes: Option<Vec<String>>,
    credentials_file: Option<PathBuf>,
    project_id: Option<String>,
    skip_metadata_server: bool,
    gcloud: Option<PathBuf>,
    tokeninfo_url: Option<String>,
}

impl GcpMinterBuilder {
    /// OAuth2 scopes for service account tokens (default
    /// [`DEFAULT_SCOPES`]).
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Some(scopes.into_iter().map(Into::into).collect());
        self
    }

    /// Uses this credentials file instead of searching
    /// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file, …).
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials_file = Some(path.into());
        self
    }

    /// The project id to forward, instead of `GOOGLE_CLOUD_PROJECT` or the
    /// one the credentials name.
    pub fn project_id(mut self, project: impl Into<String>) -> Self {
        self.project_id = Some(project.into());
        self
    }

    /// Does not ask the GCE metadata server (off Google Cloud it only costs
    /// a failed lookup; tests use this to stay deterministic).
    pub fn skip_metadata_server(mut self) -> Self {
        self.skip_metadata_server = true;
        self
    }

    /// The `gcloud` executable for the last-resort source (default: `gcloud`
    /// on `PATH`).
    pub fn gcloud(mut self, path: impl Into<PathBuf>) -> Self {
        self.gcloud = Some(path.into());
        self
    }

    /// Where a fixed token (`GOOGLE_OAUTH_ACCESS_TOKEN`) is described
    /// (default: Google's token info endpoint; plain http is accepted, for
    /// tests).
    pub fn tokeninfo_url(mut self, url: impl Into<String>) -> Self {
        self.tokeninfo_url = Some(url.into());
        self
    }

    /// Checks the scopes. No credentials are looked up yet: a missing login
    /// shows at the first mint.
    pub fn build(self) -> Result<GcpMinter, MintError> {
        let scopes = self
            .scopes
            .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
        if scopes.is_empty() {
            return Err(config_error("at least one OAuth2 scope is needed"));
        }
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.contains(char::is_whitespace))
        {
            return Err(config_error(format!(
                "{bad:?} is not an OAuth2 scope (scopes are URLs such as {})",
                DEFAULT_SCOPES[0]
            )));
        }
        Ok(GcpMinter {
            scopes,
            credentials_file: self.credentials_file,
            project_id: self.project_id,
            skip_metadata_server: self.skip_metadata_server,
            gcloud: self.gcloud.unwrap_or_else(|| PathBuf::from("gcloud")),
            tokeninfo_url: self.tokeninfo_url,
        })
    }
}

/// Mints Google OAuth2 access tokens; see the module documentation. Create
/// it with [`GcpMinter::builder`].
#[derive(Debug)]
pub struct GcpMinter {
    scopes: Vec<String>,
    credentials_file: Option<PathBuf>,
    project_id: Option<String>,
    skip_metadata_server: bool,
    gcloud: PathBuf,
    tokeninfo_url: Option<String>,
}

/// One freshly fetched token and what is known about its principal.
struct Fetched {
    access_token: String,
    expires_at: SystemTime,
    source: String,
    principal_email: Option<String>,
    project_id: Option<String>,
    /// The scopes the token carries, when they differ from those asked for
    /// (a fixed token).
    scopes: Option<Vec<String>>,
    /// When this source stops giving new tokens (a fixed token).
    access_end: Option<AccessEnd>,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.access_token);
    }
}

impl GcpMinter {
    /// Starts a builder with every default.
    pub fn builder() -> GcpMinterBuilder {
        GcpMinterBuilder::default()
    }

    /// The scopes asked for.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    #[instrument(name = "mint_gcp", skip_all)]
    async fn mint_gcp(&self) -> Result<CredentialUpdate, MintError> {
        let fetched = self.fetch().await?;
        debug!(
            source = %fetched.source,
            principal = ?fetched.principal_email,
            expires_in_s = fetched
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs(),
            "minted gcp token"
        );
        Ok(CredentialUpdate {
            credential: Some(credential_update::Credential::Gcp(GcpCredential {
                access_token: fetched.access_token.clone(),
                token_type: "Bearer".to_owned(),
                scopes: fetched
                    .scopes
                    .clone()
                    .unwrap_or_else(|| self.scopes.clone()),
                project_id: fetched.project_id.clone().unwrap_or_default(),
                principal_email: fetched.principal_email.clone().unwrap_or_default(),
            })),
            issued_at: Some(timestamp(SystemTime::now())),
            expires_at: Some(timestamp(fetched.expires_at)),
            version: 0,
            refresh_request_id: String::new(),
            access_end: fetched.access_end.clone(),
            ..Default::default()
        })
    }

    /// The local identity for `whoami`. Fetches a token (and drops it) so
    /// that an expired login shows here rather than at the first refresh.
    pub(crate) async fn local_identity(&self) -> Result<GcpIdentity, MintError> {
        let fetched = self.fetch().await?;
        Ok(GcpIdentity {
            principal: fetched.principal_email.clone(),
            project_id: fetched.project_id.clone(),
            source: fetched.source.clone(),
            expires_at: fetched.expires_at,
        })
    }

    /// Finds the credentials anew and fetches a new token from them.
    async fn fetch(&self) -> Result<Fetched, MintError> {
        let explicit = self
            .credentials_file
            .clone()
            .map(|p| (p, "the credentials file"));
        let from_env = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS")
            .filter(|v| !v.is_empty())
            .map(|p| (PathBuf::from(p), "GOOGLE_APPLICATION_CREDENTIALS"));
        let mut fetched = if let Some((path, origin)) = explicit {
            self.fetch_with_file(&path, origin).await?
        } else if let Some(token) = gcp_fixed::from_env() {
            self.fetch_fixed(token).await?
        } else if let Some((path, origin)) = from_env {
            self.fetch_with_file(&path, origin).await?
        } else if let Some(path) = adc_file().filter(|p| p.is_file()) {
            self.fetch_with_file(&path, "gcloud's application default credentials")
                .await?
        } else if let Some(fetched) = self.fetch_from_metadata_server().await? {
            fetched
        } else {
            self.fetch_from_gcloud().await?
        };
        if let Some(project) = self.project_id.clone().or_else(|| {
            std::env::var("GOOGLE_CLOUD_PROJECT")
                .ok()
                .filter(|p| !p.is_empty())
        }) {
            fetched.project_id = Some(project);
        }
        if fetched.expires_at <= SystemTime::now() {
            return Err(MintError::Failed {
                kind: KIND,
                message: format!(
                    "{} returned a token that has already expired",
                    fetched.source
                ),
            });
        }
        Ok(fetched)
    }

    /// A service account key or an authorized-user file.
    async fn fetch_with_file(&self, path: &Path, origin: &str) -> Result<Fetched, MintError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            config_error(format!(
                "{origin} points at {}, which cannot be read ({err}): fix the path or unset it",
                path.display()
            ))
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|err| {
            config_error(format!(
                "{} is not valid JSON (line {}, column {}): {NO_CREDENTIALS_HINT}",
                path.display(),
                err.line(),
                err.column()
            ))
        })?;
        let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("");
        match kind {
            "service_account" => {
                let email = json
                    .get("client_email")
                    .and_then(|e| e.as_str())
                    .map(str::to_owned);
                let source = format!("service account key {} ({origin})", path.display());
                let fix = format!(
                    "check that the key in {} is still valid (not deleted or disabled) and its token_uri is reachable",
                    path.display()
                );
                let provider = CustomServiceAccount::from_json(&text)
                    .map_err(|err| gcp_error(&source, err, &fix))?;
                let project_id = provider.project_id().map(str::to_owned);
                // A new provider has an empty cache: this is a token request.
                let token = self.token(&provider, &source, &fix).await?;
                Ok(Fetched {
                    scopes: None,
                    access_end: None,
                    access_token: token.0,
                    expires_at: token.1,
                    source,
                    principal_email: email,
                    project_id,
                })
            }
            "authorized_user" if adc_file().as_deref() == Some(path) => {
                let source = format!("gcloud application default credentials {}", path.display());
                let fix = "run `gcloud auth application-default login`";
                // The constructor fetches a token with the refresh token;
                // `token()` then returns that new token.
                let provider = ConfigDefaultCredentials::new()
                    .await
                    .map_err(|err| gcp_error(&source, err, fix))?;
                let (access_token, expires_at) = self.token(&provider, &source, fix).await?;
                Ok(Fetched {
                    scopes: None,
                    access_end: None,
                    access_token,
                    expires_at,
                    project_id: provider.project_id().await.ok().map(|p| p.to_string()),
                    source,
                    principal_email: None,
                })
            }
            "authorized_user" => Err(config_error(format!(
                "{} ({origin}) holds authorized-user credentials, which gcp_auth reads only from {}: run `gcloud auth application-default login` and unset {origin}, or use a service account key",
                path.display(),
                adc_file()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(
                        || "~/.config/gcloud/application_default_credentials.json".into()
                    )
            ))),
            "" => Err(config_error(format!(
                "{} ({origin}) has no \"type\" field; expected a service account key: {NO_CREDENTIALS_HINT}",
                path.display()
            ))),
            other => Err(config_error(format!(
                "{} ({origin}) holds {other:?} credentials, which credstream cannot mint from: use a service account key or `gcloud auth application-default login`",
                path.display()
            ))),
        }
    }

    /// The GCE metadata server; `None` when there is none (not on GCE).
    async fn fetch_from_metadata_server(&self) -> Result<Option<Fetched>, MintError> {
        if self.skip_metadata_server {
            return Ok(None);
        }
        let provider = match MetadataServiceAccount::new().await {
            Ok(provider) => provider,
            Err(err) => {
                debug!(error = %err, "no GCE metadata server");
                return Ok(None);
            }
        };
        let source = "the GCE metadata server".to_owned();
        let fix = "check the instance's service account and scopes";
        let (access_token, expires_at) = self.token(&provider, &source, fix).await?;
        Ok(Some(Fetched {
            scopes: None,
            access_end: None,
            access_token,
            expires_at,
            project_id: provider.project_id().await.ok().map(|p| p.to_string()),
            source,
            principal_email: None,
        }))
    }

    /// A fixed token from `GOOGLE_OAUTH_ACCESS_TOKEN`, described by the
    /// token info endpoint: forwarded as it is, until it expires.
    async fn fetch_fixed(&self, token: zeroize::Zeroizing<String>) -> Result<Fetched, MintError> {
        let url = self
            .tokeninfo_url
            .as_deref()
            .unwrap_or(gcp_fixed::TOKENINFO_URL);
        let info = gcp_fixed::token_info(url, &token).await?;
        Ok(Fetched {
            access_token: token.as_str().to_owned(),
            expires_at: info.expires_at,
            source: format!("the access token in {}", gcp_fixed::ACCESS_TOKEN_ENV),
            principal_email: info.email,
            project_id: None,
            scopes: Some(info.scopes),
            access_end: Some(AccessEnd {
                at: Some(timestamp(info.expires_at)),
                reason: format!(
                    "the GCP access token in {} expires then and cannot be refreshed",
                    gcp_fixed::ACCESS_TOKEN_ENV
                ),
            }),
        })
    }

    /// The gcloud CLI's login, through `gcloud config config-helper
    /// --force-auth-refresh`, which prints a new token with its expiry, the
    /// account and the project.
    async fn fetch_from_gcloud(&self) -> Result<Fetched, MintError> {
        let mut command = tokio::process::Command::new(&self.gcloud);
        command
            .args([
                "config",
                "config-helper",
                "--format=json",
                "--force-auth-refresh",
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(GCLOUD_TIMEOUT, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(MintError::NoCredentials {
                    kind: KIND,
                    hint: NO_CREDENTIALS_HINT.to_owned(),
                });
            }
            Ok(Err(err)) => {
                return Err(MintError::Failed {
                    kind: KIND,
                    message: format!("could not run {}: {err}", self.gcloud.display()),
                });
            }
            Err(_) => {
                return Err(MintError::Failed {
                    kind: KIND,
                    message: format!(
                        "`gcloud config config-helper` did not answer within {}s",
                        GCLOUD_TIMEOUT.as_secs()
                    ),
                });
            }
        };
        if !output.status.success() {
            // gcloud's stderr says why (not logged in, reauth needed); it
            // carries no token.
            return Err(MintError::NoCredentials {
                kind: KIND,
                hint: format!(
                    "the gcloud CLI has no usable login (`gcloud config config-helper` says: {}); {NO_CREDENTIALS_HINT}, or run `gcloud auth login`",
                    gcloud_error(&String::from_utf8_lossy(&output.stderr))
                ),
            });
        }
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|err| {
            MintError::Failed {
                kind: KIND,
                message: format!(
                    "`gcloud config config-helper` printed something that is not JSON (line {}, column {})",
                    err.line(),
                    err.column()
                ),
            }
        })?;
        let text = |pointer: &str| {
            json.pointer(pointer)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (Some(access_token), Some(expiry)) = (
            text("/credential/access_token"),
            text("/credential/token_expiry"),
        ) else {
            return Err(MintError::NoCredentials {
                kind: KIND,
                hint: format!("gcloud returned no access token; {NO_CREDENTIALS_HINT}"),
            });
        };
        let expires_at = chrono::DateTime::parse_from_rfc3339(&expiry)
            .map(SystemTime::from)
            .map_err(|_| MintError::Failed {
                kind: KIND,
                message: "gcloud returned a token expiry that is not an RFC 3339 time".into(),
            })?;
        Ok(Fetched {
            scopes: None,
            access_end: None,
            access_token,
            expires_at,
            source: "the gcloud CLI login".to_owned(),
            principal_email: text("/configuration/properties/core/account"),
            project_id: text("/configuration/properties/core/project"),
        })
    }

    async fn token(
        &self,
        provider: &dyn TokenProvider,
        source: &str,
        fix: &str,
    ) -> Result<(String, SystemTime), MintError> {
        let scopes: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        let token: Arc<gcp_auth::Token> = provider
            .token(&scopes)
            .await
            .map_err(|err| gcp_error(source, err, fix))?;
        Ok((
            token.as_str().to_owned(),
            SystemTime::from(token.expires_at()),
        ))
    }
}

impl Minter for GcpMinter {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Gcp
    }

    fn mint(&self) -> MintFuture<'_> {
        Box::pin(self.mint_gcp())
    }
}

/// gcloud's ADC file, where gcp_auth looks for it (`$HOME/.config/gcloud`).
fn adc_file() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| Path::new(&home).join(".config/gcloud/application_default_credentials.json"))
}

fn config_error(message: impl Into<String>) -> MintError {
    MintError::InvalidConfig {
        kind: KIND,
        message: message.into(),
    }
}

/// Maps a gcp_auth error to what the user can do. JSON errors are reduced
/// to their position: serde's messages may quote the offending value.
fn gcp_error(source: &str, err: gcp_auth::Error, fix: &str) -> MintError {
    use gcp_auth::Error as E;
    match err {
        E::Str("token request failed") => MintError::Refused {
            kind: KIND,
            message: format!("{source}: the token endpoint refused the request; {fix}"),
        },
        E::Other("HTTP request failed", inner) => MintError::Failed {
            kind: KIND,
            message: format!(
                "{source}: could not reach the token endpoint ({inner}); check the network or proxy"
            ),
        },
        E::Json(context, inner) => MintError::Failed {
            kind: KIND,
            message: format!(
                "{source}: {context} ({:?} error at line {}, column {}); {fix}",
                inner.classify(),
                inner.line(),
                inner.column()
            ),
        },
        E::Other(context @ "failed to parse PKCS#8 RSA key pair", _)
        | E::Str(context @ "invalid private key in credentials") => MintError::InvalidConfig {
            kind: KIND,
            message: format!(
                "{source}: {context}; download a new key from the Google Cloud console"
            ),
        },
        E::Io(context, inner) => MintError::InvalidConfig {
            kind: KIND,
            message: format!("{source}: {context}: {inner}"),
        },
        E::NoAuthMethod(..) => MintError::NoCredentials {
            kind: KIND,
            hint: NO_CREDENTIALS_HINT.to_owned(),
        },
        other => MintError::Failed {
            kind: KIND,
            message: format!("{source}: {other}; {fix}"),
        },
    }
}

/// What gcloud's stderr says went wrong, on one line: its `ERROR:` line
/// without the command prefix (`ERROR: (gcloud.config.config-helper) You do
/// not currently have an active account selected.`), else every line
/// joined; gcloud's advice lines ("Please run:", "to obtain new
/// credentials.") are left out, the caller says what to run. Cut at 300
/// bytes; it never carries a token.
fn gcloud_error(stderr: &str) -> String {
    let lines = || stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    let text = match lines().find_map(|l| l.strip_prefix("ERROR:")) {
        Some(error) => {
            let error = error.trim();
            match error.strip_prefix('(').and_then(|e| e.split_once(')')) {
                Some((command, rest)) if command.starts_with("gcloud") => rest.trim().to_owned(),
                _ => error.to_owned(),
            }
        }
        None => lines().collect::<Vec<_>>().join(" "),
    };
    let text = if text.is_empty() {
        "nothing on stderr".to_owned()
    } else {
        text
    };
    credstream_proto::rules::text::printable(&text, 300).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_checked() {
        assert_eq!(
            GcpMinter::builder().build().unwrap().scopes(),
            DEFAULT_SCOPES
        );
        for bad in [vec![], vec!["a b"], vec![""]] {
            let err = GcpMinter::builder().scopes(bad).build().unwrap_err();
            assert!(matches!(err, MintError::InvalidConfig { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn unsupported_files_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("{not json", "not valid JSON (line 1"),
            (
                r#"{"type": "external_account"}"#,
                "\"external_account\" credentials",
            ),
            (r#"{"client_id": "x"}"#, "no \"type\" field"),
            (
                r#"{"type": "authorized_user", "client_id": "x", "client_secret": "hunter2", "refresh_token": "hunter2"}"#,
                "authorized-user credentials",
            ),
            (
                r#"{"type": "service_account", "client_email": "a@b", "private_key": "hunter2", "token_uri": "http://127.0.0.1:1/"}"#,
                "PKCS#8",
            ),
        ];
        for (i, (content, expected)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.json"));
            std::fs::write(&path, content).unwrap();
            let minter = GcpMinter::builder()
                .credentials_file(&path)
                .build()
                .unwrap();
            let err = minter.mint().await.unwrap_err().to_string();
            assert!(err.contains(expected), "{content}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let minter = GcpMinter::builder()
            .credentials_file(dir.path().join("missing.json"))
            .build()
            .unwrap();
        let err = minter.mint().await.unwrap_err().to_string();
        assert!(err.contains("cannot be read"), "{err}");
    }

    #[tokio::test]
    async fn missing_gcloud_means_no_credentials() {
        let minter = GcpMinter::builder()
            .skip_metadata_server()
            .gcloud("/nonexistent/gcloud")
            .build()
            .unwrap();
        // Only meaningful where no ADC is configured for this user.
        if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_some()
            || adc_file().is_some_and(|p| p.is_file())
        {
            return;
        }
        let err = minter.mint().await.unwrap_err();
        assert!(matches!(err, MintError::NoCredentials { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("gcloud auth application-default login"),
            "{err}"
        );
    }

    /// Issue 32: gcloud's refusal is quoted by its error line, not by its
    /// last line ("to obtain new credentials."), with the fix.
    #[tokio::test]
    async fn a_gcloud_without_login_says_what_gcloud_said_and_the_fix() {
        if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_some()
            || adc_file().is_some_and(|p| p.is_file())
            || gcp_fixed::from_env().is_some()
        {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let gcloud = dir.path().join("gcloud");
        std::fs::write(
            &gcloud,
            "#!/bin/sh\ncat >&2 <<'END'\nERROR: (gcloud.config.config-helper) You do not currently have an active account selected.\nPlease run:\n\n  $ gcloud auth login\n\nto obtain new credentials.\n\nEND\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&gcloud, std::fs::Permissions::from_mode(0o755)).unwrap();
        let minter = GcpMinter::builder()
            .skip_metadata_server()
            .gcloud(&gcloud)
            .build()
            .unwrap();
        let err = minter.mint().await.unwrap_err();
        assert!(matches!(err, MintError::NoCredentials { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("the gcloud CLI has no usable login (`gcloud config config-helper` says: You do not currently have an active account selected.)"),
            "{text}"
        );
        assert!(
            text.contains("gcloud auth application-default login"),
            "{text}"
        );
        assert!(!text.contains("obtain new credentials"), "{text}");
    }

    #[test]
    fn gcloud_errors_without_an_error_line_are_joined() {
        assert_eq!(gcloud_error("reauth\n  needed \n"), "reauth needed");
        assert_eq!(gcloud_error(""), "nothing on stderr");
        assert_eq!(gcloud_error("ERROR: plain"), "plain");
    }
}
