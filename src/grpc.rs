//! gRPC clients on [tonic](https://docs.rs/tonic) (feature `tonic`).
//!
//! A tonic [`Channel`](https://docs.rs/tonic/0.14/tonic/transport/struct.Channel.html) accepts
//! only `tonic::body::Body`, and a gRPC server refuses a token with status `UNAUTHENTICATED`
//! inside an HTTP `200`, not with a `401`. Three pieces make the layer work for it:
//!
//! - [`TonicBody`], the [body conversion](crate::inner_body) to tonic's body type;
//! - [`unauthenticated`], the rejection predicate that reads the gRPC status;
//! - [`EndOfStreamLayer`], outside the auth layer, which lets a request body say it has ended
//!   together with its last message, so that the recording kept for the replay is complete
//!   when the rejection arrives (see [below](#why-endofstreamlayer)).
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_auth_refresh::{grpc, provider_fn, AuthLayer, Token};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051").connect_lazy();
//! let auth = AuthLayer::builder(provider_fn(|| async {
//!     Ok::<_, tower::BoxError>(Token::new("secret").with_expires_in(Duration::from_secs(3600)))
//! }))
//! .inner_body(grpc::TonicBody)
//! .token_rejected_when(grpc::unauthenticated)
//! .build();
//! let service = ServiceBuilder::new()
//!     .layer(grpc::EndOfStreamLayer)
//!     .layer(auth)
//!     .service(channel);
//! // Any tonic client takes it: `tonic::client::Grpc::new(service)`, or a generated
//! // `MyServiceClient::new(service)`.
//! let client = tonic::client::Grpc::new(service);
//! # drop(client);
//! # Ok(())
//! # }
//! ```
//!
//! # Which calls are replayed
//! A call is replayed once, with a new token, when its rejection can be seen in the response
//! headers and its request messages were all sent and kept:
//!
//! - **Unary and client-streaming calls** whose request messages add up to at most the replay
//!   cap ([`max_replay_body`](crate::AuthLayerBuilder::max_replay_body), 64 KiB by default)
//!   and were all sent when the rejection arrived. A server that refuses the token before
//!   reading the request (an interceptor, the usual case) answers while a client stream may
//!   still be open: such a call is not replayed, and the caller gets `UNAUTHENTICATED`.
//! - **Server-streaming and bidirectional calls** refused before the first response message:
//!   that refusal is a *trailers-only* response (the `grpc-status` is in the headers), and
//!   [`unauthenticated`] sees it. A bidirectional call is replayed only under the same
//!   conditions as a client stream.
//! - **Not replayed: a status in trailers**, after a normal header frame (a stream that ends
//!   with `UNAUTHENTICATED` after some messages). Seeing it means reading the response body,
//!   which the layer does not buffer; the caller gets the status from tonic as usual, and the
//!   token is not invalidated by it (the next call that is refused in its headers does that).
//!
//! # Why `EndOfStreamLayer`
//! tonic's request body says it has ended only when it is polled once more after its last
//! message, and an HTTP/2 transport may never make that poll: a server that answered with
//! `UNAUTHENTICATED` before reading the request resets the stream, and the transport stops
//! polling. The recording kept for the replay would then stay incomplete, and the call would
//! not be replayed: about one call in a hundred under load. [`EndOfStreamBody`] reads one frame
//! ahead, so a body whose next poll is already known to be its end says so with its last
//! message, and the recording is complete as soon as that message is sent.
//!
//! tonic 0.14 needs Rust 1.88; the rest of the crate builds on 1.85.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::inner_body::IntoInnerBody;
use crate::replay::ReplayBody;

/// The `grpc-status` of `UNAUTHENTICATED`.
const UNAUTHENTICATED: &[u8] = b"16";

/// The inner service receives `tonic::body::Body`, the request body type of tonic's `Channel`
/// and of any `GrpcService` built on it: one allocation per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TonicBody;

impl<B> IntoInnerBody<B> for TonicBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Body = tonic::body::Body;

    fn convert(&self, body: ReplayBody<B>) -> tonic::body::Body {
        tonic::body::Body::new(body)
    }
}

/// The rejection predicate for gRPC: HTTP `401` (from a proxy in front of the server, which tonic
/// also reports as `UNAUTHENTICATED`), or `grpc-status: 16` (`UNAUTHENTICATED`) in the response
/// headers, as a trailers-only response carries it.
///
/// A status sent in trailers after a normal header frame cannot be seen here; see the
/// [module docs](self#which-calls-are-replayed).
///
/// ```
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_auth_refresh::grpc::unauthenticated;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("grpc-status", HeaderValue::from_static("16"));
/// assert!(unauthenticated(StatusCode::OK, &headers));
/// assert!(unauthenticated(StatusCode::UNAUTHORIZED, &HeaderMap::new()));
/// // PERMISSION_DENIED is not about the token's validity: no new token would help.
/// headers.insert("grpc-status", HeaderValue::from_static("7"));
/// assert!(!unauthenticated(StatusCode::OK, &headers));
/// ```
pub fn unauthenticated(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED
        || headers
            .get("grpc-status")
            .is_some_and(|code| code.as_bytes().trim_ascii() == UNAUTHENTICATED)
}

