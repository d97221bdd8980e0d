//! DPoP (RFC 9449) on the token request side: the `oauth2` token sources with a `.dpop(..)` key
//! against the test kit's identity provider in DPoP mode, which verifies every proof with ring
//! (signature, `typ`, `alg`, `jwk`, `htm`, `htu`, `iat`, unique `jti`, nonce) and binds the
//! tokens it issues to the proof's key. Real hyper servers on loopback, real hyper-util clients.
//!
//! Nothing here depends on time beyond the proofs' `iat` (60 s of slack), so the tests run on
//! the real clock.

mod support;

use std::time::Duration;

use http::{Method, Uri};
use tower_auth_refresh::dpop::{Dpop, DpopKey};
use tower_auth_refresh::oauth2::{ClientCredentials, PasswordGrant, RefreshTokenGrant};
use tower_auth_refresh::testkit::{ProofError, ProofVerifier};
use tower_auth_refresh::{AuthError, ErrorCode};

use support::{http_transport, IdentityProvider, IdpMode, TokenRegistry};

const HOUR: Duration = Duration::from_secs(3600);

/// An identity provider that requires DPoP, optionally with nonces.
async fn dpop_idp(nonces: bool) -> (IdentityProvider, TokenRegistry) {
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    idp.require_dpop(true);
    idp.require_dpop_nonce(nonces);
    (idp, registry)
}

fn client_credentials(url: &str, dpop: &Dpop) -> ClientCredentials {
    ClientCredentials::builder(url, "batch", "s3cr3t")
        .transport(http_transport())
        .dpop(dpop.clone())
        .build()
        .unwrap()
}

fn endpoint_code(error: &AuthError) -> Option<&str> {
    match error {
        AuthError::TokenEndpoint(error) => Some(error.code.as_str()),
        _ => None,
    }
}

#[tokio::test]
async fn client_credentials_with_dpop_get_a_token_bound_to_the_key() {
    let (idp, registry) = dpop_idp(false).await;
    let dpop = Dpop::generate().unwrap();
    let grant = client_credentials(&idp.token_url(), &dpop);

    let token = grant.request_token().await.unwrap();

    assert_eq!(idp.token_requests(), 1);
    assert_eq!(idp.dpop_proofs_verified(), 1);
    assert_eq!(idp.dpop_proofs_refused(), 0);
    assert_eq!(dpop.proofs(), 1);
    assert_eq!(
        registry.jkt(token.secret()).as_deref(),
        Some(dpop.key().thumbprint())
    );
    assert!(token.expires_at().is_some());
}

#[tokio::test]
async fn the_nonce_dance_costs_one_more_request_and_no_more_tokens() {
    let (idp, registry) = dpop_idp(true).await;
    let dpop = Dpop::generate().unwrap();
    let grant = client_credentials(&idp.token_url(), &dpop);

    // No nonce yet: refused with use_dpop_nonce, answered by one resend with it.
    let first = grant.request_token().await.unwrap();
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(idp.dpop_nonce_refusals(), 1);
    assert_eq!(idp.dpop_proofs_verified(), 1);
    assert_eq!(registry.expiries().len(), 1, "one token issued");
    assert_eq!(
        registry.jkt(first.secret()).as_deref(),
        Some(dpop.key().thumbprint())
    );

    // The answer with the token named the next nonce, and it was learned: no refusal.
    let uri: Uri = idp.token_url().parse().unwrap();
    assert_eq!(dpop.nonce(&uri).as_deref(), Some(idp.dpop_nonce().as_str()));
    grant.request_token().await.unwrap();
    assert_eq!(idp.token_requests(), 3);
    assert_eq!(idp.dpop_nonce_refusals(), 1);

    // A nonce changed behind the client's back: one refusal, one resend, one token.
    idp.rotate_dpop_nonce();
    grant.request_token().await.unwrap();
    assert_eq!(idp.token_requests(), 5);
    assert_eq!(idp.dpop_nonce_refusals(), 2);
    assert_eq!(idp.dpop_proofs_verified(), 3);
    assert_eq!(registry.expiries().len(), 3);
    assert_eq!(dpop.proofs(), 5);
}

#[tokio::test]
async fn a_server_that_keeps_asking_for_new_nonces_gets_two_requests_then_a_typed_error() {
    let (idp, registry) = dpop_idp(true).await;
    idp.set_mode(IdpMode::DpopNonceChurn);
    let dpop = Dpop::generate().unwrap();
    let grant = client_credentials(&idp.token_url(), &dpop);

    let error = grant.request_token().await.unwrap_err();

    assert_eq!(endpoint_code(&error), Some("use_dpop_nonce"), "{error:?}");
    assert!(matches!(
        &error,
        AuthError::TokenEndpoint(error) if error.code == ErrorCode::Other("use_dpop_nonce".into())
    ));
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(idp.dpop_nonce_refusals(), 2);
    assert_eq!(registry.expiries().len(), 0);

    // The next token request starts over: again two, never a loop.
    grant.request_token().await.unwrap_err();
    assert_eq!(idp.token_requests(), 4);
}

