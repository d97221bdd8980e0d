//! gRPC clients on [tonic](https://docs.rs/tonic) (feature `tonic`).
//!
//! A tonic `Channel` accepts only `tonic::body::Body`, and a gRPC server refuses a token with
//! status `UNAUTHENTICATED` inside an HTTP `200`, not with a `401`. Name both on the builder:
//!
//! - [`TonicBody`], the [body conversion](crate::inner_body) to tonic's body type, which also
//!   reads the request messages that are ready before the call is sent (see
//!   [below](#why-the-conversion-reads-ahead));
//! - [`unauthenticated`], the rejection predicate that reads the gRPC status.
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
//! let service = ServiceBuilder::new().layer(auth).service(channel);
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
//! headers and its request messages were all kept:
//!
//! - **Unary calls**, and **client-streaming calls** whose messages are ready when the call
//!   starts (a stream over a collection), within the replay cap
//!   ([`max_replay_body`](crate::AuthLayerBuilder::max_replay_body), 64 KiB by default) and
//!   within [`READ_AHEAD`] bytes.
//! - A client stream whose messages come later (from a channel, say), refused before the server
//!   read them, as a tonic interceptor does: the replay sends the messages recorded so far and
//!   takes over the rest of the stream, which the first attempt never sent (the mechanism
//!   `tests/replay.rs` checks for slow uploads over HTTP/1.1 and HTTP/2), within the cap.
//! - **Server-streaming and bidirectional calls** refused before the first response message:
//!   that refusal is a *trailers-only* response (the `grpc-status` is in the headers), and
//!   [`unauthenticated`] sees it. The request side follows the rules above.
//! - **Not a status in trailers**, after a normal header frame (a stream that ends with
//!   `UNAUTHENTICATED` after some messages): its messages have reached the caller already, so
//!   the call cannot be sent again, and the caller gets the status from tonic as usual. Put a
//!   [`TrailersRejectionLayer`] below the auth layer so that such a status at least retires the
//!   token it refused: the next call then takes a new one instead of being refused first.
//!
//! # Why the conversion reads ahead
//! tonic's request body says it has ended only when it is polled once more after its last
//! message, and the HTTP/2 transport may never make that poll: a server that answered
//! `UNAUTHENTICATED` before reading the request resets the stream, and the transport stops
//! polling the body, or it has not polled it at all yet. The recording kept for the replay would
//! then be incomplete, and the call not replayed: about one call in a hundred under load.
//! [`TonicBody`] reads the frames that are ready when the call is made, so a unary call is
//! recorded whole before it is sent, whatever the transport does afterwards.
//!
//! tonic 0.14 needs Rust 1.88; the rest of the crate builds on 1.85.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::cache::TokenCache;
use crate::inner_body::IntoInnerBody;
use crate::replay::ReplayBody;

/// The most request bytes [`TonicBody`] reads before a call is sent: the default replay cap.
/// A call whose ready messages are larger streams the rest as the transport asks for it.
pub const READ_AHEAD: usize = crate::replay::DEFAULT_MAX_REPLAY_BODY;

/// The `grpc-status` of `UNAUTHENTICATED`.
const UNAUTHENTICATED: &[u8] = b"16";

/// The inner service receives `tonic::body::Body`, the request body type of tonic's `Channel`
/// and of any `GrpcService` built on it: one allocation per request.
///
/// The frames of the request body that are ready when the call is made (up to [`READ_AHEAD`]
/// bytes, and the body's end if it is ready too) are read before the call is sent, so that the
/// copy kept for a replay is complete whatever the transport polls afterwards; see the
/// [module docs](self#why-the-conversion-reads-ahead). They are sent unchanged and in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TonicBody;

impl<B> IntoInnerBody<B> for TonicBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Body = tonic::body::Body;

    fn convert(&self, body: ReplayBody<B>) -> tonic::body::Body {
        tonic::body::Body::new(ReadAhead::new(body, READ_AHEAD))
    }
}

/// The rejection predicate for gRPC: HTTP `401` (from a proxy in front of the server; tonic
/// reports it as `UNAUTHENTICATED` too), or `grpc-status: 16` (`UNAUTHENTICATED`) in the
/// response headers, where a trailers-only response carries it.
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
/// // PERMISSION_DENIED is about the caller's rights, not the token's validity.
/// headers.insert("grpc-status", HeaderValue::from_static("7"));
/// assert!(!unauthenticated(StatusCode::OK, &headers));
/// ```
pub fn unauthenticated(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED || says_unauthenticated(headers)
}

