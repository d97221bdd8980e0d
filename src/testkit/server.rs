//! What the test kit's servers share: a loopback HTTP/1 and HTTP/2 server and the parsing of
//! what reaches it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::oauth2::form;

/// Serve `handler` over HTTP/1 and HTTP/2 on a fresh loopback port, until the runtime ends.
pub(crate) async fn serve_streaming<H, F>(handler: H) -> std::io::Result<SocketAddr>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(handler);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// [`serve_streaming`], with each body read (up to 1 MiB) before the handler sees the request.
pub(crate) async fn serve<H>(handler: H) -> std::io::Result<SocketAddr>
where
    H: Fn(Request<Bytes>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    serve_streaming(move |request: Request<Incoming>| {
        let handler = handler.clone();
        async move {
            let (parts, body) = request.into_parts();
            let response = match Limited::new(body, 1 << 20).collect().await {
                Ok(body) => handler(Request::from_parts(parts, body.to_bytes())),
                Err(_) => json(StatusCode::BAD_REQUEST, r#"{"error":"invalid_request"}"#),
            };
            Ok::<_, Infallible>(response)
        }
    })
    .await
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A 401 with the RFC 6750 challenge for a refused bearer token.
pub(crate) fn invalid_token() -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        r#"{"error":"invalid_token","error_description":"the token is expired or unknown"}"#,
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer error="invalid_token""#),
    );
    response
}

/// A 429 with `Retry-After: seconds`.
pub(crate) fn too_many_requests(seconds: u64) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        r#"{"message":"Rate limit exceeded","code":"too.many.requests","status":429}"#,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// Decode one `application/x-www-form-urlencoded` component.
fn urldecode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `name` in a form body or a query string.
pub(crate) fn field(pairs: &str, name: &str) -> Option<String> {
    pairs
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| urldecode(key) == name)
        .map(|(_, value)| urldecode(value))
}

/// `field` of a request's query, parsed as a number.
pub(crate) fn query_number<B>(request: &Request<B>, name: &str) -> Option<usize> {
    field(request.uri().query()?, name)?.parse().ok()
}

/// The client id and secret of an HTTP Basic `Authorization` header (RFC 6749 section 2.3.1:
/// both form-encoded inside).
pub(crate) fn basic_credentials<B>(request: &Request<B>) -> Option<(String, String)> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let url_safe = encoded.trim().replace('+', "-").replace('/', "_");
    let decoded = String::from_utf8(form::base64url_decode(&url_safe)?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((urldecode(id), urldecode(secret)))
}

/// The bearer token of a request, if any.
pub(crate) fn bearer<B>(request: &Request<B>) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// An unsigned JWT (`alg: none`) with these claims: what a client may read, never trust.
pub(crate) fn unsigned_jwt(claims: &serde_json::Value) -> String {
    let url_safe = |bytes: &[u8]| {
        form::base64(bytes)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    };
    format!(
        "{}.{}.",
        url_safe(br#"{"alg":"none","typ":"JWT"}"#),
        url_safe(claims.to_string().as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_and_basic_credentials_round_trip() {
        assert_eq!(
            field("grant_type=password&username=a%40b+c", "username").as_deref(),
            Some("a@b c")
        );
        assert_eq!(field("a=1", "b"), None);
        assert_eq!(urldecode("100%"), "100%");
        let encoded = form::base64(b"my+id:s%40cret");
        let request = Request::get("/")
            .header(header::AUTHORIZATION, format!("Basic {encoded}"))
            .body(())
            .unwrap();
        assert_eq!(
            basic_credentials(&request),
            Some(("my id".to_owned(), "s@cret".to_owned()))
        );
    }
}
