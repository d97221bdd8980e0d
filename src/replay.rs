//! Keeping what is needed to send a request a second time.
//!
//! A request body is a stream: once sent, it is gone. To replay a request after a 401, the
//! [`ReplayBody`] keeps the chunks while the first attempt streams them (the lesson of
//! linkerd2-proxy's `ReplayBody`): the first attempt is never delayed, and nothing is kept past the
//! cap. Chunks are [`Bytes`], so keeping one is a reference count, never a copy; a `Full<Bytes>`
//! body costs nothing extra to replay.
//!
//! A request is not replayable when its body outgrew the cap or failed. A body still streaming
//! when the response arrives (an API that refuses the token before it reads the upload, as
//! authentication middleware does) is replayable all the same when the layer holds the rest of
//! it: a body without an exact size lives in the shared recording, so the replay sends what the
//! first attempt recorded and then takes over the rest of the caller's body, which the first
//! attempt never sent. Why a request was not replayed is a [`NotReplayable`].
//!
//! A transport may stop polling a body before the body says `None`: hyper's HTTP/1 client drops
//! it once `content-length` bytes are written, or right after the trailers. So a recording is
//! complete as soon as the body is known to be whole, by whichever comes first:
//! - the body returned `None`;
//! - the body says [`is_end_stream`](Body::is_end_stream) after a frame;
//! - a trailers frame arrived (trailers are the last frame of a body);
//! - the data reached the exact length known when the body was wrapped: the body's own exact
//!   [size hint](Body::size_hint), else the request's `content-length`.
//!
//! A body that was empty from the start (`Empty`, an empty `Full`) keeps nothing and is always
//! replayable.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{request, HeaderMap, HeaderValue, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::head::RequestHead;

const NOT_REPLAYABLE: &str =
    "request body cannot be replayed: the first attempt had not sent all of it, or it outgrew the cap";
const TAKEN_BY_REPLAY: &str =
    "the rest of this request body was handed to the replay of the request";

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
            keep: Keep<B>,
        },
        // The caller's body, kept in the shared recording so that a replay can take over the
        // part the first attempt never sent.
        Shared {
            recording: Arc<Mutex<Recording<B>>>,
        },
        // The replay of a body refused mid-stream: what was recorded, then the rest.
        Continue {
            chunks: VecDeque<Bytes>,
            rest: Pin<Box<B>>,
        },
        Replay {
            chunks: VecDeque<Bytes>,
            trailers: Option<Box<HeaderMap>>,
        },
        // A copy made before the first attempt finished: it replays the recording once that is
        // complete (checked with `ReplayBody::is_replayable` before it is sent).
        Deferred {
            recording: Arc<Mutex<Recording<B>>>,
        },
    }
}

/// What the first attempt keeps of the body it streams.
enum Keep<B> {
    /// Nothing: the body cannot be sent again.
    Nothing,
    /// The body was empty from the start: a copy is an empty body, nothing to keep.
    Empty,
    /// The chunks, kept as they stream.
    Recording(Arc<Mutex<Recording<B>>>),
}

impl<B> ReplayBody<B> {
    /// Wrap `body` to be sent as it is, keeping nothing: for requests sent straight to the inner
    /// service.
    pub fn new(body: B) -> Self {
        Self::streaming(body, Keep::Nothing)
    }

    fn streaming(body: B, keep: Keep<B>) -> Self {
        Self {
            kind: Kind::Streaming { body, keep },
        }
    }

    /// Wrap `body` so that it can be sent again: the chunks are kept (as `Bytes` references) while
    /// the first attempt streams them, up to `cap` bytes. Use it for a streaming body below a
    /// retry layer that sits outside the [`AuthLayer`](crate::AuthLayer); bodies that are cheap to
    /// clone (`Full`, `Empty`) need no wrapping.
    ///
    /// The recording is complete when the body ends, sends its trailers, or reaches its exact
    /// [size hint](Body::size_hint). It does not see the request's `content-length`: a body sent
    /// with that header should carry the same exact size hint, since hyper's HTTP/1 client stops
    /// polling once that many bytes are written.
    pub fn recorded(body: B, cap: usize) -> Self
    where
        B: Body<Data = Bytes>,
    {
        Self::recording(body, None, cap, false)
    }

