//! The `oauth2` token sources against a strict RFC 6749 server on loopback
//! (`tests/token_server`): client authentication and encoding, refresh-token rotation and
//! fallback, every error shape as a typed `AuthError`, throttling and timeouts through the
//! cache, discovery, URL policy, redaction, and a batch through `AuthLayer`.
//!
//! Tests that involve the cache's clock run on tokio's paused clock with a
//! [`support::manual_clock`]: time moves only on `advance`, which makes their counts exact.
//! The others run on the real clock and assert nothing about time but generous bounds.

mod support;
mod token_server;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::{advance, Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::{
    self, discover, ClientAuth, ClientCredentials, ClientCredentialsBuilder, HttpTransport,
    RefreshTokenGrant,
};
use tower_auth_refresh::{AuthError, AuthLayer, ErrorCode, ReplayBody, TokenCache, TokenProvider};

use support::manual_clock;
use token_server::{
    base64, basic_header, form_encode, raw_request, until, AuthUsed, Fault, Metadata, TokenServer,
    BASIC_ID, BASIC_SECRET, POST_ID, POST_SECRET, PUBLIC_ID,
};

const FORM: &str = "application/x-www-form-urlencoded";
const HOUR: Duration = Duration::from_secs(3600);

fn http_transport() -> HttpTransport {
    oauth2::transport(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>())
}

/// The Basic client, as registered.
fn basic(server: &TokenServer) -> ClientCredentialsBuilder {
    ClientCredentials::builder(server.token_url(), BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
}

/// The `client_secret_post` client, as registered.
fn post(server: &TokenServer) -> ClientCredentialsBuilder {
    ClientCredentials::builder(server.token_url(), POST_ID, POST_SECRET)
        .auth_method(ClientAuth::Post)
        .transport(http_transport())
}

/// Everything that must never be shown: both secrets in every encoding a request carries them
/// in, and every token the server issued.
fn secrets(server: &TokenServer) -> Vec<String> {
    let mut secrets = vec!["s3cret".to_owned()];
    for (id, secret) in [(BASIC_ID, BASIC_SECRET), (POST_ID, POST_SECRET)] {
        secrets.push(secret.to_owned());
        secrets.push(form_encode(secret));
        let basic = basic_header(id, secret);
        secrets.push(basic.trim_start_matches("Basic ").to_owned());
    }
    secrets.extend(server.issued_access_tokens());
    secrets.extend(server.issued_refresh_tokens());
    secrets
}

#[track_caller]
fn assert_no_secrets(server: &TokenServer, shown: &str) {
    for secret in secrets(server) {
        assert!(!shown.contains(&secret), "{secret:?} leaked into: {shown}");
    }
}

/// Display, Debug and the source chain of an error.
fn shown(error: &AuthError) -> String {
    let mut shown = format!("{error} / {error:?}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        shown.push_str(&format!(" / {cause} / {cause:?}"));
        source = cause.source();
    }
    shown
}

fn form_fields(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

// --- the server itself ------------------------------------------------------------------------

/// Method, headers, body; the status and `error` code expected.
type StrictCase<'a> = (Method, Vec<(&'a str, &'a str)>, String, StatusCode, &'a str);

/// The server checks what RFC 6749 requires; otherwise passing tests would prove little.
#[tokio::test]
async fn the_token_server_is_strict() {
    let server = TokenServer::start().await;
    let url = server.token_url();
    let basic_auth = basic_header(BASIC_ID, BASIC_SECRET);
    let post_as_basic = basic_header(POST_ID, POST_SECRET);
    let cc = "grant_type=client_credentials";
    let post_fields = format!(
        "{cc}&client_id={}&client_secret={}",
        form_encode(POST_ID),
        form_encode(POST_SECRET)
    );
    // The secret as it is, not form-encoded: `+` then decodes to a space.
    let unencoded_basic = format!(
        "Basic {}",
        base64(format!("{BASIC_ID}:{BASIC_SECRET}").as_bytes())
    );

    let cases: Vec<StrictCase> = vec![
        (
            Method::GET,
            vec![("authorization", &basic_auth)],
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "",
        ),
        (
            Method::POST,
            vec![
                ("content-type", "application/json"),
                ("authorization", &basic_auth),
            ],
            cc.to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            "scope=a".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            format!("{cc}&{cc}"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            format!("{cc}&scope=%4"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // Basic and form credentials at once.
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            format!(
                "{cc}&client_id={}&client_secret={}",
                form_encode(BASIC_ID),
                form_encode(BASIC_SECRET)
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // The Basic client with form credentials, the post client with Basic.
        (
            Method::POST,
            vec![("content-type", FORM)],
            format!(
                "{cc}&client_id={}&client_secret={}",
                form_encode(BASIC_ID),
                form_encode(BASIC_SECRET)
            ),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &post_as_basic)],
            cc.to_owned(),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &unencoded_basic)],
            cc.to_owned(),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            Method::POST,
            vec![("content-type", FORM)],
            cc.to_owned(),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            Method::POST,
            vec![("content-type", FORM)],
            format!("{cc}&client_id={}", form_encode(PUBLIC_ID)),
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            "grant_type=password&username=u&password=p".to_owned(),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            "grant_type=refresh_token".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // And what passes: Basic, and form fields with a charset parameter.
        (
            Method::POST,
            vec![("content-type", FORM), ("authorization", &basic_auth)],
            cc.to_owned(),
            StatusCode::OK,
            "",
        ),
        (
            Method::POST,
            vec![(
                "content-type",
                "Application/X-WWW-Form-URLEncoded; charset=UTF-8",
            )],
            post_fields,
            StatusCode::OK,
            "",
        ),
    ];
    let total = cases.len();
    for (method, headers, body, status, error) in cases {
        let (got, response_headers, json) =
            raw_request(method.clone(), &url, &headers, &body).await;
        assert_eq!(got, status, "{method} {headers:?} {body}: {json}");
        if !error.is_empty() {
            assert_eq!(json["error"], error, "{headers:?} {body}");
        }
        if status == StatusCode::OK {
            assert_eq!(response_headers["cache-control"], "no-store");
            assert_eq!(json["token_type"], "Bearer");
        }
        if got == StatusCode::UNAUTHORIZED && headers.iter().any(|(n, _)| *n == "authorization") {
            assert_eq!(
                response_headers["www-authenticate"],
                r#"Basic realm="token""#
            );
        }
    }
    assert_eq!(server.token_requests(), total);
    assert_eq!(server.grant_requests("password"), 1);
    assert_eq!(server.grant_requests("refresh_token"), 1);
    let log = server.log();
    assert_eq!(log.len(), total);
    assert_eq!(log[9].auth, AuthUsed::Nothing);
    assert_eq!(log[13].auth, AuthUsed::Basic);
    assert_eq!(log[14].auth, AuthUsed::Post);
    assert_eq!(log[14].client_id.as_deref(), Some(POST_ID));
    assert_eq!(server.issued_access_tokens().len(), 2);
}

// --- 1. client credentials --------------------------------------------------------------------

#[tokio::test]
async fn client_credentials_with_basic_and_with_post() {
    let server = TokenServer::start().await;
    let audience = "https://api.example/v2?tenant=a b&x=1+2";
    let scope = "contacts:read reports:write";

    let provider = basic(&server)
        .scope(scope)
        .param("audience", audience)
        .build()
        .unwrap();
    let before = Instant::now();
    let token = provider.request_token().await.unwrap();
    let after = Instant::now();
    assert_eq!(token.secret(), server.issued_access_tokens()[0]);
    let expires_at = token.expires_at().expect("expires_in was sent");
    assert!(expires_at >= before + HOUR && expires_at <= after + HOUR);
    assert_eq!(token.scope(), Some(scope));
    assert_eq!(token.refresh_token(), None);

    let seen = server.last_request();
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.auth, AuthUsed::Basic);
    assert_eq!(seen.client_id.as_deref(), Some(BASIC_ID));
    assert_eq!(
        seen.form,
        form_fields(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("audience", audience),
        ]),
        "exactly these fields, no client_id or client_secret beside Basic"
    );
    assert_eq!(seen.content_type.as_deref(), Some(FORM));
    assert_eq!(seen.accept.as_deref(), Some("application/json"));

    let provider = post(&server)
        .scope(scope)
        .param("audience", audience)
        .build()
        .unwrap();
    let token = provider.request_token().await.unwrap();
    assert_eq!(token.secret(), server.issued_access_tokens()[1]);
    assert!(token.expires_at().is_some());
    let seen = server.last_request();
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.auth, AuthUsed::Post);
    assert_eq!(seen.client_id.as_deref(), Some(POST_ID));
    assert_eq!(
        seen.form,
        form_fields(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("audience", audience),
            ("client_id", POST_ID),
        ])
    );

    // The same provider as the cache calls it.
    let token = provider.fetch_token().await.unwrap();
    assert_eq!(token.secret(), server.issued_access_tokens()[2]);
    assert_eq!(server.grant_requests("client_credentials"), 3);
    assert_eq!(server.token_requests(), 3);
}