#[tokio::test]
async fn a_bearer_token_for_a_dpop_request_is_refused() {
    // A server that knows nothing of DPoP ignores the proof and issues a bearer token: whoever
    // steals it can use it, so it is not accepted.
    let registry = TokenRegistry::default();
    let idp = IdentityProvider::start(registry.clone(), Some(HOUR)).await;
    let dpop = Dpop::generate().unwrap();
    let grant = client_credentials(&idp.token_url(), &dpop);

    let error = grant.request_token().await.unwrap_err();

    assert!(
        matches!(&error, AuthError::UnsupportedTokenType { token_type } if token_type == "Bearer"),
        "{error:?}"
    );
    assert!(error.to_string().contains("DPoP"), "{error}");
    assert_eq!(idp.token_requests(), 1);
    assert_eq!(dpop.proofs(), 1);

    // And a source without DPoP against a server that requires it is refused by the server.
    idp.require_dpop(true);
    let plain = ClientCredentials::builder(idp.token_url(), "batch", "s3cr3t")
        .transport(http_transport())
        .build()
        .unwrap();
    let error = plain.request_token().await.unwrap_err();
    assert_eq!(
        endpoint_code(&error),
        Some("invalid_dpop_proof"),
        "{error:?}"
    );
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(idp.dpop_proofs_refused(), 1);
}

#[tokio::test]
async fn refresh_token_rotation_under_dpop_proves_every_refresh() {
    let (idp, registry) = dpop_idp(true).await;
    let dpop = Dpop::generate().unwrap();
    let jkt = dpop.key().thumbprint().to_owned();
    let first_refresh_token = idp.issue_refresh_token(Some(&jkt));
    let grant = RefreshTokenGrant::builder(idp.token_url(), "app", first_refresh_token.as_str())
        .transport(http_transport())
        .dpop(dpop.clone())
        .build()
        .unwrap();

    let mut seen = vec![first_refresh_token.clone()];
    for _ in 0..3 {
        let token = grant.request_token().await.unwrap();
        assert_eq!(registry.jkt(token.secret()).as_deref(), Some(jkt.as_str()));
        let rotated = grant.refresh_token().await.unwrap().expose().to_owned();
        assert!(!seen.contains(&rotated), "{rotated} was rotated");
        seen.push(rotated);
    }
    assert_eq!(idp.refresh_grants(), 3);
    // The first refresh met the nonce once; the others knew it from the answer before.
    assert_eq!(idp.token_requests(), 4);
    assert_eq!(idp.dpop_nonce_refusals(), 1);
    assert_eq!(idp.dpop_proofs_verified(), 3);
    assert_eq!(dpop.proofs(), 4);

    // The refresh token is bound to the key: the same one with another key is refused.
    let bound = idp.issue_refresh_token(Some(&jkt));
    let thief = RefreshTokenGrant::builder(idp.token_url(), "app", bound.as_str())
        .transport(http_transport())
        .dpop(Dpop::generate().unwrap())
        .build()
        .unwrap();
    let error = thief.request_token().await.unwrap_err();
    assert_eq!(endpoint_code(&error), Some("invalid_grant"), "{error:?}");
    assert_eq!(idp.refresh_grants(), 3);
}

#[tokio::test]
async fn the_fallback_of_a_refresh_token_grant_proves_with_the_grants_key() {
    let (idp, registry) = dpop_idp(false).await;
    let dpop = Dpop::generate().unwrap();
    // The fallback is built without a key: the grant's key is used for it.
    let fallback = ClientCredentials::builder(idp.token_url(), "batch", "s3cr3t")
        .transport(http_transport())
        .build()
        .unwrap();
    let grant = RefreshTokenGrant::builder(idp.token_url(), "app", "refresh-unknown")
        .transport(http_transport())
        .fallback(fallback)
        .dpop(dpop.clone())
        .build()
        .unwrap();

    let token = grant.request_token().await.unwrap();

    // The refused refresh, then the fallback: both proven, the token bound to the key.
    assert_eq!(idp.token_requests(), 2);
    assert_eq!(idp.dpop_proofs_verified(), 2);
    assert_eq!(idp.refresh_grants(), 0);
    assert_eq!(dpop.proofs(), 2);
    assert_eq!(
        registry.jkt(token.secret()).as_deref(),
        Some(dpop.key().thumbprint())
    );
}