    /// Wrap the body of a request the auth layer sends: recorded within `cap`, so that both the
    /// 401 replay and a retry layer below can send it again. A body without an exact size (a
    /// stream, an upload) goes into the shared recording, so that a replay can take over what
    /// the first attempt never sent.
    pub(crate) fn for_request(headers: &HeaderMap, body: B, cap: usize) -> Self
    where
        B: Body<Data = Bytes>,
    {
        // An empty body (most GETs) needs no length: skip reading the header.
        let declared = if body.is_end_stream() {
            None
        } else {
            content_length(headers)
        };
        Self::recording(body, declared, cap, true)
    }

    /// Wrap the body of a request the auth layer passes through: nothing is kept, but an empty
    /// body costs nothing to copy, so a retry layer below can still send it again.
    pub(crate) fn passthrough(body: B) -> Self
    where
        B: Body,
    {
        let keep = if body.is_end_stream() {
            Keep::Empty
        } else {
            Keep::Nothing
        };
        Self::streaming(body, keep)
    }

    /// `declared` is the request's `content-length`, if any. With `shared`, a body without an
    /// exact size moves into the recording (one allocation), where a replay can take it over.
    fn recording(body: B, declared: Option<u64>, cap: usize, shared: bool) -> Self
    where
        B: Body<Data = Bytes>,
    {
        if body.is_end_stream() {
            return Self::streaming(body, Keep::Empty);
        }
        let Some(recording) = Recording::start(&body, declared, cap) else {
            return Self::streaming(body, Keep::Nothing);
        };
        if shared && body.size_hint().exact().is_none() {
            lock(&recording).rest = Some(Box::pin(body));
            return Self {
                kind: Kind::Shared { recording },
            };
        }
        Self::streaming(body, Keep::Recording(recording))
    }

    fn replay(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Replay {
                chunks: chunks.into(),
                trailers: trailers.map(Box::new),
            },
        }
    }

    /// A copy that sends the same bytes again, if this body can be replayed at all: it is a
    /// replay already, it was empty from the start, or it records what it streams and has not
    /// outgrown its cap.
    ///
    /// The copy can be sent once the original finished streaming; until then
    /// [`is_replayable`](Self::is_replayable) is `false` for it.
    pub fn try_clone(&self) -> Option<Self> {
        let kind = match &self.kind {
            Kind::Streaming { keep, .. } => match keep {
                Keep::Nothing => return None,
                Keep::Empty => Kind::Replay {
                    chunks: VecDeque::new(),
                    trailers: None,
                },
                Keep::Recording(recording) => Kind::Deferred {
                    recording: deferrable(recording)?,
                },
            },
            Kind::Shared { recording } => Kind::Deferred {
                recording: deferrable(recording)?,
            },
            // Its rest streams once, for this replay only.
            Kind::Continue { .. } => return None,
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
            Kind::Streaming { keep, .. } => matches!(keep, Keep::Empty),
            Kind::Shared { .. } | Kind::Continue { .. } => false,
            Kind::Replay { .. } => true,
            Kind::Deferred { recording } => lock(recording).state == RecordingState::Complete,
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Streaming { .. } | Kind::Shared { .. } => "streaming",
            Kind::Continue { .. } => "replay, then the rest of the body",
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

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Streaming { mut body, keep } => {
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    if let Keep::Recording(recording) = keep {
                        let ended = body.is_end_stream();
                        lock(recording).record(&frame, ended);
                    }
                    return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
                }
                KindProj::Shared { recording } => {
                    let mut recording = lock(recording);
                    let recording = &mut *recording;
                    let Some(body) = recording.rest.as_mut() else {
                        // A replay took the rest over: this attempt was answered already.
                        return Poll::Ready(Some(Err(TAKEN_BY_REPLAY.into())));
                    };
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    let ended = body.is_end_stream();
                    recording.record(&frame, ended);
                    return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
                }
                KindProj::Continue { chunks, rest } => {
                    if let Some(chunk) = chunks.pop_front() {
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    let frame = ready!(rest.as_mut().poll_frame(cx));
                    return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
                }
                KindProj::Replay { chunks, trailers } => {
                    if let Some(chunk) = chunks.pop_front() {
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    return Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))));
                }
                KindProj::Deferred { recording } => {
                    let replay = {
                        let recording = lock(recording);
                        if recording.state != RecordingState::Complete {
                            return Poll::Ready(Some(Err(NOT_REPLAYABLE.into())));
                        }
                        Kind::Replay {
                            chunks: recording.chunks.iter().cloned().collect(),
                            trailers: recording.trailers.clone().map(Box::new),
                        }
                    };
                    kind.set(replay);
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Streaming { body, .. } => body.is_end_stream(),
            Kind::Shared { recording } => lock(recording)
                .rest
                .as_ref()
                .is_none_or(|body| body.is_end_stream()),
            Kind::Continue { chunks, rest } => chunks.is_empty() && rest.is_end_stream(),
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
            Kind::Shared { recording } => lock(recording)
                .rest
                .as_ref()
                .map_or_else(SizeHint::default, |body| body.size_hint()),
            Kind::Continue { chunks, rest } => {
                let recorded: u64 = chunks.iter().map(|c| c.remaining() as u64).sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(recorded.saturating_add(rest.lower()));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(recorded.saturating_add(upper));
                }
                hint
            }
            Kind::Replay { chunks, trailers } => replay_size_hint(
                chunks.iter().map(|c| c.remaining() as u64).sum(),
                trailers.is_some(),
            ),
            Kind::Deferred { recording } => {
                let recording = lock(recording);
                match recording.state {
                    RecordingState::Complete => {
                        replay_size_hint(recording.len as u64, recording.trailers.is_some())
                    }
                    _ => SizeHint::default(),
                }
            }
        }
    }
}