/// Whether headers or trailers carry `grpc-status: 16`.
fn says_unauthenticated(map: &HeaderMap) -> bool {
    map.get("grpc-status")
        .is_some_and(|code| code.as_bytes().trim_ascii() == UNAUTHENTICATED)
}

/// Retires the token a response's *trailers* refuse (`grpc-status: 16` after some messages),
/// which the auth layer's predicate cannot see in the headers.
///
/// Place it below the [`AuthLayer`](crate::AuthLayer), over the same cache: it notes the
/// credential each request carries, watches the trailers of the response body as the caller
/// reads it (nothing is buffered), and on `UNAUTHENTICATED` reports that credential to the
/// cache, generation-checked like a 401 (see [`TokenCache::reject`]). The call itself is not
/// replayed: its messages have reached the caller already.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_auth_refresh::{grpc, AuthLayer, StaticToken, Token};
///
/// # async fn run() {
/// let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051").connect_lazy();
/// let auth = AuthLayer::builder(StaticToken::new(Token::new("secret")))
///     .inner_body(grpc::TonicBody)
///     .token_rejected_when(grpc::unauthenticated)
///     .build();
/// let service = ServiceBuilder::new()
///     .layer(auth.clone())
///     .layer(grpc::TrailersRejectionLayer::new(auth.cache().clone()))
///     .service(channel);
/// let client = tonic::client::Grpc::new(service);
/// # drop(client);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct TrailersRejectionLayer {
    cache: TokenCache,
    header_name: HeaderName,
}

impl TrailersRejectionLayer {
    /// Report refusals in trailers to `cache`, reading the credential from `Authorization`.
    pub fn new(cache: TokenCache) -> Self {
        Self {
            cache,
            header_name: AUTHORIZATION,
        }
    }

    /// Read the credential from this header instead, when the auth layer writes another one.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header_name = name;
        self
    }
}

impl<S> Layer<S> for TrailersRejectionLayer {
    type Service = TrailersRejection<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrailersRejection {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of a [`TrailersRejectionLayer`].
#[derive(Clone, Debug)]
pub struct TrailersRejection<S> {
    inner: S,
    layer: TrailersRejectionLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TrailersRejection<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<WatchTrailers<ResBody>>;
    type Error = S::Error;
    type Future = WatchTrailersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let watch = request
            .headers()
            .get(&self.layer.header_name)
            .map(|credential| (self.layer.cache.clone(), credential.clone()));
        WatchTrailersFuture {
            future: self.inner.call(request),
            watch,
        }
    }
}

pin_project! {
    /// The response future of [`TrailersRejection`].
    pub struct WatchTrailersFuture<F> {
        #[pin]
        future: F,
        watch: Option<(TokenCache, HeaderValue)>,
    }
}

impl<F, ResBody, E> Future for WatchTrailersFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<WatchTrailers<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let watch = this.watch.take();
        Poll::Ready(Ok(response.map(|body| WatchTrailers { body, watch })))
    }
}

pin_project! {
    /// A response body that reports `UNAUTHENTICATED` in its trailers to the token cache.
    pub struct WatchTrailers<B> {
        #[pin]
        body: B,
        watch: Option<(TokenCache, HeaderValue)>,
    }
}

