//! The response future of [`AuthService`](crate::AuthService).
//!
//! Written by hand, as tower's own futures are, so the common case (token ready, response not a
//! rejection) is one poll of the inner future with no allocation and no boxing.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::cache::{Acquire, RefreshWait, Rejection};
use crate::error::AuthError;
use crate::inner_body::{IntoInnerBody, Unchanged};
use crate::layer::{AuthSettings, Refusal};
use crate::proof::{self, Sent};
use crate::replay::{NotReplayable, ReplayBody, ReplayRequest};

pin_project! {
    /// Response future of [`AuthService`](crate::AuthService).
    pub struct ResponseFuture<S, B, I = Unchanged>
    where
        I: IntoInnerBody<B>,
        S: Service<Request<I::Body>>,
    {
        #[pin]
        state: State<S::Future, I::Body>,
        // The inner service, kept for the replay; it is polled ready again before it is called.
        service: Option<S>,
        replay: Result<ReplayRequest<B>, NotReplayable>,
        // The token generation the current attempt was sent with.
        generation: u64,
        settings: Option<Arc<AuthSettings>>,
        // Turns the replay's `ReplayBody<B>` into the inner service's body type.
        inner_body: I,
        // The DPoP proof of the current attempt, if the layer sends them.
        dpop: Option<Box<Sent>>,
        // Each kind of replay happens at most once: one for a new token, one for a new DPoP
        // nonce (which says nothing about the token).
        token_replayed: bool,
        nonce_replayed: bool,
        _body: PhantomData<fn(B)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        // The first attempt waits for a token.
        // Boxed: only the slow path needs it, and it would double the size of every future.
        WaitToken {
            wait: RefreshWait,
            request: Option<Box<Request<R>>>,
        },
        First {
            #[pin]
            future: F,
        },
        // The token was rejected; the replay waits for the new one.
        WaitReplayToken {
            wait: RefreshWait,
        },
        // The replay waits for the inner service to be ready.
        ReplayReady {
            credential: Option<HeaderValue>,
        },
        Replay {
            #[pin]
            future: F,
        },
        Failed {
            error: Option<AuthError>,
        },
    }
}

impl<S, B, I> ResponseFuture<S, B, I>
where
    I: IntoInnerBody<B>,
    S: Service<Request<I::Body>>,
{
    /// A request sent as it is, with no token of ours and no replay: one the caller
    /// authorized itself, or one for an origin the token is not meant for.
    pub(crate) fn passthrough(
        inner: &mut S,
        inner_body: &I,
        parts: http::request::Parts,
        body: B,
    ) -> Self
    where
        B: http_body::Body,
    {
        let body = inner_body.convert(ReplayBody::passthrough(body));
        let future = inner.call(Request::from_parts(parts, body));
        let replay = Err(NotReplayable::Refused);
        Self::new(
            State::First { future },
            None,
            replay,
            0,
            None,
            inner_body.clone(),
        )
    }

    /// The first attempt is under way. Without `replay`, a rejection still invalidates the
    /// token, so the next request gets a new one.
    pub(crate) fn first_attempt(
        future: S::Future,
        service: Option<S>,
        replay: Result<ReplayRequest<B>, NotReplayable>,
        generation: u64,
        settings: Arc<AuthSettings>,
        inner_body: I,
        dpop: Option<Box<Sent>>,
    ) -> Self {
        let mut future = Self::new(
            State::First { future },
            service,
            replay,
            generation,
            Some(settings),
            inner_body,
        );
        future.dpop = dpop;
        future
    }

    pub(crate) fn waiting_for_token(
        wait: RefreshWait,
        request: Request<I::Body>,
        service: S,
        replay: Result<ReplayRequest<B>, NotReplayable>,
        settings: Arc<AuthSettings>,
        inner_body: I,
    ) -> Self {
        let state = State::WaitToken {
            wait,
            request: Some(Box::new(request)),
        };
        Self::new(state, Some(service), replay, 0, Some(settings), inner_body)
    }

    pub(crate) fn failed(error: AuthError, inner_body: I) -> Self {
        let state = State::Failed { error: Some(error) };
        let replay = Err(NotReplayable::Refused);
        Self::new(state, None, replay, 0, None, inner_body)
    }

    fn new(
        state: State<S::Future, I::Body>,
        service: Option<S>,
        replay: Result<ReplayRequest<B>, NotReplayable>,
        generation: u64,
        settings: Option<Arc<AuthSettings>>,
        inner_body: I,
    ) -> Self {
        Self {
            state,
            service,
            replay,
            generation,
            settings,
            inner_body,
            dpop: None,
            token_replayed: false,
            nonce_replayed: false,
            _body: PhantomData,
        }
    }
}