/// The size of a replay: exact, unless trailers follow the data. An HTTP/1 sender frames a body
/// of exact size with `content-length`, which cannot carry trailers; without the exact size
/// hyper sends it chunked, as it sent the original.
fn replay_size_hint(len: u64, trailers: bool) -> SizeHint {
    if trailers {
        let mut hint = SizeHint::new();
        hint.set_lower(len);
        hint
    } else {
        SizeHint::with_exact(len)
    }
}

/// What the first attempt has kept of the body.
struct Recording<B> {
    chunks: Vec<Bytes>,
    len: usize,
    cap: usize,
    /// The length at which the body is whole, if known when it was wrapped.
    expected: Option<u64>,
    trailers: Option<HeaderMap>,
    state: RecordingState,
    /// The caller's body itself, for a body without an exact size sent by the auth layer: the
    /// first attempt polls it through here, and a replay may take over the rest.
    rest: Option<Pin<Box<B>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecordingState {
    /// The first attempt is still streaming the body.
    Recording,
    /// The whole body is kept.
    Complete,
    /// Over the cap, or the body failed: nothing is kept.
    Abandoned(NotReplayable),
    /// A replay took over the rest of the body: nobody else can send it again.
    Taken,
}

/// Why a request rejected with a 401 was not replayed: the rejection goes back to the caller
/// unchanged, and the reason is counted in [`CacheStats`](crate::CacheStats) and written in the
/// debug event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotReplayable {
    /// The body outgrew the replay cap (`max_replay_body`), or was known to be larger.
    TooLarge,
    /// The body failed while the first attempt sent it.
    BodyFailed,
    /// The body was still streaming when the rejection arrived, and its rest could not be taken
    /// over (a body with an exact size that the first attempt had not sent in full).
    StillStreaming,
    /// `replay_when` refused this request.
    Refused,
}

impl std::error::Error for NotReplayable {}

impl fmt::Display for NotReplayable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotReplayable::TooLarge => "its body outgrew the replay cap",
            NotReplayable::BodyFailed => "its body failed while it was sent",
            NotReplayable::StillStreaming => "its body was still being sent",
            NotReplayable::Refused => "replay_when refused it",
        })
    }
}