// --- 2. refresh-token rotation ----------------------------------------------------------------

#[tokio::test]
async fn refresh_token_rotates_across_three_refreshes() {
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(BASIC_ID);
    let grant = RefreshTokenGrant::builder(server.token_url(), BASIC_ID, first.as_str())
        .client_secret(BASIC_SECRET)
        .scope("contacts:read")
        .transport(http_transport())
        .build()
        .unwrap();
    assert_eq!(grant.refresh_token().await.unwrap().expose(), first);

    let mut used = vec![first.clone()];
    for round in 1..=3 {
        let token = grant.request_token().await.unwrap();
        let seen = server.last_request();
        assert_eq!(seen.status, StatusCode::OK, "round {round}");
        assert_eq!(seen.auth, AuthUsed::Basic);
        assert_eq!(
            seen.form,
            form_fields(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", used.last().unwrap()),
                ("scope", "contacts:read"),
            ]),
            "round {round} used the refresh token of the previous answer"
        );
        let issued = server.issued_refresh_tokens().last().unwrap().clone();
        assert!(!used.contains(&issued));
        assert_eq!(token.refresh_token(), Some(issued.as_str()));
        assert_eq!(
            Some(token.secret()),
            server.issued_access_tokens().last().map(String::as_str)
        );
        assert_eq!(grant.refresh_token().await.unwrap().expose(), issued);
        used.push(issued);
    }
    assert_eq!(server.grant_requests("refresh_token"), 3);

    // Every refresh token but the latest is dead at the server.
    for old in &used[..3] {
        let (status, _, json) = raw_request(
            Method::POST,
            &server.token_url(),
            &[
                ("content-type", FORM),
                ("authorization", &basic_header(BASIC_ID, BASIC_SECRET)),
            ],
            &format!(
                "grant_type=refresh_token&refresh_token={}",
                form_encode(old)
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["error"], "invalid_grant");
    }
    // The latest still works.
    grant.request_token().await.unwrap();
    assert_eq!(server.grant_requests("refresh_token"), 3 + 3 + 1);
    assert_eq!(server.grant_requests("client_credentials"), 0);
}

#[tokio::test]
async fn racing_refreshes_take_turns_with_the_rotating_token() {
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(BASIC_ID);
    let grant = refresh_grant(&server, &first).build().unwrap();

    let results = futures::future::join_all((0..5).map(|_| grant.request_token())).await;
    for result in results {
        result.unwrap();
    }
    // Each refresh used the token the previous one received; none was refused.
    let issued = server.issued_refresh_tokens();
    let log = server.log();
    assert_eq!(log.len(), 5);
    for (seen, expected) in log.iter().zip(&issued) {
        assert_eq!(seen.status, StatusCode::OK);
        assert_eq!(seen.field("refresh_token"), Some(expected.as_str()));
    }
    assert_eq!(
        grant.refresh_token().await.unwrap().expose(),
        issued.last().unwrap()
    );
}

