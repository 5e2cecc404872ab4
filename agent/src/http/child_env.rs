//! The variables a process needs to find the agent's surfaces: what `exec`
//! gives its child and what the env file holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use credstream_proto::v1::{CredentialKind, credential_update::Credential};
use zeroize::Zeroize;

use super::{AWS_CREDENTIALS_PATH, AuthToken};
use crate::store::AgentState;

/// Where this agent serves, as the variables in [`ChildEnv`] describe it.
#[derive(Clone, Debug)]
pub struct LocalEndpoints {
    /// The loopback address the listener is bound to.
    pub addr: SocketAddr,
    /// The token the AWS endpoint and `/env` require.
    pub token: AuthToken,
    /// The file holding the token (see [`super::TokenFile`]), if written.
    pub token_file: Option<PathBuf>,
    /// Whether the GCE metadata emulation is served.
    pub gce_metadata: bool,
}

impl LocalEndpoints {
    /// `http://127.0.0.1:PORT/aws/credentials`, for
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`. boto3 accepts plain http only to
    /// loopback (docs/facts.md, fact 1), which is all the agent listens on.
    pub fn aws_credentials_uri(&self) -> String {
        format!("http://{}{AWS_CREDENTIALS_PATH}", self.addr)
    }

    /// `127.0.0.1:PORT` (no scheme), for `GCE_METADATA_HOST` and
    /// `GCE_METADATA_IP` (docs/facts.md, fact 6).
    pub fn gce_metadata_host(&self) -> String {
        self.addr.to_string()
    }

    /// The variables that point at the endpoints and carry no secret, as
    /// `run` prints them at start (before the agent knows which kinds the
    /// cluster publishes).
    pub fn public_exports(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![(AWS_FULL_URI, self.aws_credentials_uri())];
        if let Some(file) = &self.token_file {
            vars.push((AWS_TOKEN_FILE, file.display().to_string()));
        }
        if self.gce_metadata {
            vars.push((GCE_HOST, self.gce_metadata_host()));
            vars.push((GCE_IP, self.gce_metadata_host()));
        }
        vars
    }

    /// The environment for a user process, given the agent's state at `now`:
    ///
    /// - every private env variable;
    /// - when the cluster publishes AWS (or an AWS credential is held):
    ///   `AWS_CONTAINER_CREDENTIALS_FULL_URI`,
    ///   `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`,
    ///   `AWS_CONTAINER_AUTHORIZATION_TOKEN`, and `AWS_DEFAULT_REGION` +
    ///   `AWS_REGION` from the credential's region — unless the private env
    ///   sets either region variable, in which case neither is touched (two
    ///   different regions would be worse than the user's one);
    /// - when the cluster publishes GCP (or a GCP token is held) and the
    ///   emulation is on: `GCE_METADATA_HOST` and `GCE_METADATA_IP`;
    /// - when a GCP token is live: `CLOUDSDK_AUTH_ACCESS_TOKEN`, for code
    ///   written for Coiled that reads it explicitly (docs/facts.md, fact 10).
    ///
    /// A kind the cluster does not publish gets no variables, so a worker's
    /// own instance role or service account keeps working for it. The
    /// agent's variables override private env variables of the same name
    /// (except the region): only the agent knows its port and token.
    pub fn child_env(&self, state: &AgentState, now: SystemTime) -> ChildEnv {
        let mut vars = BTreeMap::new();
        for (name, value) in state.env_vars() {
            vars.insert(name.to_owned(), value.to_owned());
        }
        let declared = |kind: CredentialKind| {
            state
                .info
                .as_ref()
                .is_some_and(|info| info.kinds().any(|k| k == kind))
        };
        if declared(CredentialKind::Aws) || state.held(CredentialKind::Aws).is_some() {
            vars.insert(AWS_FULL_URI.into(), self.aws_credentials_uri());
            if let Some(file) = &self.token_file {
                vars.insert(AWS_TOKEN_FILE.into(), file.display().to_string());
            }
            vars.insert(AWS_TOKEN.into(), self.token.expose().to_owned());
            let region = state
                .held(CredentialKind::Aws)
                .and_then(|c| match &c.credential {
                    Some(Credential::Aws(aws)) if !aws.region.is_empty() => {
                        Some(aws.region.clone())
                    }
                    _ => None,
                });
            let user_set_region = state
                .env_vars()
                .any(|(name, _)| name == "AWS_DEFAULT_REGION" || name == "AWS_REGION");
            if let (Some(region), false) = (region, user_set_region) {
                vars.insert("AWS_DEFAULT_REGION".into(), region.clone());
                vars.insert("AWS_REGION".into(), region);
            }
        }
        if self.gce_metadata
            && (declared(CredentialKind::Gcp) || state.held(CredentialKind::Gcp).is_some())
        {
            vars.insert(GCE_HOST.into(), self.gce_metadata_host());
            vars.insert(GCE_IP.into(), self.gce_metadata_host());
        }
        if let Some(Credential::Gcp(gcp)) = state
            .live(CredentialKind::Gcp, now)
            .and_then(|c| c.credential.as_ref())
        {
            vars.insert(
                "CLOUDSDK_AUTH_ACCESS_TOKEN".into(),
                gcp.access_token.clone(),
            );
        }
        ChildEnv { vars }
    }
}

const AWS_FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
const AWS_TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";
const AWS_TOKEN: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN";
const GCE_HOST: &str = "GCE_METADATA_HOST";
const GCE_IP: &str = "GCE_METADATA_IP";

/// Name/value pairs for a user process, sorted by name. Values are secrets:
/// they are zeroized on drop and `Debug` prints only the names.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChildEnv {
    vars: BTreeMap<String, String>,
}

impl ChildEnv {
    /// The pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// One value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// How many variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

impl Drop for ChildEnv {
    fn drop(&mut self) {
        for value in self.vars.values_mut() {
            value.zeroize();
        }
    }
}

impl std::fmt::Debug for ChildEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildEnv")
            .field("names", &self.vars.keys().collect::<Vec<_>>())
            .finish()
    }
}
