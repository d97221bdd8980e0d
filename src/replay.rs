//! Keeping what is needed to send a request a second time.
//!
//! A request body is a stream: once sent, it is gone. To replay a request after a 401, the
//! [`ReplayBody`] keeps the chunks while the first attempt streams them (the lesson of
//! linkerd2-proxy's `ReplayBody`): the first attempt is never delayed, and nothing is kept past the
//! cap. Chunks are [`Bytes`], so keeping one is a reference count, never a copy; a `Full<Bytes>`
//! body costs nothing extra to replay.
//!
//! A request is not replayable when its body outgrew the cap, failed, or was still streaming when
//! the response arrived (the server answered before reading it all).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{request, Extensions, HeaderMap, HeaderValue, Method, Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

const NOT_REPLAYABLE: &str =
    "request body cannot be replayed: the first attempt had not sent all of it, or it outgrew the cap";

/// Default largest request body kept for a replay: 64 KiB.
pub const DEFAULT_MAX_REPLAY_BODY: usize = 64 * 1024;

pin_project! {
    /// The request body as the inner service sees it: the caller's body on the first attempt,
    /// the kept chunks on the replay.
    ///
    /// Name it when you build the client below an [`AuthLayer`](crate::AuthLayer), for example
    /// `Client<HttpConnector, ReplayBody<Full<Bytes>>>`.
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Streaming {
            #[pin]
            body: B,
            recording: Option<Arc<Mutex<Recording>>>,
        },
        Replay {
            chunks: VecDeque<Bytes>,
            trailers: Option<HeaderMap>,
        },
        // A copy made before the first attempt finished: it replays the recording once that is
        // complete (checked with `ReplayBody::is_replayable` before it is sent).
        Deferred {
            recording: Arc<Mutex<Recording>>,
        },
    }
}

impl<B> ReplayBody<B> {
    /// Wrap `body` to be sent as it is, keeping nothing: for requests sent straight to the inner
    /// service.
    pub fn new(body: B) -> Self {
        Self {
            kind: Kind::Streaming {
                body,
                recording: None,
            },
        }
    }

    /// Wrap `body` so that it can be sent again: the chunks are kept (as `Bytes` references) while
    /// the first attempt streams them, up to `cap` bytes. Use it for a streaming body below a
    /// retry layer that sits outside the [`AuthLayer`](crate::AuthLayer); bodies that are cheap to
    /// clone (`Full`, `Empty`) need no wrapping.
    pub fn recorded(body: B, cap: usize) -> Self
    where
        B: Body<Data = Bytes>,
    {
        let recording = Recording::start(&body, cap);
        Self {
            kind: Kind::Streaming { body, recording },
        }
    }

