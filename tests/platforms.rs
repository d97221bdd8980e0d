//! NICE CXone and Genesys Cloud as they really behave, against the loopback emulators of
//! `tower_auth_refresh::testkit`: real hyper servers, real hyper-util clients, exact counts.
//!
//! Tests on tokio's paused clock use [`support::manual_clock`]: time moves only on `advance`.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::advance;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::{
    self, discover, genesys, nice_cxone, ClientAuth, ClientCredentials, HttpTransport,
};
use tower_auth_refresh::testkit::cxone::{Cxone, CxoneConfig, CxoneCounts};
use tower_auth_refresh::testkit::genesys::{Genesys, GenesysConfig, GenesysCounts};
use tower_auth_refresh::{AuthLayer, ErrorCode};

use support::{body_string, client, manual_clock};

fn http_transport() -> HttpTransport {
    oauth2::transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
}

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

async fn json(response: Response<hyper::body::Incoming>) -> Value {
    assert_eq!(response.status(), StatusCode::OK);
    serde_json::from_str(&body_string(response).await).unwrap()
}

// --- NICE CXone --------------------------------------------------------------------------------

/// Discovery, the access-key provider, and the layer over it, as a CXone batch starts.
async fn cxone_layer(cxone: &Cxone) -> (AuthLayer, oauth2::ProviderMetadata, HttpTransport) {
    let transport = http_transport();
    let metadata = discover(&cxone.issuer(), &transport, false).await.unwrap();
    let config = cxone.config();
    let provider = nice_cxone::access_key_grant(
        &metadata,
        config.client_id.clone(),
        config.client_secret.clone(),
        nice_cxone::AccessKey::new(
            config.access_key_id.clone(),
            config.access_key_secret.clone(),
        ),
    )
    .transport(transport.clone())
    .build()
    .unwrap();
    (AuthLayer::new(provider), metadata, transport)
}

#[tokio::test(start_paused = true)]
async fn cxone_batch_discovers_its_api_and_crosses_expiries_on_rotated_refresh_tokens() {
    let _clock = manual_clock();
    let cxone = Cxone::start(CxoneConfig {
        agents: 250,
        token_lifetime: Duration::from_secs(3600),
        ..CxoneConfig::default()
    })
    .await
    .unwrap();
    let (auth, metadata, transport) = cxone_layer(&cxone).await;
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .service(client::<Full<Bytes>>());

    // The first token names the tenant; its configuration names the API. The layer keeps
    // that token for the batch's first requests.
    let token = auth.cache().token().await.unwrap();
    let api = nice_cxone::tenant_api(&transport, &metadata, &token)
        .await
        .unwrap();
    assert_eq!(api.tenant_id, cxone.config().tenant_id);
    assert_eq!(api.area.as_deref(), Some("emu1"));
    assert_eq!(api.api_endpoint, cxone.issuer());

    // Pages of 50 agents, 35 minutes apart: tokens living an hour expire twice on the way
    // (at 70 and 140 minutes), each time refreshed with the refresh token the last answer
    // brought. A grant that reused a spent refresh token would be refused and fall back.
    let mut agents = 0;
    let mut pages = 0;
    loop {
        let url = api.url(&format!(
            "/inContactAPI/services/v31.0/agents?skip={agents}&top=50"
        ));
        let page = json(service.clone().oneshot(get(url)).await.unwrap()).await;
        pages += 1;
        let listed = page["agents"].as_array().unwrap().len();
        if listed == 0 {
            break;
        }
        agents += listed;
        advance(Duration::from_secs(35 * 60)).await;
    }
    assert_eq!((agents, pages), (250, 6));
    assert_eq!(
        cxone.counts(),
        CxoneCounts {
            discovery: 1,
            password_grants: 1,
            refresh_grants: 2,
            refresh_refused: 0,
            client_credentials_refused: 0,
            invalid_credentials: 0,
            configuration: 1,
            api_requests: 6,
            api_unauthorized: 0,
        }
    );
    assert_eq!(auth.cache().stats().replays, 0);
}