impl<B> Recording<B> {
    /// A recording for a non-empty `body`, unless it is known to be too large (then nothing is
    /// kept). `declared` is the request's `content-length`.
    ///
    /// The body's own exact size hint comes first: hyper sizes the message from it, and a body
    /// that breaks it is abandoned below. The header counts only without one; it may lie, but
    /// a lie cannot make the replay send other bytes than the first attempt: an HTTP/1.1 sender
    /// (hyper included) writes exactly that many bytes and stops polling, and an HTTP/2 peer
    /// rejects a body whose length differs. So the recording is whole when the data reaches it,
    /// and a body that yields more is abandoned.
    fn start(body: &B, declared: Option<u64>, cap: usize) -> Option<Arc<Mutex<Recording<B>>>>
    where
        B: Body,
    {
        let hint = body.size_hint();
        let expected = hint.exact().or(declared);
        if hint.lower() > cap as u64 || expected.is_some_and(|len| len > cap as u64) {
            return None;
        }
        Some(Arc::new(Mutex::new(Recording {
            chunks: Vec::new(),
            len: 0,
            cap,
            expected,
            trailers: None,
            state: RecordingState::Recording,
            rest: None,
        })))
    }

    /// Keep `frame`; `ended` is the body's `is_end_stream()` after it.
    ///
    /// Completeness never waits for a poll the transport may not make (see the module docs).
    fn record<E>(&mut self, frame: &Option<Result<Frame<Bytes>, E>>, ended: bool) {
        match self.state {
            RecordingState::Abandoned(_) | RecordingState::Taken => {}
            RecordingState::Complete => self.record_after_end(frame),
            RecordingState::Recording => match frame {
                None => self.state = RecordingState::Complete,
                Some(Err(_)) => self.abandon(NotReplayable::BodyFailed),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.len = self.len.saturating_add(data.len());
                        if self.len > self.cap {
                            self.abandon(NotReplayable::TooLarge);
                            return;
                        }
                        if !data.is_empty() {
                            self.chunks.push(data.clone());
                        }
                        match self.expected {
                            Some(expected) if self.len as u64 > expected => {
                                self.abandon(NotReplayable::BodyFailed);
                                return;
                            }
                            // A sender stops once the length it announced is written.
                            Some(expected) if self.len as u64 == expected => {
                                self.state = RecordingState::Complete;
                            }
                            _ => {}
                        }
                    } else if let Some(trailers) = frame.trailers_ref() {
                        // Trailers are the last frame; a sender stops right after them.
                        self.trailers = Some(trailers.clone());
                        self.state = RecordingState::Complete;
                    }
                    // A sender may stop polling once the body says it has ended.
                    if ended {
                        self.state = RecordingState::Complete;
                    }
                }
            },
        }
    }

    /// A frame after the body was known to be whole. Only a body completed by its length can
    /// still yield one a transport would send: trailers (HTTP/2 carries them after a sized
    /// body) are kept; more data means the body broke its length, and it is not replayed.
    fn record_after_end<E>(&mut self, frame: &Option<Result<Frame<Bytes>, E>>) {
        let Some(frame) = frame else {
            return;
        };
        let Ok(frame) = frame else {
            self.abandon(NotReplayable::BodyFailed);
            return;
        };
        if let Some(data) = frame.data_ref() {
            if !data.is_empty() {
                self.abandon(NotReplayable::BodyFailed);
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            if self.trailers.is_none() {
                self.trailers = Some(trailers.clone());
            }
        }
    }

    fn abandon(&mut self, reason: NotReplayable) {
        self.state = RecordingState::Abandoned(reason);
        self.chunks = Vec::new();
        self.trailers = None;
    }

    /// Whether a replay can send the whole body: the recording is complete, or the rest of the
    /// body is still here to be taken over.
    fn replayable(&self) -> Result<(), NotReplayable> {
        match self.state {
            RecordingState::Complete => Ok(()),
            RecordingState::Recording if self.rest.is_some() => Ok(()),
            RecordingState::Recording | RecordingState::Taken => Err(NotReplayable::StillStreaming),
            RecordingState::Abandoned(reason) => Err(reason),
        }
    }

    /// The body for a replay: the recording, or the recording followed by the rest of the
    /// caller's body, which the first attempt then never sends.
    fn replay_body(&mut self) -> Result<ReplayBody<B>, NotReplayable> {
        self.replayable()?;
        if self.state == RecordingState::Complete {
            // Copies of the references: a retry layer may replay the same recording too.
            return Ok(ReplayBody::replay(
                self.chunks.clone(),
                self.trailers.clone(),
            ));
        }
        let rest = self.rest.take().ok_or(NotReplayable::StillStreaming)?;
        self.state = RecordingState::Taken;
        Ok(ReplayBody {
            kind: Kind::Continue {
                chunks: std::mem::take(&mut self.chunks).into(),
                rest,
            },
        })
    }
}