impl<B: Body> Body for WatchTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            let refused = frame.trailers_ref().is_some_and(says_unauthenticated);
            if refused {
                if let Some((cache, credential)) = this.watch.take() {
                    let rejection = cache.reject_credential(&credential);
                    tracing::debug!(
                        ?rejection,
                        "UNAUTHENTICATED in the response trailers; the token was reported"
                    );
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A body whose ready frames were read when it was made; they come out first, unchanged.
struct ReadAhead<B: Body> {
    body: B,
    frames: VecDeque<Result<Frame<B::Data>, B::Error>>,
    /// The body returned `None`: nothing follows the frames read ahead.
    ended: bool,
}

impl<B> ReadAhead<B>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    /// Read the frames of `body` that are ready now, up to `limit` bytes of data, and its end if
    /// that is ready too. A body that is not ready was polled with a no-op waker; the transport
    /// polls it again with its own before it waits for it.
    fn new(mut body: B, limit: usize) -> Self {
        let mut frames = VecDeque::new();
        let mut ended = body.is_end_stream();
        let mut read = 0usize;
        let mut cx = Context::from_waker(Waker::noop());
        while !ended {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(None) => ended = true,
                Poll::Ready(Some(Ok(frame))) => {
                    let data = frame.data_ref().map(Buf::remaining);
                    frames.push_back(Ok(frame));
                    match data {
                        // Trailers are the last frame.
                        None => break,
                        Some(len) => read = read.saturating_add(len),
                    }
                    // The end is read even past the limit: it costs nothing to keep.
                    if read >= limit && !body.is_end_stream() {
                        break;
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    frames.push_back(Err(error));
                    break;
                }
                Poll::Pending => break,
            }
        }
        Self {
            body,
            frames,
            ended,
        }
    }
}

// The frames read ahead are never pinned; only `body` is polled in place, and it is `Unpin`.
impl<B: Body + Unpin> Unpin for ReadAhead<B> {}

impl<B> Body for ReadAhead<B>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && (self.ended || self.body.is_end_stream())
    }

    /// Never exact: an exact size would make the transport add a `content-length` that tonic
    /// does not send.
    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .frames
            .iter()
            .filter_map(|frame| frame.as_ref().ok()?.data_ref())
            .map(|data| data.remaining() as u64)
            .sum();
        let mut hint = SizeHint::new();
        if self.ended {
            hint.set_lower(read);
        } else {
            let body = self.body.size_hint();
            hint.set_lower(body.lower().saturating_add(read));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;

    fn frames(items: Vec<Result<Frame<Bytes>, std::io::Error>>) -> Frames {
        StreamBody::new(futures::stream::iter(items))
    }

    fn data(bytes: &'static [u8]) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from_static(bytes)))
    }

    #[tokio::test]
    async fn a_ready_body_is_recorded_whole_before_it_is_sent() {
        // Like tonic's unary body: it says it ended only when polled after its message.
        let body = frames(vec![data(b"hello")]);
        assert!(!body.is_end_stream());
        let replay = ReplayBody::recorded(body, 1024);
        let copy = replay.try_clone().unwrap();
        assert!(!copy.is_replayable());
        let mut body = ReadAhead::new(replay, READ_AHEAD);
        assert!(
            copy.is_replayable(),
            "complete before any poll by a transport"
        );
        assert_eq!(body.size_hint().exact(), None, "never exact");
        assert_eq!(body.size_hint().lower(), 5);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(body.is_end_stream(), "said together with the last message");
        assert!(body.frame().await.is_none());
        let replayed = copy.collect().await.unwrap().to_bytes();
        assert_eq!(replayed, "hello");
    }

    #[tokio::test]
    async fn frames_read_ahead_come_out_unchanged_and_in_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("6"));
        let body = frames(vec![
            data(b"a"),
            data(b"bc"),
            Ok(Frame::trailers(trailers.clone())),
            data(b"never read"),
        ]);
        let mut body = ReadAhead::new(body, READ_AHEAD);
        assert_eq!(body.frames.len(), 3, "up to the trailers, the last frame");
        let next = |body: &mut ReadAhead<Frames>| {
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(body).poll_frame(&mut cx) {
                Poll::Ready(frame) => frame.map(|frame| frame.unwrap()),
                Poll::Pending => panic!("read ahead"),
            }
        };
        assert_eq!(next(&mut body).unwrap().into_data().unwrap(), "a");
        assert_eq!(next(&mut body).unwrap().into_data().unwrap(), "bc");
        assert_eq!(next(&mut body).unwrap().into_trailers().unwrap(), trailers);
    }

    #[tokio::test]
    async fn reading_ahead_stops_at_the_limit_and_the_rest_streams() {
        let body = frames(vec![data(b"0123"), data(b"4567"), data(b"89")]);
        let body = ReadAhead::new(body, 4);
        assert_eq!(body.frames.len(), 1);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all, "0123456789");
    }

    #[tokio::test]
    async fn a_body_that_is_not_ready_streams_as_the_transport_asks() {
        let (sender, receiver) = futures::channel::mpsc::unbounded();
        let body = StreamBody::new(receiver);
        let body = ReadAhead::new(body, READ_AHEAD);
        assert!(body.frames.is_empty());
        sender
            .unbounded_send(Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(
                b"late",
            ))))
            .unwrap();
        drop(sender);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all, "late");
    }

    #[tokio::test]
    async fn an_error_read_ahead_is_returned_in_its_turn() {
        let body = frames(vec![data(b"a"), Err(std::io::Error::other("broken"))]);
        let mut body = ReadAhead::new(body, READ_AHEAD);
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