/// Wraps every request body in an [`EndOfStreamBody`]. Place it outside the
/// [`AuthLayer`](crate::AuthLayer); see the [module docs](self#why-endofstreamlayer) for why.
#[derive(Clone, Copy, Debug, Default)]
pub struct EndOfStreamLayer;

impl<S> Layer<S> for EndOfStreamLayer {
    type Service = EndOfStreamService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EndOfStreamService { inner }
    }
}

/// The service of an [`EndOfStreamLayer`].
#[derive(Clone, Debug)]
pub struct EndOfStreamService<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for EndOfStreamService<S>
where
    S: Service<Request<EndOfStreamBody<B>>>,
    B: Body,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.inner.call(request.map(EndOfStreamBody::new))
    }
}

pin_project! {
    /// A request body that reads one frame ahead after each data frame, so that it says it has
    /// ended ([`is_end_stream`](Body::is_end_stream)) together with its last message when the
    /// body's end is already known, not only on one more poll.
    ///
    /// The frame read ahead is returned by the next poll, unchanged: a stream of messages is one
    /// message ahead of the transport at most.
    pub struct EndOfStreamBody<B: Body> {
        #[pin]
        body: B,
        // A frame read ahead; `Some(None)`: the body ended.
        ahead: Option<Option<Result<Frame<B::Data>, B::Error>>>,
    }
}

impl<B: Body> EndOfStreamBody<B> {
    /// Wrap `body`.
    pub fn new(body: B) -> Self {
        Self { body, ahead: None }
    }
}

impl<B: Body> Body for EndOfStreamBody<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = match this.ahead.take() {
            Some(None) => {
                // Keep saying so: a body is not polled after its end, but may be asked again.
                *this.ahead = Some(None);
                return Poll::Ready(None);
            }
            Some(Some(frame)) => frame,
            None => match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(frame)) => frame,
                Poll::Ready(None) => {
                    *this.ahead = Some(None);
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        // After data, look ahead once: a body whose end is ready says so now. Trailers are the
        // last frame anyway, and an error ends the body.
        let is_data = frame.as_ref().is_ok_and(Frame::is_data);
        if is_data && !this.body.is_end_stream() {
            if let Poll::Ready(next) = this.body.as_mut().poll_frame(cx) {
                *this.ahead = Some(next);
            }
            // Pending: the body registered this task's waker; the transport polls again anyway.
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        match &self.ahead {
            Some(None) => true,
            Some(Some(_)) => false,
            None => self.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = match &self.ahead {
            Some(None) => return SizeHint::with_exact(0),
            Some(Some(Ok(frame))) => frame.data_ref().map_or(0, |data| data.remaining() as u64),
            Some(Some(Err(_))) | None => 0,
        };
        let body = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(ahead));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(ahead));
        }
        hint
    }
}

impl<B: Body> fmt::Debug for EndOfStreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndOfStreamBody")
            .field("read_ahead", &self.ahead.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn frames(
        items: Vec<Result<Frame<Bytes>, std::io::Error>>,
    ) -> StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>
    {
        StreamBody::new(futures::stream::iter(items))
    }

    #[tokio::test]
    async fn a_single_message_says_it_ended_with_the_message() {
        let body = frames(vec![Ok(Frame::data(Bytes::from_static(b"hello")))]);
        assert!(!body.is_end_stream(), "the plain stream knows only on one more poll");
        let mut body = EndOfStreamBody::new(body);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn frames_read_ahead_come_out_unchanged_and_in_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("6"));
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"bc"))),
            Ok(Frame::trailers(trailers.clone())),
        ]);
        let mut body = EndOfStreamBody::new(body);
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().lower(), 2, "the frame read ahead counts");
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "bc");
        assert!(!body.is_end_stream(), "trailers follow");
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(last.into_trailers().unwrap(), trailers);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn an_error_read_ahead_is_returned_in_its_turn() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("broken")),
        ]);
        let mut body = EndOfStreamBody::new(body);
        assert!(body.frame().await.unwrap().is_ok());
        assert!(!body.is_end_stream());
        assert!(body.frame().await.unwrap().is_err());
    }

    #[test]
    fn the_predicate_reads_only_unauthenticated() {
        let with = |code: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", http::HeaderValue::from_static(code));
            headers
        };
        assert!(unauthenticated(StatusCode::OK, &with("16")));
        assert!(unauthenticated(StatusCode::OK, &with(" 16 ")));
        assert!(!unauthenticated(StatusCode::OK, &with("0")));
        assert!(!unauthenticated(StatusCode::OK, &with("160")));
        assert!(!unauthenticated(StatusCode::OK, &with("7")));
        assert!(!unauthenticated(StatusCode::OK, &HeaderMap::new()));
        assert!(!unauthenticated(StatusCode::FORBIDDEN, &HeaderMap::new()));
    }
}