/// The recording, for a copy that replays it once the original has streamed it all (a retry
/// layer's copy); `None` when it cannot be replayed.
fn deferrable<B>(recording: &Arc<Mutex<Recording<B>>>) -> Option<Arc<Mutex<Recording<B>>>> {
    match lock(recording).state {
        RecordingState::Abandoned(_) | RecordingState::Taken => None,
        RecordingState::Recording | RecordingState::Complete => Some(recording.clone()),
    }
}

/// The request's `content-length`, when it is one valid number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.trim().parse().ok()
}

fn lock<B>(recording: &Mutex<Recording<B>>) -> std::sync::MutexGuard<'_, Recording<B>> {
    // `Recording` is consistent at every unlock; a panic elsewhere cannot corrupt it.
    recording.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the replay will get its body.
enum BodyReplay<B> {
    /// The body was empty from the start: the replay sends an empty body.
    Empty,
    /// The first attempt records the body as it streams.
    Recorded(Arc<Mutex<Recording<B>>>),
    /// Taken from the recording when the rejection arrived: what the replay sends. Boxed: only
    /// a rejected request has one, and it would otherwise grow every response future.
    Frozen(Box<ReplayBody<B>>),
}

/// Everything needed to send a request again, except the token.
pub(crate) struct ReplayRequest<B> {
    /// The request head in one allocation: only a replay parses it back.
    head: RequestHead,
    body: BodyReplay<B>,
}

impl<B> ReplayRequest<B> {
    /// What a replay of the request with these `parts` needs, when `body` (wrapped by
    /// [`ReplayBody::for_request`]) can be sent again.
    ///
    /// The copied headers may hold the first attempt's token; the replay overwrites it.
    pub(crate) fn new(
        parts: &request::Parts,
        body: &ReplayBody<B>,
    ) -> Result<ReplayRequest<B>, NotReplayable> {
        let body_replay = match &body.kind {
            Kind::Streaming {
                keep: Keep::Empty, ..
            } => BodyReplay::Empty,
            Kind::Streaming {
                keep: Keep::Recording(recording),
                ..
            }
            | Kind::Shared { recording } => BodyReplay::Recorded(recording.clone()),
            // A replay already (a DPoP replay may be followed by another): its chunks are shared.
            Kind::Replay { .. } => match body.try_clone() {
                Some(copy) => BodyReplay::Frozen(Box::new(copy)),
                None => return Err(NotReplayable::TooLarge),
            },
            // Known to be larger than the cap before it was sent.
            _ => return Err(NotReplayable::TooLarge),
        };
        Ok(ReplayRequest {
            head: RequestHead::capture(parts),
            body: body_replay,
        })
    }

    /// The request for the replay, with the new credential. Once this returned a request
    /// whose body continues the caller's, the first attempt sends no more of it.
    pub(crate) fn into_request(
        self,
        header_name: &http::HeaderName,
        credential: HeaderValue,
    ) -> Result<Request<ReplayBody<B>>, BoxError> {
        let body = match self.body {
            BodyReplay::Empty => ReplayBody::replay(Vec::new(), None),
            BodyReplay::Recorded(recording) => lock(&recording).replay_body()?,
            BodyReplay::Frozen(body) => *body,
        };
        let mut request = self.head.into_request(body)?;
        request
            .headers_mut()
            .insert(header_name.clone(), credential);
        Ok(request)
    }