#[tokio::test(start_paused = true)]
async fn cxone_refused_refresh_token_falls_back_to_the_access_key_and_leaks_no_secret() {
    let _clock = manual_clock();
    let (captured, _trace) = support::capture_traces();
    let cxone = Cxone::start(CxoneConfig::default()).await.unwrap();
    let (auth, metadata, transport) = cxone_layer(&cxone).await;
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .service(client::<Full<Bytes>>());
    let token = auth.cache().token().await.unwrap();
    let api = nice_cxone::tenant_api(&transport, &metadata, &token)
        .await
        .unwrap();
    let agents = api.url("/inContactAPI/services/v31.0/agents?skip=0&top=10");
    let response = service.clone().oneshot(get(agents.clone())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The session is revoked while the token expires: the refresh is refused, and the
    // access key gets a new token without the batch seeing an error.
    cxone.revoke_refresh_tokens();
    advance(Duration::from_secs(3600)).await;
    let response = service.clone().oneshot(get(agents)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let counts = cxone.counts();
    assert_eq!(
        (
            counts.password_grants,
            counts.refresh_grants,
            counts.refresh_refused,
            counts.api_requests,
            counts.api_unauthorized
        ),
        (2, 0, 1, 2, 0)
    );

    let trace = captured.text();
    assert!(
        trace.contains("WARN") && trace.contains("falling back to the password grant"),
        "the fallback was traced:\n{trace}"
    );
    let config = cxone.config();
    let shown = format!("{trace}\n{:?}\n{:?}", auth, token);
    for secret in [&config.access_key_secret, &config.client_secret] {
        assert!(
            !shown.contains(secret.as_str()),
            "{secret} leaked:\n{shown}"
        );
    }
    assert!(
        !shown.contains("cxone-refresh-"),
        "a refresh token leaked:\n{shown}"
    );
}

#[tokio::test]
async fn cxone_refuses_client_credentials_for_a_back_end_client() {
    let cxone = Cxone::start(CxoneConfig::default()).await.unwrap();
    let transport = http_transport();
    let metadata = discover(&cxone.issuer(), &transport, false).await.unwrap();
    let config = cxone.config();
    let error = ClientCredentials::from_metadata(
        &metadata,
        config.client_id.clone(),
        config.client_secret.clone(),
    )
    .transport(transport)
    .build()
    .unwrap()
    .request_token()
    .await
    .unwrap_err();
    assert_eq!(error.error_code(), Some(&ErrorCode::UnauthorizedClient));
    assert_eq!(cxone.counts().client_credentials_refused, 1);
    assert_eq!(cxone.counts().password_grants, 0);
}

// --- Genesys Cloud ------------------------------------------------------------------------------

/// What `genesys::client_credentials` builds for a region, at the emulator's token URL: client
/// credentials with HTTP Basic.
fn genesys_provider(genesys: &Genesys, auth: ClientAuth) -> ClientCredentials {
    let config = genesys.config();
    ClientCredentials::builder(
        genesys.token_url(),
        config.client_id.clone(),
        config.client_secret.clone(),
    )
    .auth_method(auth)
    .transport(http_transport())
    .build()
    .unwrap()
}

#[tokio::test]
async fn genesys_accepts_only_basic_and_answers_a_lower_case_bearer() {
    let genesys = Genesys::start(GenesysConfig::default()).await.unwrap();
    let token = genesys_provider(&genesys, ClientAuth::Basic)
        .request_token()
        .await
        .unwrap();
    assert!(token.expires_at().is_some());
    assert_eq!(token.refresh_token(), None);
    let error = genesys_provider(&genesys, ClientAuth::Post)
        .request_token()
        .await
        .unwrap_err();
    assert_eq!(error.error_code(), Some(&ErrorCode::InvalidClient));
    let counts = genesys.counts();
    assert_eq!((counts.token_requests, counts.token_refused), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn genesys_hipaa_idle_timeout_401_is_absorbed_with_exactly_one_refresh() {
    let _clock = manual_clock();
    let genesys = Genesys::start(GenesysConfig {
        idle_timeout: Some(Duration::from_secs(15 * 60)),
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let auth = AuthLayer::new(genesys_provider(&genesys, ClientAuth::Basic));
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .service(client::<Full<Bytes>>());
    let users = genesys.api_url("/api/v2/users?pageSize=10&pageNumber=1");

    json(service.clone().oneshot(get(users.clone())).await.unwrap()).await;
    // 16 idle minutes: the token has 23 hours left, and the organisation refuses it.
    advance(Duration::from_secs(16 * 60)).await;
    let page = json(service.clone().oneshot(get(users)).await.unwrap()).await;
    assert_eq!(page["entities"].as_array().unwrap().len(), 10);

    assert_eq!(
        genesys.counts(),
        GenesysCounts {
            token_requests: 2,
            token_refused: 0,
            api_requests: 3,
            unauthorized: 1,
            idle_timeouts: 1,
            throttled: 0,
        }
    );
    assert_eq!(auth.cache().stats().replays, 1);
}

#[tokio::test]
async fn genesys_both_paging_styles_through_the_layer() {
    let genesys = Genesys::start(GenesysConfig {
        users: 230,
        conversations: 120,
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let auth = AuthLayer::new(genesys_provider(&genesys, ClientAuth::Basic));
    let service = ServiceBuilder::new()
        .layer(auth)
        .service(client::<Full<Bytes>>());

    // Users: page numbers until `pageCount`.
    let (mut users, mut page_number, mut page_count) = (0, 1, 1);
    while page_number <= page_count {
        let url = genesys.api_url(&format!(
            "/api/v2/users?pageSize=100&pageNumber={page_number}"
        ));
        let page = json(service.clone().oneshot(get(url)).await.unwrap()).await;
        users += page["entities"].as_array().unwrap().len();
        page_count = page["pageCount"].as_u64().unwrap();
        page_number += 1;
    }
    // Conversations: POST the query with the next page number until a page has none.
    let (mut conversations, mut queries) = (0, 0);
    for page_number in 1.. {
        let query = format!(
            r#"{{"interval":"2024-01-01T00:00:00Z/2024-01-02T00:00:00Z","paging":{{"pageSize":50,"pageNumber":{page_number}}}}}"#
        );
        let request = Request::builder()
            .method(Method::POST)
            .uri(genesys.api_url("/api/v2/analytics/conversations/details/query"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::from(query))
            .unwrap();
        let page = json(service.clone().oneshot(request).await.unwrap()).await;
        queries += 1;
        match page.get("conversations").and_then(Value::as_array) {
            Some(found) => conversations += found.len(),
            None => break,
        }
    }
    assert_eq!((users, page_count), (230, 3));
    assert_eq!((conversations, queries), (120, 4));
    let counts = genesys.counts();
    assert_eq!(
        (counts.token_requests, counts.api_requests, counts.throttled),
        (1, 7, 0)
    );
}

#[tokio::test]
async fn genesys_enforces_its_per_token_limit_with_429s() {
    let genesys = Genesys::start(GenesysConfig {
        per_token_limit: Some(300),
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let auth = AuthLayer::new(genesys_provider(&genesys, ClientAuth::Basic));
    let service = ServiceBuilder::new()
        .layer(auth)
        .service(client::<Full<Bytes>>());
    let url = genesys.api_url("/api/v2/users?pageSize=1&pageNumber=1");
    let mut throttled = 0;
    for _ in 0..310 {
        let response = service.clone().oneshot(get(url.clone())).await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key(http::header::RETRY_AFTER));
            throttled += 1;
        }
    }
    // Well within one real minute: the 301st to the 310th are refused.
    assert_eq!(throttled, 10);
    assert_eq!(genesys.counts().throttled, 10);
    // The emulator's own extra 429s, whatever the limit.
    genesys.throttle_next(2);
    let response = service.clone().oneshot(get(url)).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// Send `request` through `service` on the manual clock, moving the clock 20 ms at a time only
/// while the request has not reached the emulator (it waits on the rate limit), never while
/// its answer is on the way.
async fn send_paced<S>(service: &S, genesys: &Genesys, request: Request<Full<Bytes>>) -> StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    let before = genesys.counts().api_requests;
    let sent = tokio::spawn(service.clone().oneshot(request));
    loop {
        for _ in 0..50 {
            if sent.is_finished() {
                return sent.await.unwrap().unwrap().status();
            }
            tokio::task::yield_now().await;
        }
        if genesys.counts().api_requests == before {
            advance(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn genesys_per_token_rate_limit_keeps_a_bursty_batch_under_the_limit() {
    let _clock = manual_clock();
    let genesys = Genesys::start(GenesysConfig {
        per_token_limit: Some(genesys::PER_TOKEN_REQUESTS_PER_MINUTE as usize),
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let auth = AuthLayer::new(genesys_provider(&genesys, ClientAuth::Basic));
    let service = ServiceBuilder::new()
        .layer(auth.clone())
        .buffer(16)
        .layer(genesys::per_token_rate_limit())
        .service(client::<Full<Bytes>>());
    let url = genesys.api_url("/api/v2/users?pageSize=1&pageNumber=1");

    // One request, 59.5 s of other work, then 599 as fast as the limit lets them go: a
    // limiter that allows 300 a minute in bursts sends 300 around the 60 s mark, and the
    // platform refuses 299 of them.
    const REQUESTS: usize = 600;
    let start = tokio::time::Instant::now();
    assert_eq!(
        send_paced(&service, &genesys, get(url.clone())).await,
        StatusCode::OK
    );
    advance(Duration::from_millis(59_500)).await;
    let mut statuses = Vec::new();
    for _ in 1..REQUESTS {
        statuses.push(send_paced(&service, &genesys, get(url.clone())).await);
    }
    let refused = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    assert_eq!(
        genesys.counts(),
        GenesysCounts {
            token_requests: 1,
            token_refused: 0,
            api_requests: REQUESTS,
            unauthorized: 0,
            idle_timeouts: 0,
            throttled: 0,
        },
        "{refused} requests refused"
    );
    // 599 requests spaced 60/299 s apart take at least 598 of those spacings.
    assert!(start.elapsed() >= Duration::from_millis(59_500) + Duration::from_secs(60) / 299 * 598);
}
