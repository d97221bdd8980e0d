//! What [`AuthService`](crate::AuthService) does for DPoP, in one place, compiled to nothing
//! without the `dpop` feature (the service and its future call the same functions either way).

use http::{HeaderMap, Method, StatusCode, Uri};

use crate::error::AuthError;
use crate::layer::AuthSettings;

#[cfg(feature = "dpop")]
pub(crate) use crate::dpop::Sent;

/// Without the feature no proof is ever sent.
#[cfg(not(feature = "dpop"))]
pub(crate) enum Sent {}

/// Sign the request, whose credential is already in its headers, if the layer sends DPoP
/// tokens. `None` when it does not.
#[inline]
pub(crate) fn attach(
    settings: &AuthSettings,
    method: &Method,
    uri: &Uri,
    headers: &mut HeaderMap,
) -> Result<Option<Box<Sent>>, AuthError> {
    #[cfg(feature = "dpop")]
    if let Some(dpop) = &settings.dpop {
        return dpop
            .attach(method, uri, headers, &settings.header_name)
            .map(Some)
            .map_err(AuthError::Dpop);
    }
    let _ = (settings, method, uri, headers);
    Ok(None)
}

/// Learn the response's nonce; whether the request was refused for want of a nonce its proof
/// did not carry, and may be replayed for it (once per request: not `already` replayed).
#[inline]
pub(crate) fn wants_nonce_replay(
    settings: &AuthSettings,
    sent: Option<&Sent>,
    already: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> bool {
    #[cfg(feature = "dpop")]
    if let (Some(dpop), Some(sent)) = (&settings.dpop, sent) {
        if already {
            dpop.observe_response(sent, headers);
            return false;
        }
        return dpop.wants_nonce_replay(sent, status, headers);
    }
    let _ = (settings, sent, already, status, headers);
    false
}