    /// Whether the recording holds the whole body (what the completeness rules decide).
    #[cfg(test)]
    fn is_complete(&self) -> bool {
        match &self.body {
            BodyReplay::Empty | BodyReplay::Frozen(_) => true,
            BodyReplay::Recorded(recording) => lock(recording).state == RecordingState::Complete,
        }
    }

    /// Settle what the replay sends, at the moment the rejection arrives, or say why it cannot
    /// be replayed. A body still streaming is taken over here: from now on the first attempt
    /// sends no more of it, so nothing it does later can change what the replay sends.
    pub(crate) fn freeze(&mut self) -> Result<(), NotReplayable> {
        if let BodyReplay::Recorded(recording) = &self.body {
            let body = lock(recording).replay_body()?;
            self.body = BodyReplay::Frozen(Box::new(body));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn prepare<B: Body<Data = Bytes>>(
        request: Request<B>,
        cap: usize,
    ) -> (
        Request<ReplayBody<B>>,
        Result<ReplayRequest<B>, NotReplayable>,
    ) {
        let (parts, body) = request.into_parts();
        let body = ReplayBody::for_request(&parts.headers, body, cap);
        let replay = ReplayRequest::new(&parts, &body);
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
        assert!(!replay.is_complete(), "nothing streamed yet");
        let sent = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(sent, payload);
        assert!(replay.is_complete());
        let again = replay
            .into_request(&name(), HeaderValue::from_static("Bearer b"))
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
        assert!(!replay.is_complete());
        assert!(replay
            .into_request(&name(), HeaderValue::from_static("x"))
            .is_err());
    }

    #[test]
    fn known_large_body_is_not_even_recorded() {
        let body = Full::new(Bytes::from(vec![0u8; 1024]));
        let (_, replay) = prepare(Request::post("/").body(body).unwrap(), 1023);
        assert!(replay.is_err());
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
        assert!(!replay.unwrap().is_complete());
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
            .into_request(&name(), HeaderValue::from_static("x"))
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
            .into_request(&name(), HeaderValue::from_static("x"))
            .unwrap();
        let collected = again.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "data");
    }

    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn data(bytes: &'static [u8]) -> Item {
        Ok(Frame::data(Bytes::from_static(bytes)))
    }

    fn checksum() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        trailers
    }

    /// A streamed body (no size hint, never says it ended) of `frames`.
    fn stream(frames: Vec<Item>) -> StreamBody<futures::stream::Iter<std::vec::IntoIter<Item>>> {
        StreamBody::new(futures::stream::iter(frames))
    }

    /// A body of `frames` that announces what the test needs: an exact size (whatever it
    /// yields), and whether it says it ended once its frames are out.
    struct Scripted {
        frames: VecDeque<Item>,
        exact: Option<u64>,
        says_end: bool,
    }

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Item>> {
            Poll::Ready(self.get_mut().frames.pop_front())
        }

        fn is_end_stream(&self) -> bool {
            self.says_end && self.frames.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            self.exact.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    fn sized(frames: Vec<Item>, len: u64) -> Scripted {
        Scripted {
            frames: frames.into(),
            exact: Some(len),
            says_end: false,
        }
    }

    /// The request as the auth layer wraps it, with `content-length` if given.
    fn wrap<B: Body<Data = Bytes>>(
        body: B,
        content_length: Option<&'static str>,
        cap: usize,
    ) -> (ReplayBody<B>, ReplayRequest<B>) {
        let mut builder = Request::post("/upload");
        if let Some(len) = content_length {
            builder = builder.header(http::header::CONTENT_LENGTH, len);
        }
        let (request, replay) = prepare(builder.body(body).unwrap(), cap);
        (request.into_body(), replay.unwrap())
    }

    /// Poll `n` frames, as a transport that stops on its own would, never asking for the end.
    async fn send_frames<B>(body: &mut ReplayBody<B>, n: usize)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        for _ in 0..n {
            body.frame().await.unwrap().unwrap();
        }
    }

