//! The access token and what the cache needs to know about it.
//!
//! A [`Token`] holds a secret, so its `Debug` output is redacted: a token must never show up in a
//! log line or a panic message just because someone printed a struct that contains it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// An access token, with what is known about its lifetime.
///
/// Build one in your [`TokenProvider`](crate::TokenProvider) from the identity provider's answer.
/// The expiry drives proactive refresh; a token without one is used until the API rejects it.
///
/// ```
/// use std::time::Duration;
/// use tower_auth_refresh::Token;
///
/// let token = Token::new("eyJhbGciOi...").with_expires_in(Duration::from_secs(3600));
/// assert_eq!(token.secret(), "eyJhbGciOi...");
/// // The secret never leaks through `Debug`.
/// assert!(!format!("{token:?}").contains("eyJ"));
/// ```
#[derive(Clone)]
pub struct Token {
    secret: Arc<str>,
    expiry: Expiry,
    refresh_token: Option<Arc<str>>,
    scope: Option<Arc<str>>,
    /// The OpenID Connect ID token that came with it, if any: a JWT about the client or user,
    /// read for routing hints (such as a tenant), never sent. A secret like the others.
    id_token: Option<Arc<str>>,
    /// When the request that produced it was sent, once known: the start of its life, from
    /// which the cache places its refresh windows, wherever in a fleet the token is used.
    issued_at: Option<Instant>,
}

/// When a token stops being valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// Valid until the API says otherwise.
    Unknown,
    /// Valid until this instant.
    At(Instant),
    /// Valid for this long after the request that produced it was sent. `created` is the
    /// fallback origin for a token used outside a [`TokenCache`](crate::TokenCache).
    In {
        lifetime: Duration,
        created: Instant,
    },
}

impl Token {
    /// A token with the given secret and no known expiry.
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            secret: Arc::from(secret.into()),
            expiry: Expiry::Unknown,
            refresh_token: None,
            scope: None,
            id_token: None,
            issued_at: None,
        }
    }

    /// The token expires this long after it was requested (OAuth2's `expires_in`).
    ///
    /// A [`TokenCache`](crate::TokenCache) counts the lifetime from the moment it *called* the
    /// provider, not from when the answer arrived, so a slow identity provider cannot make a
    /// token look younger than it is.
    pub fn with_expires_in(mut self, lifetime: Duration) -> Self {
        self.expiry = Expiry::In {
            lifetime,
            created: Instant::now(),
        };
        self
    }

    /// The token expires at this instant (for example from a JWT `exp` claim).
    ///
    /// Accepts both `tokio::time::Instant` and `std::time::Instant`.
    pub fn with_expires_at(mut self, at: impl Into<Instant>) -> Self {
        self.expiry = Expiry::At(at.into());
        self
    }

    /// Attach the refresh token the identity provider returned with this access token.
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(Arc::from(refresh_token.into()));
        self
    }

    /// Record the scope the identity provider granted.
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(Arc::from(scope.into()));
        self
    }

    /// Attach the OpenID Connect ID token (`id_token`) the identity provider returned.
    pub fn with_id_token(mut self, id_token: impl Into<String>) -> Self {
        self.id_token = Some(Arc::from(id_token.into()));
        self
    }

    /// The OpenID Connect ID token, if the identity provider issued one. Also a secret.
    pub fn id_token(&self) -> Option<&str> {
        self.id_token.as_deref()
    }

    /// The access token itself. Handle with care: this is the secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The refresh token, if the identity provider issued one. Also a secret.
    pub fn refresh_token(&self) -> Option<&str> {
        self.refresh_token.as_deref()
    }

    /// The granted scope, if known.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// When the token expires, if known.
    pub fn expires_at(&self) -> Option<Instant> {
        match self.expiry {
            Expiry::Unknown => None,
            Expiry::At(at) => Some(at),
            Expiry::In { lifetime, created } => created.checked_add(lifetime),
        }
    }

    /// The expiry, with a relative lifetime counted from `requested_at`.
    ///
    /// `None` means "no known expiry"; a lifetime too large to represent is treated the same way
    /// rather than overflowing.
    /// The same token with a relative lifetime counted from `sent_at`, the moment its request
    /// was sent, so its expiry no longer depends on who reads it when.
    pub(crate) fn anchored_at(mut self, sent_at: Instant) -> Self {
        self.issued_at.get_or_insert(sent_at);
        if let Expiry::In { lifetime, .. } = self.expiry {
            self.expiry = match sent_at.checked_add(lifetime) {
                Some(at) => Expiry::At(at),
                None => Expiry::Unknown,
            };
        }
        self
    }

    pub(crate) fn issued_at(&self) -> Option<Instant> {
        self.issued_at
    }

    #[cfg(any(feature = "redis", test))]
    pub(crate) fn with_issued_at(mut self, at: Instant) -> Self {
        self.issued_at = Some(at);
        self
    }

    pub(crate) fn expires_at_from(&self, requested_at: Instant) -> Option<Instant> {
        match self.expiry {
            Expiry::Unknown => None,
            Expiry::At(at) => Some(at),
            Expiry::In { lifetime, .. } => requested_at.checked_add(lifetime),
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at())
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("scope", &self.scope)
            .field("id_token", &self.id_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_both_secrets() {
        let token = Token::new("access-secret")
            .with_refresh_token("refresh-secret")
            .with_id_token("id-secret")
            .with_scope("read");
        let shown = format!("{token:?}");
        assert!(!shown.contains("id-secret"), "{shown}");
        assert!(!shown.contains("access-secret"), "{shown}");
        assert!(!shown.contains("refresh-secret"), "{shown}");
        assert!(shown.contains("read"), "{shown}");
    }

    #[test]
    fn relative_lifetime_counts_from_the_request() {
        let requested = Instant::now();
        let token = Token::new("t").with_expires_in(Duration::from_secs(10));
        assert_eq!(
            token.expires_at_from(requested),
            Some(requested + Duration::from_secs(10))
        );
    }

    #[test]
    fn huge_lifetime_does_not_overflow() {
        let token = Token::new("t").with_expires_in(Duration::MAX);
        assert_eq!(token.expires_at_from(Instant::now()), None);
        assert_eq!(token.expires_at(), None);
    }
}
