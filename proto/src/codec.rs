//! [`ProtoCodec`]: the generated stubs' codec. It is tonic-prost's
//! `ProstCodec` except for one thing: a message that does not decode
//! (malformed protobuf, invalid UTF-8 in a `string` field) is
//! `INVALID_ARGUMENT`, which the API promises and which no client retries,
//! instead of `INTERNAL`, which reads as a bug of the side that answered
//! and which retry policies treat as transient.
//!
//! The same codec decodes responses in the generated clients, where an
//! undecodable response also gets `INVALID_ARGUMENT`: retrying would not
//! fix it either.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// The status for a message that does not decode as `what`.
pub fn decode_error(what: &str, error: &prost::DecodeError) -> Status {
    Status::invalid_argument(format!(
        "the message is not a valid {what}: {error} (check the stub against proto/credstream/v1/credstream.proto)"
    ))
}

/// `application/grpc+proto` with prost; see the module documentation.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder::new(BufferSettings::default())
    }
}

/// Decodes `U`, answering `INVALID_ARGUMENT` for what does not decode.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    buffer_settings: BufferSettings,
    _pd: PhantomData<U>,
}

impl<U> ProtoDecoder<U> {
    /// A decoder with explicit buffer settings.
    pub fn new(buffer_settings: BufferSettings) -> Self {
        Self {
            buffer_settings,
            _pd: PhantomData,
        }
    }
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|error| decode_error(short_type_name::<U>(), &error))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}

fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::SubscribeRequest;

    #[test]
    fn undecodable_messages_are_invalid_argument_and_name_the_type() {
        // Field 1 (hello), length-delimited, claims 100 bytes that are not there.
        let bytes: &[u8] = &[0x0a, 100, 1, 2];
        let error = SubscribeRequest::decode(bytes).unwrap_err();
        let status = decode_error(short_type_name::<SubscribeRequest>(), &error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("the message is not a valid SubscribeRequest"),
            "{}",
            status.message()
        );
    }
}