    fn replay(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Replay {
                chunks: chunks.into(),
                trailers,
            },
        }
    }

    /// A copy that sends the same bytes again, if this body can be replayed at all: it is a
    /// replay already, or it records what it streams and has not outgrown its cap.
    ///
    /// The copy can be sent once the original finished streaming; until then
    /// [`is_replayable`](Self::is_replayable) is `false` for it.
    pub fn try_clone(&self) -> Option<Self> {
        let kind = match &self.kind {
            Kind::Streaming {
                recording: Some(recording),
                ..
            } => {
                if lock(recording).state == RecordingState::Abandoned {
                    return None;
                }
                Kind::Deferred {
                    recording: recording.clone(),
                }
            }
            Kind::Streaming {
                recording: None, ..
            } => return None,
            Kind::Replay { chunks, trailers } => Kind::Replay {
                chunks: chunks.clone(),
                trailers: trailers.clone(),
            },
            Kind::Deferred { recording } => Kind::Deferred {
                recording: recording.clone(),
            },
        };
        Some(Self { kind })
    }

    /// Whether sending this body now sends the complete original bytes: `false` for a copy whose
    /// original is still streaming, outgrew the cap or failed.
    pub fn is_replayable(&self) -> bool {
        match &self.kind {
            Kind::Streaming { .. } => false,
            Kind::Replay { .. } => true,
            Kind::Deferred { recording } => lock(recording).state == RecordingState::Complete,
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Streaming { .. } => "streaming",
            Kind::Replay { .. } => "replay",
            Kind::Deferred { .. } => "deferred replay",
        };
        f.debug_struct("ReplayBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Streaming {
                    mut body,
                    recording,
                } => {
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    if let Some(recording) = recording {
                        let ended = body.is_end_stream();
                        lock(recording).record(&frame, ended);
                    }
                    return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
                }
                KindProj::Replay { chunks, trailers } => {
                    if let Some(chunk) = chunks.pop_front() {
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    return Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                KindProj::Deferred { recording } => {
                    let replay = {
                        let recording = lock(recording);
                        if recording.state != RecordingState::Complete {
                            return Poll::Ready(Some(Err(NOT_REPLAYABLE.into())));
                        }
                        Kind::Replay {
                            chunks: recording.chunks.iter().cloned().collect(),
                            trailers: recording.trailers.clone(),
                        }
                    };
                    kind.set(replay);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Streaming { body, .. } => body.is_end_stream(),
            Kind::Replay { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
            Kind::Deferred { recording } => {
                let recording = lock(recording);
                recording.state == RecordingState::Complete
                    && recording.len == 0
                    && recording.trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Streaming { body, .. } => body.size_hint(),
            Kind::Replay { chunks, .. } => {
                SizeHint::with_exact(chunks.iter().map(|c| c.remaining() as u64).sum())
            }
            Kind::Deferred { recording } => {
                let recording = lock(recording);
                match recording.state {
                    RecordingState::Complete => SizeHint::with_exact(recording.len as u64),
                    _ => SizeHint::default(),
                }
            }
        }
    }
}

/// What the first attempt has kept of the body.
#[derive(Debug)]
struct Recording {
    chunks: Vec<Bytes>,
    len: usize,
    cap: usize,
    trailers: Option<HeaderMap>,
    state: RecordingState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecordingState {
    /// The first attempt is still streaming the body.
    Recording,
    /// The whole body is kept.
    Complete,
    /// Over the cap, or the body failed: nothing is kept.
    Abandoned,
}

impl Recording {
    /// A recording for `body`, unless it is known to be too large (then nothing is kept).
    fn start<B: Body>(body: &B, cap: usize) -> Option<Arc<Mutex<Recording>>> {
        if body.size_hint().lower() > cap as u64 {
            return None;
        }
        Some(Arc::new(Mutex::new(Recording {
            chunks: Vec::new(),
            len: 0,
            cap,
            trailers: None,
            state: if body.is_end_stream() {
                RecordingState::Complete
            } else {
                RecordingState::Recording
            },
        })))
    }

    fn record<E>(&mut self, frame: &Option<Result<Frame<Bytes>, E>>, ended: bool) {
        if self.state != RecordingState::Recording {
            return;
        }
        match frame {
            None => self.state = RecordingState::Complete,
            Some(Err(_)) => self.abandon(),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.len = self.len.saturating_add(data.len());
                    if self.len > self.cap {
                        self.abandon();
                        return;
                    }
                    self.chunks.push(data.clone());
                } else if let Some(trailers) = frame.trailers_ref() {
                    self.trailers = Some(trailers.clone());
                }
                // A sender may stop polling once the body says it has ended.
                if ended {
                    self.state = RecordingState::Complete;
                }
            }
        }
    }

    fn abandon(&mut self) {
        self.state = RecordingState::Abandoned;
        self.chunks = Vec::new();
        self.trailers = None;
    }
}

fn lock(recording: &Mutex<Recording>) -> std::sync::MutexGuard<'_, Recording> {
    // `Recording` is consistent at every unlock; a panic elsewhere cannot corrupt it.
    recording.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the replay will get its body.
enum BodyReplay {
    /// The body was empty from the start: the replay sends an empty body.
    Empty,
    /// The first attempt records the body as it streams.
    Recorded(Arc<Mutex<Recording>>),
}

/// Everything needed to send a request again, except the token.
pub(crate) struct ReplayRequest {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
    body: BodyReplay,
}

impl ReplayRequest {
    /// Prepare a request for a possible replay: returns the body for the first attempt and,
    /// when the body can be kept within `cap`, what the replay needs.
    ///
    /// The copied headers may hold the first attempt's token; the replay overwrites it.
    pub(crate) fn prepare<B>(
        parts: &request::Parts,
        body: B,
        cap: usize,
    ) -> (ReplayBody<B>, Option<ReplayRequest>)
    where
        B: Body<Data = Bytes>,
    {
        let (recording, body_replay) = if body.is_end_stream() {
            (None, BodyReplay::Empty)
        } else {
            let Some(recording) = Recording::start(&body, cap) else {
                return (ReplayBody::new(body), None);
            };
            (Some(recording.clone()), BodyReplay::Recorded(recording))
        };
        let replay = ReplayRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
            body: body_replay,
        };
        let body = ReplayBody {
            kind: Kind::Streaming { body, recording },
        };
        (body, Some(replay))
    }

    /// The request for the replay, with the new credential; `None` when the first attempt did
    /// not leave a complete body behind.
    pub(crate) fn into_request<B>(
        self,
        header_name: &http::HeaderName,
        credential: HeaderValue,
    ) -> Option<Request<ReplayBody<B>>> {
        let body = match self.body {
            BodyReplay::Empty => ReplayBody::replay(Vec::new(), None),
            BodyReplay::Recorded(recording) => {
                let recording = lock(&recording);
                if recording.state != RecordingState::Complete {
                    return None;
                }
                // Copies of the references: a retry layer may replay the same recording too.
                ReplayBody::replay(recording.chunks.clone(), recording.trailers.clone())
            }
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        *request.extensions_mut() = self.extensions;
        request
            .headers_mut()
            .insert(header_name.clone(), credential);
        Some(request)
    }

    /// Whether the replay has a complete body to send.
    pub(crate) fn is_ready(&self) -> bool {
        match &self.body {
            BodyReplay::Empty => true,
            BodyReplay::Recorded(recording) => lock(recording).state == RecordingState::Complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn prepare<B: Body<Data = Bytes>>(
        request: Request<B>,
        cap: usize,
    ) -> (Request<ReplayBody<B>>, Option<ReplayRequest>) {
        let (parts, body) = request.into_parts();
        let (body, replay) = ReplayRequest::prepare(&parts, body, cap);
        (Request::from_parts(parts, body), replay)
    }

    fn name() -> http::HeaderName {
        http::header::AUTHORIZATION
    }

    #[tokio::test]
    async fn full_body_replays_byte_identical_without_copying() {
        let payload = Bytes::from(vec![7u8; 10 * 1024]);
        let request = Request::post("/x")
            .body(Full::new(payload.clone()))
            .unwrap();
        let (first, replay) = prepare(request, DEFAULT_MAX_REPLAY_BODY);
        let replay = replay.unwrap();
        assert!(!replay.is_ready(), "nothing streamed yet");
        let sent = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(sent, payload);
        assert!(replay.is_ready());
        let again = replay
            .into_request::<Full<Bytes>>(&name(), HeaderValue::from_static("Bearer b"))
            .unwrap();
        assert_eq!(again.headers()[name()], "Bearer b");
        assert_eq!(again.body().size_hint().exact(), Some(10 * 1024));
        let resent = again.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(resent, payload);
        // Same allocation: the replay kept a reference, not a copy.
        assert_eq!(resent.as_ptr(), payload.as_ptr());
    }

    #[tokio::test]
    async fn body_over_the_cap_is_dropped_not_kept() {
        let chunks =
            (0..4).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![1u8; 100]))));
        let body = StreamBody::new(futures::stream::iter(chunks));
        let (first, replay) = prepare(Request::post("/").body(body).unwrap(), 250);
        let replay = replay.unwrap();
        let sent = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            sent.len(),
            400,
            "the first attempt always streams everything"
        );
        assert!(!replay.is_ready());
        assert!(replay
            .into_request::<Full<Bytes>>(&name(), HeaderValue::from_static("x"))
            .is_none());
    }

    #[test]
    fn known_large_body_is_not_even_recorded() {
        let body = Full::new(Bytes::from(vec![0u8; 1024]));
        let (_, replay) = prepare(Request::post("/").body(body).unwrap(), 1023);
        assert!(replay.is_none());
    }

    #[tokio::test]
    async fn body_still_streaming_is_not_replayable() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let body = StreamBody::new(tokio_stream_from(rx));
        let (mut first, replay) = prepare(Request::post("/").body(body).unwrap(), 1024);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        let frame = first.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "part");
        assert!(!replay.unwrap().is_ready());
    }

    #[tokio::test]
    async fn empty_body_and_trailers_replay() {
        let (_, replay) = prepare(
            Request::get("/")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
            0,
        );
        let again = replay
            .unwrap()
            .into_request::<Full<Bytes>>(&name(), HeaderValue::from_static("x"))
            .unwrap();
        assert!(again.body().is_end_stream());

        let mut trailers = HeaderMap::new();
        trailers.insert("checksum", HeaderValue::from_static("abc"));
        let frames = vec![
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"data"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let (first, replay) = prepare(Request::post("/").body(body).unwrap(), 1024);
        first.into_body().collect().await.unwrap();
        let again = replay
            .unwrap()
            .into_request::<Full<Bytes>>(&name(), HeaderValue::from_static("x"))
            .unwrap();
        let collected = again.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "data");
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