#[tokio::test]
async fn public_client_refreshes_with_its_client_id_only() {
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(PUBLIC_ID);
    let grant = RefreshTokenGrant::builder(server.token_url(), PUBLIC_ID, first.as_str())
        .transport(http_transport())
        .build()
        .unwrap();
    grant.request_token().await.unwrap();
    let seen = server.last_request();
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.auth, AuthUsed::ClientIdOnly);
    assert_eq!(
        seen.form,
        form_fields(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &first),
            ("client_id", PUBLIC_ID),
        ])
    );
    let second = server.issued_refresh_tokens()[1].clone();
    assert_eq!(grant.refresh_token().await.unwrap().expose(), second);
}

// --- 3. fallback ------------------------------------------------------------------------------

fn refresh_grant(server: &TokenServer, refresh_token: &str) -> oauth2::RefreshTokenGrantBuilder {
    RefreshTokenGrant::builder(server.token_url(), BASIC_ID, refresh_token)
        .client_secret(BASIC_SECRET)
        .transport(http_transport())
}

#[tokio::test]
async fn rejected_refresh_token_falls_back_to_client_credentials() {
    let server = TokenServer::start().await;
    let dead = server.issue_refresh_token(BASIC_ID);
    server.revoke_refresh_tokens();
    let fallback = basic(&server).scope("batch").build().unwrap();
    let grant = refresh_grant(&server, &dead)
        .fallback(fallback)
        .build()
        .unwrap();

    let token = grant.request_token().await.unwrap();
    assert_eq!(server.grant_requests("refresh_token"), 1);
    assert_eq!(server.grant_requests("client_credentials"), 1);
    let log = server.log();
    assert_eq!(log[0].status, StatusCode::BAD_REQUEST);
    assert_eq!(log[0].field("refresh_token"), Some(dead.as_str()));
    assert_eq!(log[1].status, StatusCode::OK);
    assert_eq!(log[1].field("grant_type"), Some("client_credentials"));
    assert_eq!(log[1].field("scope"), Some("batch"));
    assert_eq!(token.secret(), server.issued_access_tokens()[0]);
    assert_eq!(server.issued_access_tokens().len(), 1);
    assert!(
        grant.refresh_token().await.is_none(),
        "the dead one is gone"
    );

    // The dead refresh token is never sent again: straight to client credentials.
    grant.request_token().await.unwrap();
    assert_eq!(server.grant_requests("refresh_token"), 1);
    assert_eq!(server.grant_requests("client_credentials"), 2);
}

#[tokio::test]
async fn rejected_refresh_token_without_fallback_is_typed_then_no_refresh_token() {
    let server = TokenServer::start().await;
    let dead = server.issue_refresh_token(BASIC_ID);
    server.revoke_refresh_tokens();
    let grant = refresh_grant(&server, &dead).build().unwrap();

    let error = grant.request_token().await.unwrap_err();
    assert!(
        matches!(&error, AuthError::TokenEndpoint(e)
            if e.status == StatusCode::BAD_REQUEST && e.code == ErrorCode::InvalidGrant),
        "{error:?}"
    );
    assert_eq!(error.error_code(), Some(&ErrorCode::InvalidGrant));
    assert_eq!(server.token_requests(), 1);

    assert_no_secrets(&server, &shown(&error));
    assert!(!shown(&error).contains(&dead));

    let error = grant.request_token().await.unwrap_err();
    assert!(matches!(error, AuthError::NoRefreshToken), "{error:?}");
    assert_no_secrets(&server, &shown(&error));
    assert_eq!(error.error_code(), None);
    assert_eq!(server.token_requests(), 1, "the server was not asked");
    assert!(grant.refresh_token().await.is_none());
}

#[tokio::test]
async fn invalid_grant_through_the_cache_keeps_its_code_in_the_backoff() {
    let server = TokenServer::start().await;
    let dead = server.issue_refresh_token(BASIC_ID);
    server.revoke_refresh_tokens();
    let cache = TokenCache::builder(refresh_grant(&server, &dead).build().unwrap())
        .backoff(HOUR, HOUR)
        .build();

    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, AuthError::TokenEndpoint(_)), "{error:?}");
    assert_eq!(error.error_code(), Some(&ErrorCode::InvalidGrant));
    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, AuthError::Backoff { .. }), "{error:?}");
    assert_eq!(error.error_code(), Some(&ErrorCode::InvalidGrant));
    assert_eq!(server.token_requests(), 1);
}

#[tokio::test]
async fn fallback_after_invalid_grant_keeps_a_refresh_token_it_is_given() {
    let server = TokenServer::start().await;
    server.refresh_token_with_client_credentials(true);
    let dead = server.issue_refresh_token(BASIC_ID);
    server.revoke_refresh_tokens();
    let grant = refresh_grant(&server, &dead)
        .fallback(basic(&server).build().unwrap())
        .build()
        .unwrap();

    let token = tokio::time::timeout(Duration::from_secs(20), grant.request_token())
        .await
        .expect("request_token never finished")
        .unwrap();
    let given = server.issued_refresh_tokens()[1].clone();
    assert_eq!(token.refresh_token(), Some(given.as_str()));
    assert_eq!(grant.refresh_token().await.unwrap().expose(), given);

    // The next refresh uses it.
    grant.request_token().await.unwrap();
    assert_eq!(
        server.last_request().field("refresh_token"),
        Some(given.as_str())
    );
    assert_eq!(server.grant_requests("refresh_token"), 2);
    assert_eq!(server.grant_requests("client_credentials"), 1);
}

