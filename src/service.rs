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

use crate::cache::Acquire;
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
}

impl<S, I> AuthService<S, I> {
    pub(crate) fn new(inner: S, settings: Arc<AuthSettings>, inner_body: I) -> Self {
        Self {
            inner,
            settings,
            inner_body,
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
            entry => match settings.cache.acquire() {
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

        // Recorded even when `replay_when` refuses the 401 replay: a retry layer below sends
        // the body again through the same recording. A `Full` body costs one `Bytes` clone.
        let body = ReplayBody::for_request(&parts.headers, body, settings.max_replay_body);
        let replay_allowed = settings
            .replay_if
            .as_ref()
            .is_none_or(|allow| allow(&parts));
        let replay = if replay_allowed {
            ReplayRequest::new(&parts, &body)
        } else {
            Err(NotReplayable::Refused)
        };
        let request = Request::from_parts(parts, self.inner_body.convert(body));

        match acquired {
            Ok(generation) => {
                // A replay needs the service again: keep the one that is ready for this call
                // and leave a fresh clone behind (tower's `mem::replace` idiom).
                let mut service = replay.is_ok().then(|| self.take_ready_service());
                let future = match service.as_mut() {
                    Some(service) => service.call(request),
                    None => self.inner.call(request),
                };
                ResponseFuture::first_attempt(
                    future,
                    service,
                    replay,
                    generation,
                    self.settings.clone(),
                    self.inner_body.clone(),
                    dpop,
                )
            }
            Err(wait) => ResponseFuture::waiting_for_token(
                wait,
                request,
                self.take_ready_service(),
                replay,
                self.settings.clone(),
                self.inner_body.clone(),
            ),
        }
    }
}

impl<S: Clone, I> AuthService<S, I> {
    fn take_ready_service(&mut self) -> S {
        let clone = self.inner.clone();
        mem::replace(&mut self.inner, clone)
    }
}
