//! The `agentd.v1` gRPC API, generated at build time from `proto/agentd/v1/agentd.proto`.
//!
//! This crate holds generated code: the messages, their proto3 JSON mapping (serde, from
//! pbjson) and the gRPC client and server; conversions to and from the supervisor's own types
//! live in `agentd-server`. Besides, [`figures`] says which fields `EVENT_VIEW_FIGURES` keeps,
//! and [`settings`] holds what the daemon and its clients must agree on without depending on
//! each other: where the socket is, how a duration is written.

pub mod figures;
pub mod settings;

/// Messages, enums and the `AgentSupervisor` client and server of package `agentd.v1`.
pub mod v1 {
    tonic::include_proto!("agentd.v1");
    include!(concat!(env!("OUT_DIR"), "/agentd.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agentd_descriptor");

/// `google.protobuf.Timestamp`, whose JSON is RFC 3339 in UTC with a `Z` and 0, 3, 6 or 9
/// fractional digits, as the proto3 JSON mapping writes it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let time = u32::try_from(self.nanos)
            .ok()
            .and_then(|nanos| chrono::DateTime::from_timestamp(self.seconds, nanos))
            .ok_or_else(|| serde::ser::Error::custom("timestamp out of range"))?;
        serializer.serialize_str(&time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    /// Any RFC 3339 time, whatever its offset.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parsed = pbjson_types::Timestamp::deserialize(deserializer)?;
        Ok(Timestamp {
            seconds: parsed.seconds,
            nanos: parsed.nanos,
        })
    }
}

/// tonic's prost codec, except that a message that does not decode (invalid UTF-8 in a
/// string, a truncated field) is `INVALID_ARGUMENT`: the sender's mistake, which it can act
/// on, where prost's codec says `INTERNAL`. Every generated client and server uses it.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// The decoding half of [`Codec`].
#[derive(Debug)]
pub struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        // prost's decoder fails only when the bytes are not a valid message.
        self.0.decode(buf).map_err(|status| {
            tonic::Status::invalid_argument(format!(
                "the message is not a valid {}: {}",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message"),
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}