#[tokio::test]
async fn fallback_without_a_refresh_token_keeps_a_refresh_token_it_is_given() {
    let server = TokenServer::start().await;
    server.refresh_token_with_client_credentials(true);
    // No refresh token to start with (an empty one is none).
    let grant = refresh_grant(&server, "")
        .fallback(basic(&server).build().unwrap())
        .build()
        .unwrap();

    let token = tokio::time::timeout(Duration::from_secs(20), grant.request_token())
        .await
        .expect("request_token deadlocked")
        .unwrap();
    let given = server.issued_refresh_tokens()[0].clone();
    assert_eq!(token.refresh_token(), Some(given.as_str()));
    assert_eq!(grant.refresh_token().await.unwrap().expose(), given);
    assert_eq!(server.grant_requests("client_credentials"), 1);
}

// --- 4. every error shape, typed --------------------------------------------------------------

#[tokio::test]
async fn every_error_shape_maps_to_its_typed_variant() {
    let server = TokenServer::start().await;
    let provider = basic(&server).build().unwrap();
    let mut errors = Vec::new();
    let mut requests = 0;

    // RFC 6749 error codes, with description and uri.
    for (status, code, expected) in [
        (401, "invalid_client", ErrorCode::InvalidClient),
        (400, "invalid_grant", ErrorCode::InvalidGrant),
        (400, "unauthorized_client", ErrorCode::UnauthorizedClient),
        (400, "invalid_scope", ErrorCode::InvalidScope),
        (
            400,
            "temporarily_unavailable",
            ErrorCode::Other("temporarily_unavailable".into()),
        ),
    ] {
        let description = format!("{code}, described");
        let uri = format!("https://idp.example/errors/{code}");
        server.push_fault(Fault::error(status, code, &description, &uri));
        let error = provider.request_token().await.unwrap_err();
        requests += 1;
        let AuthError::TokenEndpoint(details) = &error else {
            panic!("{code}: {error:?}");
        };
        assert_eq!(details.status.as_u16(), status);
        assert_eq!(details.code, expected);
        assert_eq!(details.description.as_deref(), Some(description.as_str()));
        assert_eq!(details.uri.as_deref(), Some(uri.as_str()));
        assert_eq!(error.error_code(), Some(&expected));
        let display = error.to_string();
        assert!(
            display.contains(code) && display.contains(&description),
            "{display}"
        );
        errors.push(error);
    }

    // invalid_client for real: a wrong secret, and the right one by the wrong method.
    for wrong in [
        ClientCredentials::builder(server.token_url(), BASIC_ID, "wrong-secret")
            .transport(http_transport())
            .build()
            .unwrap(),
        basic(&server)
            .auth_method(ClientAuth::Post)
            .build()
            .unwrap(),
    ] {
        let error = wrong.request_token().await.unwrap_err();
        requests += 1;
        assert!(
            matches!(&error, AuthError::TokenEndpoint(e)
                if e.status == StatusCode::UNAUTHORIZED && e.code == ErrorCode::InvalidClient),
            "{error:?}"
        );
        errors.push(error);
    }

    // 429 with delta-seconds, 503 with an HTTP-date.
    server.push_fault(Fault::TooManyRequests {
        retry_after_secs: 7,
    });
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(error, AuthError::Throttled { status: StatusCode::TOO_MANY_REQUESTS, retry_after }
            if retry_after == Some(Duration::from_secs(7))),
        "{error:?}"
    );
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(error.error_code(), None);
    errors.push(error);

    server.push_fault(Fault::Unavailable {
        retry_at: SystemTime::now() + Duration::from_secs(30),
    });
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    let AuthError::Throttled {
        status: StatusCode::SERVICE_UNAVAILABLE,
        retry_after: Some(wait),
    } = error
    else {
        panic!("{error:?}");
    };
    // Whole seconds on the wire (up to 1 s lost), and up to 2 s for a loaded machine.
    assert!(
        wait <= Duration::from_secs(30) && wait >= Duration::from_secs(27),
        "{wait:?}"
    );
    errors.push(error);

    // Not JSON: the status and at most 200 bytes of the body.
    let mut page = String::from("<html><head><title>502 Bad Gateway</title></head><body>");
    while page.len() < 200 {
        page.push_str("the upstream is unavailable; ");
    }
    let shown_part = page[..200].to_owned();
    page.push_str("BEYOND-THE-EXCERPT</body></html>");
    server.push_fault(Fault::Raw {
        status: StatusCode::BAD_GATEWAY,
        body: page,
    });
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    let AuthError::MalformedResponse { status, excerpt } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(*status, StatusCode::BAD_GATEWAY);
    let display = error.to_string();
    assert!(display.contains("502"), "{display}");
    assert!(display.contains(&shown_part), "{display}");
    assert!(!display.contains("BEYOND"), "{display}");
    assert!(excerpt.len() <= 200 + 40, "{excerpt}");
    errors.push(error);

    // Truncated JSON, with and without a token in it.
    server.push_fault(Fault::Raw {
        status: StatusCode::OK,
        body: r#"{"expires_in":3600,"scope":"contacts:re"#.to_owned(),
    });
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(&error, AuthError::MalformedResponse { status: StatusCode::OK, excerpt }
            if excerpt.contains("truncated") && excerpt.contains("contacts:re")),
        "{error:?}"
    );
    errors.push(error);

    server.push_fault(Fault::TruncatedToken);
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(&error, AuthError::MalformedResponse { status: StatusCode::OK, excerpt }
            if excerpt.contains("truncated")),
        "{error:?}"
    );
    let leaked = server.issued_access_tokens().last().unwrap().clone();
    assert!(!shown(&error).contains(&leaked), "{error:?}");
    errors.push(error);

    // An error status without an error code.
    server.push_fault(Fault::Raw {
        status: StatusCode::BAD_REQUEST,
        body: r#"{"message":"no"}"#.to_owned(),
    });
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(
            error,
            AuthError::MalformedResponse {
                status: StatusCode::BAD_REQUEST,
                ..
            }
        ),
        "{error:?}"
    );
    errors.push(error);

    // A redirect is not followed.
    server.push_fault(Fault::Redirect {
        location: "https://elsewhere.example/token".to_owned(),
    });
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(&error, AuthError::Redirected { status: StatusCode::FOUND, location }
            if location.as_deref() == Some("https://elsewhere.example/token")),
        "{error:?}"
    );
    errors.push(error);

    // A token that is not a bearer token.
    server.push_fault(Fault::TokenType("mac".to_owned()));
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(&error, AuthError::UnsupportedTokenType { token_type } if token_type == "mac"),
        "{error:?}"
    );
    errors.push(error);

    // More than 64 KiB.
    server.push_fault(Fault::Oversized);
    let error = provider.request_token().await.unwrap_err();
    requests += 1;
    assert!(
        matches!(&error, AuthError::MalformedResponse { status: StatusCode::OK, excerpt }
            if excerpt.contains("65536")),
        "{error:?}"
    );
    errors.push(error);

    assert_eq!(server.token_requests(), requests);
    assert_eq!(server.grant_requests("client_credentials"), requests);
    for error in &errors {
        assert_no_secrets(&server, &shown(error));
    }
    // After all that, the provider works.
    provider.request_token().await.unwrap();
    assert_eq!(server.token_requests(), requests + 1);
}