impl<S, B, I, ResBody> Future for ResponseFuture<S, B, I>
where
    I: IntoInnerBody<B>,
    S: Service<Request<I::Body>, Response = Response<ResBody>>,
    S::Error: Into<tower::BoxError>,
{
    type Output = Result<Response<ResBody>, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // Both attempts end here with a response; `first` says whether a replay for a new
            // token is still possible (the first attempt, or a replay made for a nonce).
            let (response, first) = match this.state.as_mut().project() {
                StateProj::WaitToken { wait, request } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    let (Some(request), Some(service), Some(settings)) = (
                        request.take(),
                        this.service.as_mut(),
                        this.settings.as_ref(),
                    ) else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let (mut parts, body) = request.into_parts();
                    parts
                        .headers
                        .insert(settings.header_name.clone(), credential.header);
                    *this.generation = credential.generation;
                    *this.dpop =
                        proof::attach(settings, &parts.method, &parts.uri, &mut parts.headers)?;
                    let request = Request::from_parts(parts, body);
                    // `poll_ready` was answered before `call`; the service is still reserved.
                    let future = service.call(request);
                    this.state.set(State::First { future });
                    continue;
                }
                StateProj::First { future } => (ready!(future.poll(cx)).map_err(Into::into)?, true),
                StateProj::WaitReplayToken { wait } => {
                    let credential = ready!(Pin::new(wait).poll(cx))?;
                    *this.generation = credential.generation;
                    this.state.set(State::ReplayReady {
                        credential: Some(credential.header),
                    });
                    continue;
                }
                StateProj::ReplayReady { credential } => {
                    let Some(service) = this.service.as_mut() else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    ready!(service.poll_ready(cx)).map_err(Into::into)?;
                    let replay = std::mem::replace(this.replay, Err(NotReplayable::Refused));
                    let (Some(credential), Ok(replay), Some(settings)) =
                        (credential.take(), replay, this.settings.as_ref())
                    else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    // The body was frozen when the rejection arrived, and the head was
                    // captured from a valid request: restoring them does not fail.
                    let request = replay.into_request(&settings.header_name, credential)?;
                    let (mut parts, body) = request.into_parts();
                    *this.dpop =
                        proof::attach(settings, &parts.method, &parts.uri, &mut parts.headers)?;
                    // With DPoP, a replay for one reason may still be followed by the other:
                    // keep what that one needs (a copy of a replay body is a reference count).
                    if this.dpop.is_some() && !(*this.token_replayed && *this.nonce_replayed) {
                        *this.replay = ReplayRequest::new(&parts, &body);
                    }
                    let request = Request::from_parts(parts, body);
                    settings.cache.record_replay();
                    tracing::debug!("token or nonce rejected; replaying the request");
                    let future = service.call(request.map(|body| this.inner_body.convert(body)));
                    if *this.token_replayed {
                        this.state.set(State::Replay { future });
                    } else {
                        // Replayed for a nonce: a token rejection may still earn its replay.
                        this.state.set(State::First { future });
                    }
                    continue;
                }
                StateProj::Replay { future } => {
                    (ready!(future.poll(cx)).map_err(Into::into)?, false)
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => polled_after_completion(),
                    }));
                }
            };
            let Some(settings) = this.settings.as_ref() else {
                return Poll::Ready(Ok(response));
            };
            // A DPoP server that wants a new nonce refused the proof, not the token: replay
            // with the same token.
            let for_nonce = proof::wants_nonce_replay(
                settings,
                this.dpop.as_deref(),
                *this.nonce_replayed,
                response.status(),
                response.headers(),
            );
            if for_nonce {
                *this.nonce_replayed = true;
            } else if first {
                let Some(refusal) = settings.refusal(response.status(), response.headers()) else {
                    return Poll::Ready(Ok(response));
                };
                // Only now are the challenges read: one decision, whatever they ask for.
                let rejection = settings.cache.answer_refusal(
                    *this.generation,
                    response.headers(),
                    refusal == Refusal::Token,
                    settings.step_up.as_deref(),
                );
                match rejection {
                    // Not worth a new token (`insufficient_scope` without a step-up).
                    None => return Poll::Ready(Ok(response)),
                    // Not an expiry: a new token would be refused too.
                    Some(Rejection::Repeated) => return Poll::Ready(Ok(response)),
                    Some(_) => {}
                }
                *this.token_replayed = true;
            } else {
                // The replay with a new token: its answer goes back whatever it says.
                if settings
                    .refusal(response.status(), response.headers())
                    .is_none()
                {
                    settings.cache.replay_accepted(*this.generation);
                }
                return Poll::Ready(Ok(response));
            }
            let service_kept = this.service.is_some();
            match start_replay(this.replay, service_kept, settings, response.status()) {
                Ok(Some(next)) => {
                    // Free the connection of the refused attempt before the replay.
                    drop(response);
                    this.state.set(next.into_state(this.generation));
                }
                Ok(None) => return Poll::Ready(Ok(response)),
                Err(error) => return Poll::Ready(Err(error.into())),
            }
        }
    }
}

/// How a replay starts: with the token at hand, or after waiting for one.
enum NextReplay {
    Ready(crate::cache::Credential),
    Wait(RefreshWait),
}

impl NextReplay {
    fn into_state<F, R>(self, generation: &mut u64) -> State<F, R> {
        match self {
            NextReplay::Ready(credential) => {
                *generation = credential.generation;
                State::ReplayReady {
                    credential: Some(credential.header),
                }
            }
            NextReplay::Wait(wait) => State::WaitReplayToken { wait },
        }
    }
}

/// Freeze the body for a replay and get its token. `Ok(None)`: the request cannot be replayed
/// (counted, and logged); the response goes back to the caller.
fn start_replay<B>(
    replay: &mut Result<ReplayRequest<B>, NotReplayable>,
    service_kept: bool,
    settings: &AuthSettings,
    status: http::StatusCode,
) -> Result<Option<NextReplay>, AuthError> {
    let verdict = match replay.as_mut() {
        Ok(replay) if service_kept => replay.freeze(),
        Ok(_) => Err(NotReplayable::Refused),
        Err(reason) => Err(*reason),
    };
    if let Err(reason) = verdict {
        settings.cache.record_not_replayed(reason);
        tracing::debug!(
            %status,
            %reason,
            "request refused; not replayed, returning the response"
        );
        return Ok(None);
    }
    match settings.cache.acquire() {
        Acquire::Ready(credential) => Ok(Some(NextReplay::Ready(credential))),
        Acquire::Wait(wait) => Ok(Some(NextReplay::Wait(wait))),
        Acquire::Failed(error) => Err(error),
    }
}

fn polled_after_completion() -> tower::BoxError {
    "AuthService response future polled after it completed".into()
}
