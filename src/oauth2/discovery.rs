//! An identity provider's metadata from its issuer URL: OpenID Connect Discovery
//! (`/.well-known/openid-configuration`), then RFC 8414
//! (`/.well-known/oauth-authorization-server`).

use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::transport::{send, HttpTransport};
use super::{checked_url, ClientAuth};
use crate::error::{displayable_url, AuthError};

/// What this crate needs from an identity provider's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProviderMetadata {
    /// The issuer, as the metadata states it (checked to be the one asked for).
    pub issuer: String,
    /// Where token requests go.
    pub token_endpoint: String,
    /// The client authentication methods the token endpoint accepts. RFC 8414's default when
    /// the metadata does not say: `client_secret_basic`.
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

impl ProviderMetadata {
    /// Basic if the provider accepts it (the RFC's preference), else form fields if it accepts
    /// those, else Basic.
    pub fn preferred_client_auth(&self) -> ClientAuth {
        let supports = |method: ClientAuth| {
            self.token_endpoint_auth_methods_supported
                .iter()
                .any(|supported| supported == method.as_str())
        };
        if !supports(ClientAuth::Basic) && supports(ClientAuth::Post) {
            ClientAuth::Post
        } else {
            ClientAuth::Basic
        }
    }
}

/// Read the metadata of the identity provider at `issuer`.
///
/// The document must name the same issuer (a document that names another one is refused, as
/// OpenID Connect Discovery requires), and its token endpoint must be `https` (or loopback, or
/// `allow_insecure_http`).
pub async fn discover(
    issuer: &str,
    transport: &HttpTransport,
    allow_insecure_http: bool,
) -> Result<ProviderMetadata, AuthError> {
    let issuer = issuer.trim_end_matches('/');
    let issuer_uri = checked_url(issuer, allow_insecure_http)?;
    // Errors name URLs without credentials or queries (see `displayable_url`), and the
    // document's own text filtered.
    let failed = |reason: String| AuthError::Discovery {
        issuer: displayable_url(issuer),
        reason,
    };
    // OpenID Connect Discovery appends its well-known path to the issuer; RFC 8414 (section
    // 3.1) inserts its own between the host and the issuer's path.
    let origin = format!(
        "{}://{}",
        issuer_uri.scheme_str().unwrap_or("https"),
        issuer_uri
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default()
    );
    let path = issuer_uri.path().trim_end_matches('/');
    let candidates = [
        format!("{issuer}/.well-known/openid-configuration"),
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
    ];
    let mut tried = Vec::new();
    for url in candidates {
        let request = Request::get(&url)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::default())
            .map_err(|_| failed(format!("{} is not a valid URL", displayable_url(&url))))?;
        let answer = send(transport, request).await?;
        if answer.status == StatusCode::NOT_FOUND {
            tried.push(displayable_url(&url));
            continue;
        }
        if !answer.status.is_success() {
            return Err(failed(format!(
                "{} answered {}",
                displayable_url(&url),
                answer.status
            )));
        }
        let json = super::response::json_object(&answer)?;
        let text = |name: &str| json.get(name).and_then(Value::as_str);
        let stated = text("issuer").ok_or_else(|| failed("the metadata has no issuer".into()))?;
        if stated.trim_end_matches('/') != issuer {
            return Err(failed(format!(
                "the metadata at {} names another issuer, \"{}\"",
                displayable_url(&url),
                displayable_url(stated)
            )));
        }
        let token_endpoint = text("token_endpoint")
            .ok_or_else(|| failed("the metadata has no token_endpoint".into()))?;
        checked_url(token_endpoint, allow_insecure_http)?;
        let methods = match json.get("token_endpoint_auth_methods_supported") {
            Some(Value::Array(methods)) => methods
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => vec![ClientAuth::Basic.as_str().to_owned()],
        };
        return Ok(ProviderMetadata {
            issuer: stated.to_owned(),
            token_endpoint: token_endpoint.to_owned(),
            token_endpoint_auth_methods_supported: methods,
        });
    }
    Err(failed(format!("no metadata at {}", tried.join(" nor "))))
}