// --- 5. Retry-After through the cache ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn retry_after_holds_the_cache_back_for_as_long_as_asked() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    server.push_fault(Fault::TooManyRequests {
        retry_after_secs: 2,
    });
    let cache = TokenCache::builder(basic(&server).build().unwrap())
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build();

    let error = cache.token().await.unwrap_err();
    assert!(
        matches!(error, AuthError::Throttled { status: StatusCode::TOO_MANY_REQUESTS, retry_after }
            if retry_after == Some(Duration::from_secs(2))),
        "{error:?}"
    );
    // The clock has not moved: the backoff is the full 2 s, not the configured 10 ms.
    let error = cache.token().await.unwrap_err();
    let AuthError::Backoff {
        retry_in,
        last_error,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(*retry_in, Duration::from_secs(2));
    assert!(matches!(**last_error, AuthError::Throttled { .. }));
    assert_eq!(server.token_requests(), 1);

    advance(Duration::from_millis(1990)).await;
    let error = cache.token().await.unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_millis(10)));
    assert_eq!(
        server.token_requests(),
        1,
        "no second request while asked to wait"
    );

    advance(Duration::from_millis(10)).await;
    let token = cache.token().await.unwrap();
    assert_eq!(token.secret(), server.issued_access_tokens()[0]);
    assert_eq!(server.token_requests(), 2);
    let stats = cache.stats();
    assert_eq!((stats.token_requests, stats.refresh_failures), (2, 1));
}

// --- 6. a slow server against the refresh timeout ---------------------------------------------

#[tokio::test(start_paused = true)]
async fn slow_token_endpoint_hits_the_refresh_timeout() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    server.push_fault(Fault::Slow(Duration::from_secs(5)));
    let timeout = Duration::from_millis(200);
    let cache = TokenCache::builder(basic(&server).build().unwrap())
        .refresh_timeout(timeout)
        .build();

    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token().await }
    });
    // The request is at the server, which sleeps 5 s of the frozen clock.
    until("the token request arrives", || server.token_requests() == 1).await;
    advance(timeout).await;
    let error = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(error, AuthError::RefreshTimeout { timeout: t } if t == timeout),
        "{error:?}"
    );
    assert_eq!(server.token_requests(), 1);

    // The call may run for one more timeout, then it is cancelled and counts as a failure.
    advance(timeout).await;
    until("the call is given up", || {
        cache.stats().refresh_failures == 1
    })
    .await;
    assert!(server.log().is_empty(), "the slow answer was never sent");

    // After the default 1 s backoff, a prompt server is asked again.
    advance(Duration::from_secs(1)).await;
    cache.token().await.unwrap();
    assert_eq!(server.token_requests(), 2);
}

/// The issue-11 scenario: the server rotates the refresh token but answers after the cache's
/// `refresh_timeout`. The waiters get `RefreshTimeout`; the grant still records the rotated
/// refresh token, so the next refresh uses it instead of the spent one (which would be refused
/// with `invalid_grant` and end in the client-credentials fallback).
#[tokio::test(start_paused = true)]
async fn a_rotation_answered_after_the_refresh_timeout_is_kept() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(BASIC_ID);
    let grant = refresh_grant(&server, &first)
        .fallback(basic(&server).build().unwrap())
        .build()
        .unwrap();
    let timeout = Duration::from_millis(200);
    let slow = Duration::from_secs(5);
    server.push_fault(Fault::SlowAnswer(slow));
    let cache = TokenCache::builder(grant.clone())
        .refresh_timeout(timeout)
        .build();

    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.token().await }
    });
    until("the refresh arrives", || server.token_requests() == 1).await;
    // The server has committed the rotation: `first` is spent, its successor is in the answer.
    let rotated = server.issued_refresh_tokens()[1].clone();
    advance(timeout).await;
    let error = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(error, AuthError::RefreshTimeout { timeout: t } if t == timeout),
        "{error:?}"
    );

    // The cache gives the call up after one more timeout (the grant's own task goes on).
    advance(timeout).await;
    until("the call is given up", || {
        cache.stats().refresh_failures == 1
    })
    .await;

    // The answer arrives after everyone stopped waiting; the grant keeps what it carries.
    advance(slow).await;
    assert_eq!(
        grant.refresh_token().await.unwrap().expose(),
        rotated,
        "the rotated refresh token was lost"
    );

    // The next refresh (the 1 s backoff has passed) uses it, without falling back.
    let token = cache.token().await.unwrap();
    assert_eq!(server.grant_requests("refresh_token"), 2);
    assert_eq!(server.grant_requests("client_credentials"), 0);
    let log = server.log();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|seen| seen.status == StatusCode::OK));
    assert_eq!(log[1].field("refresh_token"), Some(rotated.as_str()));
    assert_eq!(token.secret(), server.issued_access_tokens()[1]);
    assert_eq!(
        grant.refresh_token().await.unwrap().expose(),
        server.issued_refresh_tokens()[2]
    );
    let stats = cache.stats();
    assert_eq!((stats.token_requests, stats.refresh_failures), (2, 1));
}

