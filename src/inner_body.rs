//! The body type the inner service receives.
//!
//! [`AuthService`](crate::AuthService) has to keep what a request streams so that it can send it
//! again after a 401, so the inner service receives a [`ReplayBody<B>`] by default. A client
//! whose body type the application has already fixed (a hyper-util `Client<_, BoxBody<..>>`, a
//! tonic `Channel`) does not accept that type, and tower only says that some trait bound "was not
//! satisfied". Name the conversion once instead, and the layer hands the inner service the body
//! type it accepts:
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::combinators::BoxBody;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::ServiceBuilder;
//! use tower_auth_refresh::{inner_body::Boxed, AuthLayer, StaticToken, Token};
//!
//! // The application's client, with its body type fixed long ago.
//! let http: Client<_, BoxBody<Bytes, tower::BoxError>> =
//!     Client::builder(TokioExecutor::new()).build_http();
//! let auth = AuthLayer::builder(StaticToken::new(Token::new("secret")))
//!     .inner_body(Boxed)
//!     .build();
//! let client = ServiceBuilder::new().layer(auth).service(http);
//! # fn sends<S: tower::Service<http::Request<Full<Bytes>>>>(_: &S) {}
//! sends(&client); // callers may send any body type: `Full`, `Empty`, a stream, ...
//! ```
//!
//! The conversion is one allocation per request for [`Boxed`] and [`UnsyncBoxed`], and nothing
//! for [`Unchanged`]. Any `Fn(ReplayBody<B>) -> T` closure is a conversion too, for body types of
//! your own (`|body: ReplayBody<MyBody>| MyClientBody::new(body)`).
//!
//! A retry layer below the auth layer must see the [`ReplayBody`] to send it again: then leave
//! the auth layer [`Unchanged`] and convert below the retry with an [`InnerBodyLayer`].

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::BodyExt;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::replay::ReplayBody;

/// How [`ReplayBody<B>`] becomes the body type of the inner service. See the
/// [module docs](self).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot turn `ReplayBody<{B}>` into a request body",
    note = "use `inner_body::Unchanged`, `inner_body::Boxed`, `inner_body::UnsyncBoxed`, or a closure `|body: ReplayBody<{B}>| ...`"
)]
pub trait IntoInnerBody<B>: Clone {
    /// The body type the inner service accepts.
    type Body;

    /// Convert the body of one request (a first attempt or its replay).
    fn convert(&self, body: ReplayBody<B>) -> Self::Body;
}

/// The inner service receives [`ReplayBody<B>`]: the default, and free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unchanged;

impl<B> IntoInnerBody<B> for Unchanged {
    type Body = ReplayBody<B>;

    fn convert(&self, body: ReplayBody<B>) -> ReplayBody<B> {
        body
    }
}

/// The inner service receives `BoxBody<Bytes, BoxError>` (`http_body_util::combinators`), the
/// usual fixed body type of a hyper-util client that is shared across an application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boxed;

impl<B> IntoInnerBody<B> for Boxed
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Body = BoxBody<Bytes, BoxError>;

    fn convert(&self, body: ReplayBody<B>) -> Self::Body {
        body.boxed()
    }
}

/// The inner service receives `UnsyncBoxBody<Bytes, BoxError>`, for request bodies that are not
/// `Sync` (many streams are not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnsyncBoxed;

impl<B> IntoInnerBody<B> for UnsyncBoxed
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Body = UnsyncBoxBody<Bytes, BoxError>;

    fn convert(&self, body: ReplayBody<B>) -> Self::Body {
        body.boxed_unsync()
    }
}

impl<B, F, T> IntoInnerBody<B> for F
where
    F: Fn(ReplayBody<B>) -> T + Clone,
{
    type Body = T;

    fn convert(&self, body: ReplayBody<B>) -> T {
        self(body)
    }
}

/// Converts `Request<ReplayBody<B>>` with an [`IntoInnerBody`] conversion: for placing the
/// conversion below a retry layer that sits below the auth layer
/// (`AuthLayer -> RetryLayer -> InnerBodyLayer -> client`), so that the retry still sees a body it
/// can send again.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http_body_util::combinators::BoxBody;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use tower::{retry::RetryLayer, ServiceBuilder};
/// use tower_auth_refresh::inner_body::{Boxed, InnerBodyLayer};
/// use tower_auth_refresh::{retry::RetryPolicy, AuthLayer, StaticToken, Token};
///
/// let http: Client<_, BoxBody<Bytes, tower::BoxError>> =
///     Client::builder(TokioExecutor::new()).build_http();
/// let client = ServiceBuilder::new()
///     .layer(AuthLayer::new(StaticToken::new(Token::new("secret"))))
///     .layer(RetryLayer::new(RetryPolicy::new()))
///     .layer(InnerBodyLayer::new(Boxed))
///     .service(http);
/// # drop(client);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct InnerBodyLayer<C> {
    conversion: C,
}

impl<C> InnerBodyLayer<C> {
    /// Convert request bodies with `conversion`.
    pub fn new(conversion: C) -> Self {
        Self { conversion }
    }
}

impl<S, C: Clone> Layer<S> for InnerBodyLayer<C> {
    type Service = InnerBodyService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        InnerBodyService {
            inner,
            conversion: self.conversion.clone(),
        }
    }
}

/// The service of an [`InnerBodyLayer`].
#[derive(Clone)]
pub struct InnerBodyService<S, C> {
    inner: S,
    conversion: C,
}

impl<S, C, B> Service<Request<ReplayBody<B>>> for InnerBodyService<S, C>
where
    S: Service<Request<C::Body>>,
    C: IntoInnerBody<B>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReplayBody<B>>) -> Self::Future {
        let conversion = &self.conversion;
        self.inner
            .call(request.map(|body| conversion.convert(body)))
    }
}

impl<S: fmt::Debug, C> fmt::Debug for InnerBodyService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InnerBodyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
