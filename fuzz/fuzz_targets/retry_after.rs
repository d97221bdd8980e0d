//! `Retry-After` on a 429: any header value gives a bounded wait or a hand-back, never a panic.
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Empty;
use libfuzzer_sys::fuzz_target;
use tower::retry::Policy;
use tower::BoxError;
use tower_auth_refresh::retry::RetryPolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let _guard = runtime.enter();
    let mut policy = RetryPolicy::builder()
        .max_retry_after(Duration::from_secs(180))
        .build();
    let request = Request::get("/").body(Empty::<Bytes>::new()).expect("a request");
    let mut request =
        Policy::<_, Response<()>, BoxError>::clone_request(&mut policy, &request).expect("a clone");
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    response.headers_mut().insert("retry-after", value);
    let mut result: Result<Response<()>, BoxError> = Ok(response);
    if let Some(sleep) = policy.retry(&mut request, &mut result) {
        let wait = sleep.deadline() - tokio::time::Instant::now();
        assert!(wait <= Duration::from_secs(180), "{wait:?}");
    }
});
