//! Secret-bearing messages: redacted `Debug` and zeroize on drop.
//!
//! The code generator skips `Debug` for them (see `build.rs`); these
//! implementations show what is safe to show (identifiers, lengths) so that a
//! `{:?}` anywhere in the code base can never leak a secret into a log or an
//! error. `Drop` overwrites the secret strings, so a credential that is
//! replaced or revoked does not linger in freed memory. (Copies made by
//! `Clone` are zeroized by their own drop; buffers prost reallocated while
//! decoding are not, which is the limit of what a `String` field allows.)

use std::fmt;

use zeroize::Zeroize;

use crate::v1::{AwsCredential, CreateAgentTokenResponse, EnvVar, GcpCredential, TokenRenewal};

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}

impl fmt::Debug for AwsCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredential")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &Redacted(self.secret_access_key.len()))
            .field("session_token", &Redacted(self.session_token.len()))
            .field("principal_arn", &self.principal_arn)
            .field("account_id", &self.account_id)
            .field("region", &self.region)
            .finish()
    }
}

impl fmt::Debug for GcpCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpCredential")
            .field("access_token", &Redacted(self.access_token.len()))
            .field("token_type", &self.token_type)
            .field("scopes", &self.scopes)
            .field("project_id", &self.project_id)
            .field("principal_email", &self.principal_email)
            .finish()
    }
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvVar")
            .field("name", &self.name)
            .field("value", &Redacted(self.value.len()))
            .finish()
    }
}

impl fmt::Debug for CreateAgentTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateAgentTokenResponse")
            .field("token", &Redacted(self.token.len()))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl fmt::Debug for TokenRenewal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRenewal")
            .field("token", &Redacted(self.token.len()))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Drop for AwsCredential {
    fn drop(&mut self) {
        self.secret_access_key.zeroize();
        self.session_token.zeroize();
    }
}

impl Drop for GcpCredential {
    fn drop(&mut self) {
        self.access_token.zeroize();
    }
}

impl Drop for EnvVar {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl Drop for CreateAgentTokenResponse {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

impl Drop for TokenRenewal {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::{
        AwsCredential, CredentialUpdate, EnvVar, GcpCredential, SubscribeResponse, TokenRenewal,
        credential_update, subscribe_response,
    };

    #[test]
    fn debug_never_prints_secret_values() {
        let mut aws = AwsCredential::default();
        aws.access_key_id = "ASIAEXAMPLE".into();
        aws.secret_access_key = "very-secret-key".into();
        aws.session_token = "very-secret-session".into();
        let update = CredentialUpdate {
            credential: Some(credential_update::Credential::Aws(aws)),
            ..Default::default()
        };
        let mut gcp = GcpCredential::default();
        gcp.access_token = "ya29.very-secret-token".into();
        let env = EnvVar {
            name: "DB_PASSWORD".into(),
            value: "hunter2-very-secret".into(),
        };
        let renewal = SubscribeResponse {
            message: Some(subscribe_response::Message::TokenRenewal(TokenRenewal {
                token: "cs1.very-secret-renewed-token".into(),
                expires_at: None,
            })),
        };
        let printed = format!("{update:?} {gcp:?} {env:?} {update:#?} {renewal:?}");
        assert!(printed.contains("ASIAEXAMPLE"));
        assert!(printed.contains("DB_PASSWORD"));
        assert!(!printed.contains("very-secret"), "{printed}");
    }
}