#[tokio::test]
async fn the_password_grant_and_its_refreshes_under_dpop() {
    let (idp, registry) = dpop_idp(true).await;
    let dpop = Dpop::generate().unwrap();
    let grant = PasswordGrant::builder(idp.token_url(), "app", "api-user", "pa55w0rd")
        .transport(http_transport())
        .dpop(dpop.clone())
        .build()
        .unwrap();

    let first = grant.request_token().await.unwrap();
    let second = grant.request_token().await.unwrap();

    assert_eq!((idp.password_grants(), idp.refresh_grants()), (1, 1));
    // One nonce refusal before the first token; the second knew the nonce.
    assert_eq!(idp.token_requests(), 3);
    assert_eq!(idp.dpop_nonce_refusals(), 1);
    assert_eq!(idp.dpop_proofs_verified(), 2);
    for token in [&first, &second] {
        assert_eq!(
            registry.jkt(token.secret()).as_deref(),
            Some(dpop.key().thumbprint())
        );
    }
}

#[tokio::test]
async fn a_proof_for_another_url_is_refused_by_the_identity_provider() {
    let (idp, registry) = dpop_idp(false).await;
    let dpop = Dpop::generate().unwrap();
    // The same server under another name: the proof's htu names `localhost`, the server
    // expects `127.0.0.1`.
    let elsewhere = idp.token_url().replace("127.0.0.1", "localhost");
    let grant = client_credentials(&elsewhere, &dpop);

    let error = grant.request_token().await.unwrap_err();

    assert_eq!(
        endpoint_code(&error),
        Some("invalid_dpop_proof"),
        "{error:?}"
    );
    assert_eq!(idp.token_requests(), 1);
    assert_eq!(idp.dpop_proofs_refused(), 1);
    assert_eq!(idp.dpop_proofs_verified(), 0);
    assert_eq!(registry.expiries().len(), 0);
}

#[test]
fn the_verifier_refuses_every_kind_of_bad_proof() {
    let dpop = Dpop::generate().unwrap();
    let verifier = ProofVerifier::new();
    let url = "https://login.example.com/oauth/token";
    let uri: Uri = url.parse().unwrap();
    let proof = |method: &Method, uri: &Uri, token: Option<&str>| {
        dpop.proof(method, uri, token)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    let verify = |proof: &str, token: Option<&str>, nonce: Option<&str>| {
        verifier.verify(proof, &Method::POST, url, token, nonce)
    };

    let good = proof(&Method::POST, &uri, None);
    let verified = verify(&good, None, None).unwrap();
    assert_eq!(verified.jkt, dpop.key().thumbprint());
    assert_eq!(verify(&good, None, None), Err(ProofError::Replayed));

    let other: Uri = "https://login.example.com/oauth/other".parse().unwrap();
    assert_eq!(
        verify(&proof(&Method::POST, &other, None), None, None),
        Err(ProofError::WrongUri)
    );
    assert_eq!(
        verify(&proof(&Method::GET, &uri, None), None, None),
        Err(ProofError::WrongMethod)
    );
    assert_eq!(
        verify(&proof(&Method::POST, &uri, None), None, Some("n-1")),
        Err(ProofError::Nonce)
    );
    assert_eq!(
        verify(&proof(&Method::POST, &uri, Some("a")), Some("b"), None),
        Err(ProofError::WrongAth)
    );
    assert!(verify(&proof(&Method::POST, &uri, Some("a")), Some("a"), None).is_ok());

    // Tampered: the claims of one proof under the signature of another.
    let signed = proof(&Method::POST, &uri, None);
    let forged_claims = proof(&Method::POST, &uri, Some("x"));
    let mut parts: Vec<&str> = signed.split('.').collect();
    parts[1] = forged_claims.split('.').nth(1).unwrap();
    assert_eq!(
        verify(&parts.join("."), None, None),
        Err(ProofError::BadSignature)
    );
    assert!(matches!(
        verify("not.a-proof", None, None),
        Err(ProofError::Malformed(_))
    ));
}

#[test]
fn debug_of_dpop_token_sources_shows_the_thumbprint_and_no_key() {
    // RFC 7515 appendix A.3's P-256 key: its private part is known, so the test can look for it.
    let (x, y, d) = (
        "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI",
    );
    let key = DpopKey::from_jwk(&format!(
        r#"{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","d":"{d}"}}"#
    ))
    .unwrap();
    let dpop = Dpop::new(key);
    let url = "https://login.example.com/oauth/token";

    let client_credentials = ClientCredentials::builder(url, "batch", "s3cr3t")
        .transport(http_transport())
        .dpop(dpop.clone());
    let refresh = RefreshTokenGrant::builder(url, "app", "r3fresh")
        .transport(http_transport())
        .dpop(dpop.clone());
    let password = PasswordGrant::builder(url, "app", "user", "pa55w0rd")
        .transport(http_transport())
        .dpop(dpop.clone());
    let shown = [
        format!("{client_credentials:?}"),
        format!("{refresh:?}"),
        format!("{password:?}"),
        format!("{:?}", client_credentials.build().unwrap()),
        format!("{:?}", refresh.build().unwrap()),
        format!("{:?}", password.build().unwrap()),
    ];
    for shown in shown {
        assert!(shown.contains(dpop.key().thumbprint()), "{shown}");
        for secret in [d, x, y, "s3cr3t", "r3fresh", "pa55w0rd"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
}
