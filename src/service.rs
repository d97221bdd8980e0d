//! [`AuthService`]: adds the token, and replays once when the API rejects it.

use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::Entry;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::cache::{Acquire, TokenView};
use crate::future::ResponseFuture;
use crate::inner_body::{IntoInnerBody, Unchanged};
use crate::layer::{AuthSettings, ExistingAuthorization};
use crate::origin::Origin;
use crate::proof;
use crate::replay::{NotReplayable, ReplayBody, ReplayRequest};

/// The service an [`AuthLayer`](crate::AuthLayer) builds. See the layer for the behaviour.
///
/// `poll_ready` is the inner service's: a replay waits for the inner service to be ready again,
/// so rate-limit and concurrency-limit layers below keep their promise on replays too.
pub struct AuthService<S, I = Unchanged> {
    inner: S,
    settings: Arc<AuthSettings>,
    inner_body: I,
    // This service's copy of the cache's current token, cheaper to check than the cache itself
    // on every request; `None` for a service built for a single call.
    view: Option<TokenView>,
}

impl<S, I> AuthService<S, I> {
    pub(crate) fn new(inner: S, settings: Arc<AuthSettings>, inner_body: I) -> Self {
        let view = Some(settings.cache.view());
        Self {
            inner,
            settings,
            inner_body,
            view,
        }
    }

    /// A service for one call (a keyed layer builds one per request): a view of the token
    /// would cost more to make than it saves.
    pub(crate) fn for_one_call(inner: S, settings: Arc<AuthSettings>, inner_body: I) -> Self {
        Self {
            inner,
            settings,
            inner_body,
            view: None,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, I: Clone> Clone for AuthService<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            settings: self.settings.clone(),
            inner_body: self.inner_body.clone(),
            view: self.view.clone(),
        }
    }
}

impl<S: fmt::Debug, I> fmt::Debug for AuthService<S, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService")
            .field("inner", &self.inner)
            .field("settings", &self.settings)
            .finish()
    }
}

impl<S, I, B, ResBody> Service<Request<B>> for AuthService<S, I>
where
    I: IntoInnerBody<B>,
    S: Service<Request<I::Body>, Response = Response<ResBody>> + Clone,
    S::Error: Into<tower::BoxError>,
    B: Body<Data = Bytes>,
{
    type Response = Response<ResBody>;
    type Error = tower::BoxError;
    type Future = ResponseFuture<S, B, I>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let settings = &self.settings;
        let (mut parts, body) = request.into_parts();

        // A token goes only to the origins it is meant for.
        if let Some(origins) = &settings.origins {
            let allowed = Origin::of(&parts.uri).is_some_and(|origin| origins.contains(&origin));
            if !allowed {
                return ResponseFuture::passthrough(&mut self.inner, &self.inner_body, parts, body);
            }
        }

        // One lookup decides both whether the caller brought its own credential and where ours
        // goes.
        let acquired = match parts.headers.entry(&settings.header_name) {
            Entry::Occupied(_) if settings.existing == ExistingAuthorization::Keep => {
                return ResponseFuture::passthrough(&mut self.inner, &self.inner_body, parts, body);
            }
            entry => match acquire(settings, &mut self.view) {
                Acquire::Ready(credential) => {
                    match entry {
                        Entry::Occupied(mut occupied) => {
                            occupied.insert(credential.header);
                        }
                        Entry::Vacant(vacant) => {
                            vacant.insert(credential.header);
                        }
                    }
                    Ok(credential.generation)
                }
                Acquire::Wait(wait) => Err(wait),
                // The ready inner service stays here, reserved for the next call.
                Acquire::Failed(error) => {
                    return ResponseFuture::failed(error, self.inner_body.clone())
                }
            },
        };

        // A DPoP proof signs the request as it goes out, credential included.
        let dpop = match &acquired {
            Ok(_) => match proof::attach(settings, &parts.method, &parts.uri, &mut parts.headers) {
                Ok(sent) => sent,
                Err(error) => return ResponseFuture::failed(error, self.inner_body.clone()),
            },
            Err(_) => None,
        };

        // Asked before the body is wrapped: a refused request keeps no copy of its head.
        let replay_allowed = settings
            .replay_if
            .as_ref()
            .is_none_or(|allow| allow(&parts));
        // Recorded even when `replay_when` refuses the 401 replay: a retry layer below sends
        // the body again through the same recording. A `Full` body costs one `Bytes` clone.
        let body = ReplayBody::for_request(&parts.headers, body, settings.max_replay_body);
        let replay = if replay_allowed {
            ReplayRequest::new(&parts, &body)
        } else {
            Err(NotReplayable::Refused)
        };
        let settings = self.settings.clone();
        let inner_body = self.inner_body.clone();
        let body = inner_body.convert(body);

        let generation = match acquired {
            Ok(generation) => generation,
            Err(wait) => {
                return ResponseFuture::waiting_for_token(
                    wait,
                    Request::from_parts(parts, body),
                    self.take_ready_service(),
                    replay,
                    settings,
                    inner_body,
                )
            }
        };
        // The request is built where it is handed over, so that it is not moved once more.
        if replay.is_err() {
            let future = self.inner.call(Request::from_parts(parts, body));
            return ResponseFuture::first_attempt(
                future, None, replay, generation, settings, inner_body, dpop,
            );
        }
        // A replay needs the service again: keep the one that is ready for this call and leave
        // a fresh clone behind (tower's `mem::replace` idiom).
        let mut service = self.take_ready_service();
        let future = service.call(Request::from_parts(parts, body));
        ResponseFuture::first_attempt(
            future,
            Some(service),
            replay,
            generation,
            settings,
            inner_body,
            dpop,
        )
    }
}

/// The hot path reads the service's own view of the token when it has one.
fn acquire(settings: &AuthSettings, view: &mut Option<TokenView>) -> Acquire {
    match view {
        Some(view) => settings.cache.acquire_with(view),
        None => settings.cache.acquire(),
    }
}

impl<S: Clone, I> AuthService<S, I> {
    fn take_ready_service(&mut self) -> S {
        let clone = self.inner.clone();
        mem::replace(&mut self.inner, clone)
    }
}