/// A caller of the grant itself drops its refresh mid-flight, and a second caller starts at
/// once: the second waits for the first exchange and uses the refresh token it returned.
#[tokio::test(start_paused = true)]
async fn a_refresh_dropped_mid_flight_keeps_the_rotation_for_the_next_caller() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(BASIC_ID);
    let grant = refresh_grant(&server, &first)
        .fallback(basic(&server).build().unwrap())
        .build()
        .unwrap();
    let slow = Duration::from_secs(5);
    server.push_fault(Fault::SlowAnswer(slow));

    let dropped = tokio::spawn({
        let grant = grant.clone();
        async move { grant.request_token().await }
    });
    until("the refresh arrives", || server.token_requests() == 1).await;
    let rotated = server.issued_refresh_tokens()[1].clone();
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());

    let next = tokio::spawn({
        let grant = grant.clone();
        async move { grant.request_token().await }
    });
    advance(slow).await;
    let token = next.await.unwrap().unwrap();
    assert_eq!(server.grant_requests("refresh_token"), 2);
    assert_eq!(server.grant_requests("client_credentials"), 0);
    let log = server.log();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|seen| seen.status == StatusCode::OK));
    assert_eq!(log[1].field("refresh_token"), Some(rotated.as_str()));
    assert_eq!(token.secret(), server.issued_access_tokens()[1]);
    assert_eq!(
        grant.refresh_token().await.unwrap().expose(),
        server.issued_refresh_tokens()[2]
    );
}

/// The exchange outlives its caller, but not forever: a token endpoint that never answers is
/// given up after the grant's own timeout, and the next refresh is not held up behind it.
#[tokio::test(start_paused = true)]
async fn a_token_endpoint_that_never_answers_is_given_up_after_the_grant_timeout() {
    let _clock = manual_clock();
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(BASIC_ID);
    let limit = Duration::from_secs(10);
    let grant = refresh_grant(&server, &first)
        .request_timeout(limit)
        .build()
        .unwrap();
    // The server sleeps before it looks at the refresh token: `first` is not spent.
    server.push_fault(Fault::Slow(HOUR));

    let hung = tokio::spawn({
        let grant = grant.clone();
        async move { grant.request_token().await }
    });
    until("the refresh arrives", || server.token_requests() == 1).await;
    advance(limit).await;
    until("the grant gives up", || hung.is_finished()).await;
    let error = hung.await.unwrap().unwrap_err();
    assert!(
        matches!(error, AuthError::RefreshTimeout { timeout } if timeout == limit),
        "{error:?}"
    );

    grant.request_token().await.unwrap();
    assert_eq!(server.grant_requests("refresh_token"), 2);
    let log = server.log();
    assert_eq!(log.len(), 1, "only the second request was answered");
    assert_eq!(log[0].status, StatusCode::OK);
    assert_eq!(log[0].field("refresh_token"), Some(first.as_str()));
}

// --- 7. a JWT without expires_in ----------------------------------------------------------------

#[tokio::test]
async fn jwt_exp_sets_the_expiry_when_expires_in_is_missing() {
    let server = TokenServer::start().await;
    let lifetime = Duration::from_secs(600);
    server.push_fault(Fault::Jwt { lifetime });
    let provider = basic(&server).build().unwrap();

    let before = Instant::now();
    let token = provider.request_token().await.unwrap();
    let after = Instant::now();
    assert_eq!(token.secret(), server.issued_access_tokens()[0]);
    assert_eq!(token.secret().split('.').count(), 3, "a JWT");
    let expires_at = token.expires_at().expect("the JWT's exp gives the expiry");
    // `exp` is in whole seconds: up to one second early, plus scheduling slack.
    assert!(
        expires_at >= before + lifetime - Duration::from_secs(2),
        "{:?} early",
        (before + lifetime) - expires_at
    );
    assert!(expires_at <= after + lifetime + Duration::from_secs(1));
}

// --- 8. discovery -----------------------------------------------------------------------------

