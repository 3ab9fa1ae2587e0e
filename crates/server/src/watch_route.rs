//! [`WatchAgentsRoute`] serves `WatchAgents` to gRPC clients in front of the generated
//! service, so that every watcher sends the same bytes for an event: its protobuf encoding
//! is made once for all of them. Above both `service.rs` (which starts a watcher) and
//! `watch.rs` (which forwards its events).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use agentd_core::EventFormat;
use agentd_proto::v1 as pb;
use bytes::BufMut;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};

use crate::service::AgentSupervisorService;
use crate::watch::{WatchStream, Watched};

const WATCH_AGENTS: &str = "/agentd.v1.AgentSupervisor/WatchAgents";

/// The `AgentSupervisor` service with `WatchAgents` answered here, in events encoded once
/// for all watchers; every other method goes to the generated service.
#[derive(Clone)]
pub struct WatchAgentsRoute<S> {
    pub generated: S,
    pub service: Arc<AgentSupervisorService>,
}

impl<S> NamedService for WatchAgentsRoute<S> {
    const NAME: &'static str = "agentd.v1.AgentSupervisor";
}

impl<S> Service<http::Request<Body>> for WatchAgentsRoute<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != WATCH_AGENTS {
            return Box::pin(self.generated.call(request));
        }
        let method = EncodedWatch(self.service.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(EncodedEventCodec).max_decoding_message_size(usize::MAX);
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

struct EncodedWatch(Arc<AgentSupervisorService>);

impl ServerStreamingService<pb::WatchAgentsRequest> for EncodedWatch {
    type Response = Watched;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<tonic::Response<WatchStream>, Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchAgentsRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let events = service.watch(request.into_inner()).await?;
            Ok(tonic::Response::new(events))
        })
    }
}

/// Decodes the request as prost does; encodes an event by copying its cached encoding.
struct EncodedEventCodec;

type RequestCodec = agentd_proto::Codec<pb::AgentEvent, pb::WatchAgentsRequest>;

impl Codec for EncodedEventCodec {
    type Encode = Watched;
    type Decode = pb::WatchAgentsRequest;
    type Encoder = EncodedEventEncoder;
    type Decoder = <RequestCodec as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEventEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestCodec::default().decoder()
    }
}

struct EncodedEventEncoder;

impl Encoder for EncodedEventEncoder {
    type Item = Watched;
    type Error = Status;

    fn encode(&mut self, event: Watched, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let formats = (EventFormat::Protobuf, EventFormat::ProtobufFigures);
        let encoded = event.encoded(formats, |message| prost::Message::encode_to_vec(&message));
        dst.put_slice(encoded);
        Ok(())
    }
}
