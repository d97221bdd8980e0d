//! Test-only helpers over the crate's test kit (`tower_auth_refresh::testkit`, feature
//! `testkit`): the identity provider, the API and their helpers are re-exported from there, so
//! the tests, the batch example and users' own tests run against the same servers.
#![allow(dead_code, unused_imports)]

use std::sync::{Arc, Mutex};

use http::Response;
use http_body_util::BodyExt;

pub use tower_auth_refresh::testkit::{
    client, client_h2, http_provider, http_provider_at, parse_token_response, Api, ApiCounters,
    IdentityProvider, IdpMode, TokenRegistry,
};

/// The token sources' transport for the loopback servers: hyper-util over plain HTTP.
pub fn http_transport() -> tower_auth_refresh::oauth2::HttpTransport {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    tower_auth_refresh::oauth2::transport(
        Client::builder(TokioExecutor::new()).build_http::<http_body_util::Full<bytes::Bytes>>(),
    )
}

/// Read a response body to a string.
pub async fn body_string<B>(response: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Freezes tokio's paused clock until the guard is dropped: time moves only when the test calls
/// `tokio::time::advance`.
///
/// With `start_paused`, tokio jumps the clock to the next timer whenever the runtime parks, even
/// while a socket read is in flight, so a 30 s refresh timeout would fire while the identity
/// provider's answer is still crossing loopback. A running blocking task inhibits that jump; this
/// guard keeps one running.
pub struct ManualClock {
    _release: std::sync::mpsc::Sender<()>,
}

pub fn manual_clock() -> ManualClock {
    let (release, released) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = released.recv();
    });
    ManualClock { _release: release }
}

/// Yield until `condition` holds: lets loopback IO progress without moving the clock.
pub async fn until(mut condition: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

/// Everything a tracing subscriber writes, for tests that check no secret is ever logged.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Capture every event and span at TRACE level on this thread until the guard is dropped.
///
/// `tracing` caches each callsite's interest process-wide, computed when the callsite is first
/// hit. With one dispatcher registered, that is computed from the hitting thread's own
/// subscriber: a parallel test with none would cache "never" and blind this capture to the
/// crate's events. A second, inert dispatcher kept alive with the guard makes the cache ask
/// every live dispatcher instead (tracing-core's `Rebuilder::All`), this capture included.
pub fn capture_traces() -> (Captured, TraceGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    let anchor = tracing::Dispatch::new(tracing_subscriber::registry());
    let default = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (
        captured,
        TraceGuard {
            _default: default,
            _anchor: anchor,
        },
    )
}

/// Keeps a [`capture_traces`] capture installed.
pub struct TraceGuard {
    _default: tracing::subscriber::DefaultGuard,
    _anchor: tracing::Dispatch,
}