#[tokio::test]
async fn discovery_finds_checks_and_feeds_the_provider() {
    let server = TokenServer::start().await;
    let transport = http_transport();
    let issuer = server.issuer();
    let methods = |methods: &[&str]| Some(methods.iter().map(|m| (*m).to_owned()).collect());

    // Correct at both paths: OpenID Connect's comes first.
    let metadata = discover(&issuer, &transport, false).await.unwrap();
    assert_eq!(metadata.issuer, issuer);
    assert_eq!(metadata.token_endpoint, server.token_url());
    assert_eq!(
        metadata.token_endpoint_auth_methods_supported,
        ["client_secret_basic", "client_secret_post"]
    );
    assert_eq!(metadata.preferred_client_auth(), ClientAuth::Basic);
    assert_eq!(server.discovery_requests(), (1, 0));
    assert_eq!(
        server.well_known_paths(),
        ["/.well-known/openid-configuration"]
    );
    // A trailing slash on the issuer is the same issuer.
    discover(&format!("{issuer}/"), &transport, false)
        .await
        .unwrap();
    assert_eq!(server.discovery_requests(), (2, 0));

    // 404 at the first path, RFC 8414 at the second, only client_secret_post.
    server.set_discovery(
        None,
        Some(Metadata {
            auth_methods: methods(&["client_secret_post"]),
            ..server.metadata()
        }),
    );
    let metadata = discover(&issuer, &transport, false).await.unwrap();
    assert_eq!(server.discovery_requests(), (3, 1));
    assert_eq!(
        server.well_known_paths()[2..],
        [
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server"
        ]
    );
    assert_eq!(metadata.token_endpoint, server.token_url());
    assert_eq!(metadata.preferred_client_auth(), ClientAuth::Post);
    let provider = ClientCredentials::from_metadata(&metadata, POST_ID, POST_SECRET)
        .transport(transport.clone())
        .build()
        .unwrap();
    provider.request_token().await.unwrap();
    let seen = server.last_request();
    assert_eq!((seen.status, seen.auth), (StatusCode::OK, AuthUsed::Post));

    // No methods listed: RFC 8414's default, Basic, which the Basic client then uses.
    server.set_discovery(
        Some(Metadata {
            auth_methods: None,
            ..server.metadata()
        }),
        None,
    );
    let metadata = discover(&issuer, &transport, false).await.unwrap();
    assert_eq!(
        metadata.token_endpoint_auth_methods_supported,
        ["client_secret_basic"]
    );
    let provider = ClientCredentials::from_metadata(&metadata, BASIC_ID, BASIC_SECRET)
        .transport(transport.clone())
        .build()
        .unwrap();
    provider.request_token().await.unwrap();
    let seen = server.last_request();
    assert_eq!((seen.status, seen.auth), (StatusCode::OK, AuthUsed::Basic));

    // Nothing at either path.
    server.set_discovery(None, None);
    let before = server.discovery_requests();
    let error = discover(&issuer, &transport, false).await.unwrap_err();
    let AuthError::Discovery {
        issuer: asked,
        reason,
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(asked, &issuer);
    assert!(
        reason.contains("openid-configuration") && reason.contains("oauth-authorization-server"),
        "{reason}"
    );
    assert_eq!(
        server.discovery_requests(),
        (before.0 + 1, before.1 + 1),
        "both paths tried"
    );

    // A document that names another issuer.
    server.set_discovery(
        Some(Metadata {
            issuer: "https://login.other.example".to_owned(),
            ..server.metadata()
        }),
        Some(server.metadata()),
    );
    let before = server.discovery_requests();
    let error = discover(&issuer, &transport, false).await.unwrap_err();
    assert!(
        matches!(&error, AuthError::Discovery { reason, .. } if reason.contains("login.other.example")),
        "{error:?}"
    );
    assert_eq!(
        server.discovery_requests(),
        (before.0 + 1, before.1),
        "a lying document is an error, not a reason to look elsewhere"
    );

    // A plain-HTTP token endpoint on another host.
    let insecure = "http://example.com/token";
    server.set_discovery(
        Some(Metadata {
            token_endpoint: insecure.to_owned(),
            ..server.metadata()
        }),
        None,
    );
    let error = discover(&issuer, &transport, false).await.unwrap_err();
    assert!(
        matches!(&error, AuthError::InsecureUrl { url } if url == insecure),
        "{error:?}"
    );
    // Unless plain HTTP is allowed.
    let metadata = discover(&issuer, &transport, true).await.unwrap();
    assert_eq!(metadata.token_endpoint, insecure);
    assert_eq!(server.token_requests(), 2);
}

#[tokio::test]
async fn discovery_of_an_issuer_with_a_path_via_openid_connect() {
    let server = TokenServer::start().await;
    server.set_issuer_path("/tenant-a");
    server.set_discovery(Some(server.metadata()), None);
    let issuer = server.issuer();
    assert!(issuer.ends_with("/tenant-a"));
    let metadata = discover(&issuer, &http_transport(), false).await.unwrap();
    assert_eq!(metadata.issuer, issuer);
    assert_eq!(metadata.token_endpoint, server.token_url());
    assert_eq!(
        server.well_known_paths(),
        ["/tenant-a/.well-known/openid-configuration"]
    );
}

#[tokio::test]
async fn discovery_of_an_issuer_with_a_path_via_rfc_8414() {
    let server = TokenServer::start().await;
    server.set_issuer_path("/tenant-a");
    server.set_discovery(None, Some(server.metadata()));
    let issuer = server.issuer();
    let result = discover(&issuer, &http_transport(), false).await;
    assert_eq!(
        server.well_known_paths(),
        [
            "/tenant-a/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/tenant-a",
        ]
    );
    let metadata = result.unwrap();
    assert_eq!(metadata.issuer, issuer);
    assert_eq!(server.discovery_requests(), (1, 1));
}

// --- 9. the URL policy ------------------------------------------------------------------------

#[tokio::test]
async fn plain_http_to_another_host_needs_an_explicit_opt_in() {
    let insecure = "http://example.com/token";
    let error = ClientCredentials::builder(insecure, BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, AuthError::InsecureUrl { url } if url == insecure),
        "{error:?}"
    );
    assert!(!shown(&error).contains("s3cret"));
    ClientCredentials::builder(insecure, BASIC_ID, BASIC_SECRET)
        .transport(http_transport())
        .allow_insecure_http(true)
        .build()
        .unwrap();

    let error = RefreshTokenGrant::builder(insecure, BASIC_ID, "rt")
        .transport(http_transport())
        .build()
        .unwrap_err();
    assert!(matches!(error, AuthError::InsecureUrl { .. }), "{error:?}");
    RefreshTokenGrant::builder(insecure, BASIC_ID, "rt")
        .transport(http_transport())
        .allow_insecure_http(true)
        .build()
        .unwrap();

    // https anywhere and http on loopback need nothing.
    for url in [
        "https://login.example.com/oauth/token",
        "http://127.0.0.1:9/token",
        "http://localhost:9/token",
    ] {
        ClientCredentials::builder(url, BASIC_ID, BASIC_SECRET)
            .transport(http_transport())
            .build()
            .unwrap();
    }
}

// --- 10. redaction ----------------------------------------------------------------------------

