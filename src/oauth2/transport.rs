//! How token requests reach the identity provider: any tower service.
//!
//! The default is a hyper-util client with rustls and the webpki roots (cargo feature `rustls`,
//! on by default). Anything else that speaks `http::Request<Full<Bytes>>`, a client with a proxy
//! or a custom CA, a test server, plugs in through [`transport`].

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{LOCATION, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};

use crate::error::{displayable_url, AuthError};

/// The largest token endpoint or metadata answer read, so a hostile server cannot make us
/// buffer without bound.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A type-erased HTTP client for token and metadata requests.
pub type HttpTransport =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<UnsyncBoxBody<Bytes, BoxError>>, BoxError>;

/// Use any tower HTTP service as the transport for token requests.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use tower_auth_refresh::oauth2::transport;
///
/// let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let transport = transport(http);
/// # drop(transport);
/// ```
pub fn transport<S, B>(service: S) -> HttpTransport
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(
        service
            .map_response(|response: Response<B>| {
                response.map(|body| body.map_err(Into::into).boxed_unsync())
            })
            .map_err(Into::into),
    )
}

/// The default transport: hyper-util's client over rustls with the webpki roots, HTTP/1.1 and
/// HTTP/2. It never follows redirects.
#[cfg(feature = "rustls")]
pub fn default_transport() -> HttpTransport {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    transport(Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https))
}

/// An answer read to the end (up to [`MAX_RESPONSE_BYTES`]).
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    /// Kept for what a caller learns from them: a DPoP server's next nonce (`DPoP-Nonce`).
    #[cfg_attr(not(feature = "dpop"), allow(dead_code))]
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Send `request` and read the answer. Redirects and throttling are errors here, for every
/// caller: a redirect would carry credentials elsewhere, and a 429/503 says when to come back.
pub(crate) async fn send(
    transport: &HttpTransport,
    request: Request<Full<Bytes>>,
) -> Result<Answer, AuthError> {
    let response = transport
        .clone()
        .oneshot(request)
        .await
        .map_err(|error: BoxError| AuthError::transport(error))?;
    let status = response.status();
    if status.is_redirection() {
        return Err(AuthError::Redirected {
            status,
            location: response
                .headers()
                .get(LOCATION)
                .and_then(|value| value.to_str().ok())
                .map(displayable_url),
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| crate::retry_after::parse(value, SystemTime::now()));
        return Err(AuthError::Throttled {
            status,
            retry_after,
        });
    }
    let (parts, mut body) = response.into_parts();
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error: BoxError| AuthError::transport(error))?;
        if let Ok(data) = frame.into_data() {
            if read.len() + data.len() > MAX_RESPONSE_BYTES {
                return Err(AuthError::MalformedResponse {
                    status,
                    excerpt: format!("the answer is larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            read.extend_from_slice(&data);
        }
    }
    let body = Bytes::from(read);
    Ok(Answer {
        status,
        headers: parts.headers,
        body,
    })
}
