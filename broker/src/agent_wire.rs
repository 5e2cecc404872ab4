//! The wire form of what the broker sends an agent on Subscribe: each
//! `SubscribeResponse` as one gRPC length-prefixed message (a zero byte for
//! "not compressed", the length as a big-endian u32, the encoded message).
//!
//! A credential is framed once per version, when it is published
//! ([`CredentialFrame::encode`]), and every agent stream sends those shared
//! bytes as they are: no clone, no encoding and no copy per agent. Every
//! other message (the snapshot, cluster info, the private env, a
//! revocation) is framed per stream ([`AgentFrame::into_bytes`]); those
//! are rare or per-connection.
//!
//! The hub ([`crate::hub`]) makes the frames; the Subscribe response body
//! (`service::agent`) writes them. Neither needs the other's internals.

use credstream_proto::v1::{CredentialUpdate, SubscribeResponse, subscribe_response};
use prost::Message as _;
use prost::bytes::Bytes;
use zeroize::Zeroizing;

/// The field number of `credential` in `SubscribeResponse`'s `message`
/// oneof (credstream.proto); checked against the generated encoder by the
/// test below.
const SUBSCRIBE_RESPONSE_CREDENTIAL_FIELD: u32 = 2;

/// A credential's whole agent-bound `SubscribeResponse`, framed once and
/// shared by every agent stream. The bytes carry the secret: they are
/// zeroized when the last stream drops its share, and `Debug` shows only
/// their length.
#[derive(Clone)]
pub struct CredentialFrame(Bytes);

impl CredentialFrame {
    /// `update` (with its version set) as the framed `SubscribeResponse`
    /// agents receive. Encodes the update in place inside the response, so
    /// the secret is never cloned into a temporary message.
    pub fn encode(update: &CredentialUpdate) -> Self {
        use prost::encoding::message;
        let len = message::encoded_len(SUBSCRIBE_RESPONSE_CREDENTIAL_FIELD, update);
        let mut framed = Zeroizing::new(Vec::with_capacity(5 + len));
        push_prefix(&mut framed, len);
        message::encode(SUBSCRIBE_RESPONSE_CREDENTIAL_FIELD, update, &mut *framed);
        Self(Bytes::from_owner(framed))
    }

    /// The shared bytes (a reference count, no copy).
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl std::fmt::Debug for CredentialFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CredentialFrame({} bytes)", self.0.len())
    }
}

/// One message of an agent's stream, as the hub hands it to the stream.
///
/// A stream's queue keeps its capacity for as long as the stream lives, so
/// a frame is kept small: the other messages (snapshots, cluster info,
/// revocations, environments) are rare and boxed, and a credential, the
/// frequent one, costs no allocation. Unboxed, every idle stream kept a
/// snapshot-sized slot (384 bytes).
#[derive(Debug)]
pub enum AgentFrame {
    /// A credential, framed once when it was published.
    Credential(CredentialFrame),
    /// Any other message, framed by the stream that sends it.
    Message(Box<subscribe_response::Message>),
}

impl AgentFrame {
    /// A message other than a credential.
    pub fn message(message: subscribe_response::Message) -> Self {
        Self::Message(Box::new(message))
    }

    /// The bytes of one gRPC message, ready for the HTTP/2 stream.
    pub fn into_bytes(self) -> Bytes {
        match self {
            AgentFrame::Credential(frame) => frame.0,
            AgentFrame::Message(message) => {
                let response = SubscribeResponse {
                    message: Some(*message),
                };
                let len = response.encoded_len();
                let mut out = Vec::with_capacity(5 + len);
                push_prefix(&mut out, len);
                response
                    .encode(&mut out)
                    .expect("a Vec grows to fit the message");
                Bytes::from(out)
            }
        }
    }
}

/// The gRPC message prefix: not compressed, then the length.
fn push_prefix(out: &mut Vec<u8>, len: usize) {
    out.push(0);
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use credstream_proto::v1::credential_update::Credential;
    use credstream_proto::v1::{AwsCredential, Revocation};

    use super::*;

    fn generated_framing(response: &SubscribeResponse) -> Vec<u8> {
        let body = response.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_credential_frame_is_the_generated_encoding_of_its_response() {
        let mut aws = AwsCredential::default();
        aws.access_key_id = "ASIAEXAMPLE".into();
        aws.secret_access_key = "s3cr3t".into();
        aws.session_token = "token".into();
        let update = CredentialUpdate {
            credential: Some(Credential::Aws(aws)),
            version: 1_700_000_000_000_001,
            refresh_request_id: "r1".into(),
            ..Default::default()
        };
        let frame = CredentialFrame::encode(&update);
        let expected = generated_framing(&SubscribeResponse {
            message: Some(subscribe_response::Message::Credential(update)),
        });
        assert_eq!(frame.bytes().as_ref(), expected.as_slice());
        assert_eq!(
            AgentFrame::Credential(frame).into_bytes().as_ref(),
            expected.as_slice()
        );
    }

    #[test]
    fn other_messages_are_framed_as_the_generated_encoding() {
        let message = subscribe_response::Message::Revocation(Revocation {
            kinds: vec![1],
            private_env: true,
            version: 7,
        });
        let expected = generated_framing(&SubscribeResponse {
            message: Some(message.clone()),
        });
        assert_eq!(
            AgentFrame::message(message).into_bytes().as_ref(),
            expected.as_slice()
        );
    }

    #[test]
    fn a_credential_frame_never_shows_its_bytes() {
        let mut aws = AwsCredential::default();
        aws.secret_access_key = "s3cr3t-in-debug".into();
        let update = CredentialUpdate {
            credential: Some(Credential::Aws(aws)),
            ..Default::default()
        };
        let shown = format!("{:?}", CredentialFrame::encode(&update));
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.starts_with("CredentialFrame("), "{shown}");
    }
}