#[tokio::test]
async fn debug_output_never_shows_a_secret() {
    let server = TokenServer::start().await;
    let first = server.issue_refresh_token(BASIC_ID);
    let builder = basic(&server).scope("contacts:read");
    assert_no_secrets(&server, &format!("{builder:?}"));
    let client_credentials = builder.build().unwrap();
    assert_no_secrets(&server, &format!("{client_credentials:?}"));
    let post_builder = post(&server);
    assert_no_secrets(&server, &format!("{post_builder:?}"));
    assert_no_secrets(&server, &format!("{:?}", post_builder.build().unwrap()));

    let builder = refresh_grant(&server, &first).fallback(client_credentials.clone());
    assert_no_secrets(&server, &format!("{builder:?}"));
    let grant = builder.build().unwrap();
    assert_no_secrets(&server, &format!("{grant:?}"));

    // After a rotation, neither the new refresh token nor the access token shows.
    let token = grant.request_token().await.unwrap();
    assert_eq!(server.issued_refresh_tokens().len(), 2);
    assert_no_secrets(&server, &format!("{grant:?}"));
    assert_no_secrets(&server, &format!("{token:?}"));
    assert_no_secrets(
        &server,
        &format!("{:?}", grant.refresh_token().await.unwrap()),
    );
    assert_no_secrets(&server, &format!("{:?}", TokenCache::new(grant.clone())));
}

#[tokio::test]
async fn trace_output_never_shows_a_secret_during_a_fallback() {
    let (captured, _trace) = support::capture_traces();

    let server = TokenServer::start().await;
    let dead = server.issue_refresh_token(BASIC_ID);
    server.revoke_refresh_tokens();
    let grant = refresh_grant(&server, &dead)
        .fallback(basic(&server).build().unwrap())
        .build()
        .unwrap();
    let layer = AuthLayer::new(grant);
    let client: Client<HttpConnector, ReplayBody<Empty<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let service = ServiceBuilder::new().layer(layer.clone()).service(client);
    let request = Request::get(server.url("/api")).body(Empty::new()).unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.grant_requests("refresh_token"), 1);
    assert_eq!(server.grant_requests("client_credentials"), 1);
    assert_eq!(server.api_requests(), (1, 0));

    let trace = captured.text();
    assert!(
        trace.contains("WARN") && trace.contains("falling back to the client credentials grant"),
        "the fallback was traced:\n{trace}"
    );
    assert!(
        trace.contains("token refresh"),
        "the cache traced:\n{trace}"
    );
    assert_no_secrets(&server, &trace);
    assert!(!trace.contains(&dead));
}

// --- 11. end to end ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn batch_through_auth_layer_crosses_expiries_without_a_failure() {
    const REQUESTS: u32 = 300;
    const STEP: Duration = Duration::from_millis(20);
    const LIFETIME: Duration = Duration::from_secs(1);

    let _clock = manual_clock();
    let server = TokenServer::start().await;
    server.set_expires_in(Some(LIFETIME));
    let layer = AuthLayer::new(basic(&server).build().unwrap());
    let client: Client<HttpConnector, ReplayBody<Empty<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let service = ServiceBuilder::new().layer(layer.clone()).service(client);

    for i in 0..REQUESTS {
        let request = Request::get(server.url("/api")).body(Empty::new()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        advance(STEP).await;
    }
    // The last background refresh may still be on its way to the server.
    until("every token request reaches the server", || {
        server.token_requests() as u64 == layer.cache().stats().token_requests
    })
    .await;

    // Requests go out at 0, 20, ..., 5980 ms of a frozen clock that moves only between them.
    // A token requested at t lives until t + 1 s; the cache stops sending it at t + 750 ms (the
    // skew is a quarter of a short lifetime) and refreshes it in the background from t + 500 ms
    // (the advisory window is half of it: src/cache.rs, `Entry::new`). The first request at or
    // after t + 500 ms, exactly t + 500 ms since 20 ms divides it, starts that refresh, and the
    // new token's life counts from then whenever its answer lands. So tokens are requested at
    // 0, 500, ..., 5500 ms: one per half lifetime that starts inside the batch, two per lifetime
    // elapsed. Exact whatever the loopback timing, since the clock only moves between requests.
    let span = STEP * REQUESTS;
    let lifetimes_elapsed = span.as_millis() / LIFETIME.as_millis();
    let half_life = LIFETIME / 2;
    let expected = span.as_millis().div_ceil(half_life.as_millis());
    assert_eq!((lifetimes_elapsed, expected), (6, 12));
    assert_eq!(server.token_requests() as u128, expected);
    assert_eq!(
        server.grant_requests("client_credentials") as u128,
        expected
    );
    assert!(server
        .log()
        .iter()
        .all(|seen| seen.status == StatusCode::OK && seen.auth == AuthUsed::Basic));
    // No failure, and no expired token ever reached the API.
    assert_eq!(server.api_requests(), (REQUESTS as usize, 0));
    let stats = layer.cache().stats();
    assert_eq!(stats.token_requests as u128, expected);
    assert_eq!(
        (stats.refresh_failures, stats.replays, stats.invalidations),
        (0, 0, 0)
    );
}

// --- expires_in: 0 -----------------------------------------------------------------------------

#[tokio::test]
async fn a_token_that_expires_on_arrival_is_refused_not_sent() {
    let server = TokenServer::start().await;
    server.set_expires_in(Some(Duration::ZERO));
    let cache = TokenCache::builder(basic(&server).build().unwrap())
        .backoff(Duration::ZERO, Duration::ZERO)
        .build();

    let error = cache.token().await.unwrap_err();
    assert!(matches!(error, AuthError::Refresh { .. }), "{error:?}");
    let cause = std::error::Error::source(&error).unwrap().to_string();
    assert!(cause.contains("already expired"), "{cause}");
    assert_eq!(cache.stats().generation, None, "nothing was installed");

    server.set_expires_in(Some(Duration::from_secs(3600)));
    assert!(!cache.token().await.unwrap().secret().is_empty());
    assert_eq!(cache.stats().token_requests, 2);
}
