//! A transport that answers every request with the fuzzer's status and body.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::service_fn;
use tower_auth_refresh::oauth2::{transport, HttpTransport};

pub fn answering(data: &[u8]) -> HttpTransport {
    let (status, body) = match data.split_first() {
        Some((status, body)) => (200 + u16::from(*status) % 400, Bytes::copy_from_slice(body)),
        None => (200, Bytes::new()),
    };
    transport(service_fn(move |_: Request<Full<Bytes>>| {
        let body = body.clone();
        async move {
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            Ok::<_, Infallible>(response)
        }
    }))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}