    async fn replayed<B>(replay: ReplayRequest<B>) -> http_body_util::Collected<Bytes>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let request = replay
            .into_request(&name(), HeaderValue::from_static("x"))
            .unwrap();
        request.into_body().collect().await.unwrap()
    }

    #[tokio::test]
    async fn complete_when_the_body_returns_none() {
        let (mut first, replay) = wrap(stream(vec![data(b"ab"), data(b"cd")]), None, 1024);
        send_frames(&mut first, 2).await;
        assert!(!replay.is_complete(), "the body has not said it ended");
        assert!(first.frame().await.is_none());
        assert!(replay.is_complete());
        assert_eq!(replayed(replay).await.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn complete_when_the_body_says_it_ended_after_a_frame() {
        // No size known up front: only `is_end_stream` tells.
        let body = Scripted {
            frames: vec![data(b"ab"), data(b"cd")].into(),
            exact: None,
            says_end: true,
        };
        let (mut first, replay) = wrap(body, None, 1024);
        send_frames(&mut first, 1).await;
        assert!(!replay.is_complete());
        send_frames(&mut first, 1).await;
        assert!(replay.is_complete(), "no poll for the end needed");
        assert_eq!(replayed(replay).await.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn complete_after_trailers_without_another_poll() {
        let frames = vec![data(b"ab"), Ok(Frame::trailers(checksum()))];
        let (mut first, replay) = wrap(stream(frames), None, 1024);
        send_frames(&mut first, 1).await;
        assert!(!replay.is_complete());
        send_frames(&mut first, 1).await;
        assert!(replay.is_complete(), "trailers are the last frame");
        let again = replay
            .into_request(&name(), HeaderValue::from_static("x"))
            .unwrap();
        // Not exact: an HTTP/1 sender would frame it with content-length and drop the trailers.
        assert_eq!(again.body().size_hint().exact(), None);
        assert_eq!(again.body().size_hint().lower(), 2);
        let collected = again.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&checksum()));
        assert_eq!(collected.to_bytes(), "ab");
    }

    #[tokio::test]
    async fn complete_at_the_exact_size_hint() {
        let body = sized(vec![data(b"ab"), data(b"cd")], 4);
        let (mut first, replay) = wrap(body, None, 1024);
        send_frames(&mut first, 1).await;
        assert!(!replay.is_complete());
        send_frames(&mut first, 1).await;
        assert!(
            replay.is_complete(),
            "the size the body announced is reached"
        );
        assert_eq!(replayed(replay).await.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn complete_at_the_content_length_when_the_body_has_no_size() {
        let (mut first, replay) = wrap(stream(vec![data(b"ab"), data(b"cd")]), Some("4"), 1024);
        send_frames(&mut first, 1).await;
        assert!(!replay.is_complete());
        send_frames(&mut first, 1).await;
        assert!(
            replay.is_complete(),
            "hyper stops polling at content-length"
        );
        assert_eq!(replayed(replay).await.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn the_body_size_hint_wins_over_content_length() {
        let body = sized(vec![data(b"ab"), data(b"cd")], 4);
        let (mut first, replay) = wrap(body, Some("2"), 1024);
        send_frames(&mut first, 1).await;
        assert!(
            !replay.is_complete(),
            "the header is not trusted over the body"
        );
        send_frames(&mut first, 1).await;
        assert!(replay.is_complete());
    }

    #[tokio::test]
    async fn a_body_longer_than_announced_is_not_replayed() {
        // In one frame.
        let (mut first, replay) = wrap(stream(vec![data(b"abcd")]), Some("2"), 1024);
        send_frames(&mut first, 1).await;
        assert!(!replay.is_complete());
        assert!(first.try_clone().is_none());
        // After the announced length was reached.
        let (mut first, replay) = wrap(stream(vec![data(b"ab"), data(b"cd")]), Some("2"), 1024);
        send_frames(&mut first, 1).await;
        assert!(replay.is_complete());
        send_frames(&mut first, 1).await;
        assert!(!replay.is_complete(), "the body broke its length");
    }

    #[tokio::test]
    async fn trailers_after_the_announced_length_are_kept() {
        let frames = vec![data(b"ab"), Ok(Frame::trailers(checksum()))];
        let (mut first, replay) = wrap(stream(frames), Some("2"), 1024);
        send_frames(&mut first, 1).await;
        assert!(replay.is_complete());
        send_frames(&mut first, 1).await;
        let collected = replayed(replay).await;
        assert_eq!(collected.trailers(), Some(&checksum()));
        assert_eq!(collected.to_bytes(), "ab");
    }

    #[test]
    fn content_length_over_the_cap_is_not_recorded() {
        let body = stream(vec![data(b"abcd")]);
        let request = Request::post("/")
            .header(http::header::CONTENT_LENGTH, "4")
            .body(body)
            .unwrap();
        let (request, replay) = prepare(request, 3);
        assert!(replay.is_err());
        assert!(request.body().try_clone().is_none());
    }

    #[test]
    fn empty_bodies_are_clonable_without_a_recording() {
        let empty =
            ReplayBody::for_request(&HeaderMap::new(), http_body_util::Empty::<Bytes>::new(), 0);
        let full = ReplayBody::for_request(&HeaderMap::new(), Full::<Bytes>::default(), 0);
        let passed = ReplayBody::passthrough(http_body_util::Empty::<Bytes>::new());
        assert!(matches!(
            empty.kind,
            Kind::Streaming {
                keep: Keep::Empty,
                ..
            }
        ));
        assert!(matches!(
            full.kind,
            Kind::Streaming {
                keep: Keep::Empty,
                ..
            }
        ));
        for copy in [empty.try_clone(), passed.try_clone()] {
            let copy = copy.unwrap();
            assert!(copy.is_replayable());
            assert!(copy.is_end_stream());
        }
        assert!(full.try_clone().unwrap().is_end_stream());
        // A passed-through body with content keeps nothing.
        let passed = ReplayBody::passthrough(Full::new(Bytes::from_static(b"x")));
        assert!(passed.try_clone().is_none());
    }

    #[tokio::test]
    async fn a_replay_takes_over_the_rest_of_a_body_refused_mid_stream() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let body = StreamBody::new(tokio_stream_from(rx));
        let (mut first, replay) = prepare(Request::post("/").body(body).unwrap(), 1024);
        let mut replay = replay.unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"sent "))))
            .await
            .unwrap();
        first.body_mut().frame().await.unwrap().unwrap();
        assert!(!replay.is_complete());

        // The rejection arrives: the replay takes over, the first attempt sends no more.
        replay.freeze().unwrap();
        assert!(first.body_mut().frame().await.unwrap().is_err());
        tx.send(Ok(Frame::data(Bytes::from_static(b"and the rest"))))
            .await
            .unwrap();
        drop(tx);
        let again = replay
            .into_request(&name(), HeaderValue::from_static("x"))
            .unwrap();
        assert!(again.body().try_clone().is_none(), "the rest streams once");
        let resent = again.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(resent, "sent and the rest");
    }

    #[tokio::test]
    async fn the_reason_a_body_is_not_replayed_is_typed() {
        let chunks =
            (0..4).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![1u8; 100]))));
        let body = StreamBody::new(futures::stream::iter(chunks));
        let (first, replay) = prepare(Request::post("/").body(body).unwrap(), 250);
        first.into_body().collect().await.unwrap();
        assert_eq!(replay.unwrap().freeze(), Err(NotReplayable::TooLarge));

        let failing = StreamBody::new(futures::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("disk gone")),
        ]));
        let (first, replay) = prepare(Request::post("/").body(failing).unwrap(), 250);
        assert!(first.into_body().collect().await.is_err());
        assert_eq!(replay.unwrap().freeze(), Err(NotReplayable::BodyFailed));

        let known_large = Full::new(Bytes::from(vec![0u8; 1024]));
        let (_, replay) = prepare(Request::post("/").body(known_large).unwrap(), 1023);
        assert_eq!(replay.err(), Some(NotReplayable::TooLarge));
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
