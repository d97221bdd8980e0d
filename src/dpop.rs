//! DPoP (RFC 9449): tokens bound to a key the client holds.
//!
//! A bearer token works for whoever holds it: one leaked into a log or a proxy is as good as the
//! client's own. A DPoP-bound token is only accepted with a fresh *proof*, a small JWT signed by
//! the client's private key for exactly one request (method, URL, time, a unique id and a hash of
//! the token). A stolen token without the key is refused.
//!
//! [`Dpop`] holds the key and the server nonces learned so far. The
//! [`AuthLayer`](crate::AuthLayer) uses it through
//! [`AuthLayerBuilder::dpop`](crate::AuthLayerBuilder::dpop), and the `oauth2` token sources
//! through their `dpop` builder option; both share one `Dpop`, so one key signs everything.
//!
//! Servers may require a nonce of their own in every proof (RFC 9449 section 8); they hand it out
//! in a `DPoP-Nonce` header and refuse a proof without the current one with `use_dpop_nonce`.
//! `Dpop` remembers the last nonce of each origin, learns a new one from every response that
//! carries it, and the layer and the token sources answer `use_dpop_nonce` with one replay.
//!
//! Signing is ES256 (ECDSA P-256 with SHA-256) by [`ring`](https://docs.rs/ring), the audited
//! implementation rustls already uses; this crate does no cryptography of its own.
//!
//! ```
//! use http::{Method, Uri};
//! use tower_auth_refresh::dpop::Dpop;
//!
//! let dpop = Dpop::generate().unwrap();
//! let uri: Uri = "https://api.example.com/contacts?page=2".parse().unwrap();
//! let proof = dpop.proof(&Method::GET, &uri, Some("access-token")).unwrap();
//! // header.payload.signature, one compact JWS.
//! assert_eq!(proof.to_str().unwrap().split('.').count(), 3);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::challenge::challenges;
use crate::origin::Origin;

/// The `DPoP` request header: the proof.
pub const DPOP: HeaderName = HeaderName::from_static("dpop");
/// The `DPoP-Nonce` response header: a nonce the server wants in the next proofs.
pub const DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");

/// Why a DPoP key could not be used or a proof not made. Never contains key material.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DpopError {
    /// The key is not a P-256 private key in the given format.
    InvalidKey(&'static str),
    /// The request URI has no scheme or authority, so the proof cannot name it (`htu`).
    RelativeUri,
    /// The system's random generator or the signer failed.
    Signing,
}

impl fmt::Display for DpopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DpopError::InvalidKey(why) => write!(f, "unusable DPoP key: {why}"),
            DpopError::RelativeUri => f.write_str(
                "a DPoP proof needs an absolute request URI (scheme and authority) for `htu`",
            ),
            DpopError::Signing => f.write_str("signing the DPoP proof failed"),
        }
    }
}

impl std::error::Error for DpopError {}

impl From<DpopError> for crate::AuthError {
    fn from(error: DpopError) -> Self {
        crate::AuthError::Dpop(error)
    }
}

/// A P-256 private key for DPoP proofs.
///
/// Cloning shares the key. `Debug` shows its public thumbprint only.
#[derive(Clone)]
pub struct DpopKey {
    inner: Arc<KeyInner>,
}

struct KeyInner {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    /// The public key as a JWK, members in RFC 7638 order.
    public_jwk: String,
    /// RFC 7638 SHA-256 thumbprint of the public key, base64url: the token's `jkt`.
    thumbprint: String,
    /// base64url of the JOSE header, the same for every proof.
    header: String,
}

impl DpopKey {
    /// A new random key. It lives as long as the process: tokens bound to it are useless to
    /// anyone else, and to this process after a restart.
    pub fn generate() -> Result<Self, DpopError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| DpopError::Signing)?;
        Self::from_pkcs8_der(pkcs8.as_ref())
    }

    /// A PKCS#8 (`BEGIN PRIVATE KEY`) P-256 key, DER encoded.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, DpopError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|_| DpopError::InvalidKey("not a PKCS#8 P-256 private key"))?;
        Self::from_pair(pair, rng)
    }

    /// A PKCS#8 P-256 key in PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, DpopError> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| DpopError::InvalidKey("no PEM `PRIVATE KEY` block"))?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// A private JWK: `{"kty":"EC","crv":"P-256","x":..,"y":..,"d":..}`.
    pub fn from_jwk(jwk: &str) -> Result<Self, DpopError> {
        let value: serde_json::Value =
            serde_json::from_str(jwk).map_err(|_| DpopError::InvalidKey("not JSON"))?;
        let member = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
        if member("kty") != Some("EC") || member("crv") != Some("P-256") {
            return Err(DpopError::InvalidKey("not an EC P-256 JWK"));
        }
        let coordinate = |name: &'static str| {
            member(name)
                .and_then(|text| URL_SAFE_NO_PAD.decode(text).ok())
                .filter(|bytes| bytes.len() == 32)
                .ok_or(DpopError::InvalidKey(
                    "x, y and d must be 32-byte base64url values",
                ))
        };
        let (x, y, d) = (coordinate("x")?, coordinate("y")?, coordinate("d")?);
        let mut public = Vec::with_capacity(65);
        public.push(0x04);
        public.extend_from_slice(&x);
        public.extend_from_slice(&y);
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &d,
            &public,
            &rng,
        )
        .map_err(|_| DpopError::InvalidKey("d does not match x and y"))?;
        Self::from_pair(pair, rng)
    }

    fn from_pair(pair: EcdsaKeyPair, rng: SystemRandom) -> Result<Self, DpopError> {
        // An uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = pair.public_key().as_ref();
        let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
            return Err(DpopError::InvalidKey("unexpected public key encoding"));
        };
        let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
        // RFC 7638: the required members only, in lexicographic order, no whitespace. The same
        // text serves as the `jwk` header member.
        let public_jwk = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = URL_SAFE_NO_PAD.encode(sha256(public_jwk.as_bytes()));
        let header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"typ":"dpop+jwt","alg":"ES256","jwk":{public_jwk}}}"#
        ));
        Ok(Self {
            inner: Arc::new(KeyInner {
                pair,
                rng,
                public_jwk,
                thumbprint,
                header,
            }),
        })
    }

    /// The RFC 7638 SHA-256 thumbprint of the public key (base64url): what a server binds the
    /// token to (`cnf.jkt`), and what `dpop_jkt` carries in an authorization request.
    pub fn thumbprint(&self) -> &str {
        &self.inner.thumbprint
    }

    /// The public key as a JWK.
    pub fn public_jwk(&self) -> &str {
        &self.inner.public_jwk
    }

    fn sign(&self, input: &[u8]) -> Result<String, DpopError> {
        let signature = self
            .inner
            .pair
            .sign(&self.inner.rng, input)
            .map_err(|_| DpopError::Signing)?;
        Ok(URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &"ES256")
            .field("thumbprint", &self.inner.thumbprint)
            .finish_non_exhaustive()
    }
}

/// A DPoP key and the nonces servers asked for: makes the proof of each request.
///
/// Cloning shares both, so the layer and the token source of one client use one key and one
/// nonce memory.
#[derive(Clone)]
pub struct Dpop {
    inner: Arc<DpopInner>,
}

struct DpopInner {
    key: DpopKey,
    /// The last nonce each origin handed out.
    nonces: RwLock<HashMap<Origin, Arc<str>>>,
    /// `jti` = this random prefix and a counter: unique without a random draw per proof.
    jti_prefix: [u8; 12],
    proofs: AtomicU64,
    nonce_replays: AtomicU64,
}

/// A proof the layer sent: the request's URI (whose origin a response's nonce belongs to) and
/// the nonce the proof carried.
pub(crate) struct Sent {
    uri: Uri,
    nonce: Option<Arc<str>>,
}

impl Dpop {
    /// Proofs signed with `key`.
    pub fn new(key: DpopKey) -> Self {
        let mut jti_prefix = [0u8; 12];
        // A failed draw leaves zeros: the counter still keeps `jti`s of this key unique within
        // the process, which is what a server checks.
        let _ = key.inner.rng.fill(&mut jti_prefix);
        Self {
            inner: Arc::new(DpopInner {
                key,
                nonces: RwLock::new(HashMap::new()),
                jti_prefix,
                proofs: AtomicU64::new(0),
                nonce_replays: AtomicU64::new(0),
            }),
        }
    }

    /// Proofs signed with a new random key ([`DpopKey::generate`]).
    pub fn generate() -> Result<Self, DpopError> {
        DpopKey::generate().map(Self::new)
    }

    /// The key proofs are signed with.
    pub fn key(&self) -> &DpopKey {
        &self.inner.key
    }

    /// How many proofs were made.
    pub fn proofs(&self) -> u64 {
        self.inner.proofs.load(Ordering::Relaxed)
    }

    /// The proof for one request: `htm` = `method`, `htu` = `uri` without query and fragment,
    /// `iat` = now, a unique `jti`, `ath` = the hash of `access_token` (none on a token request),
    /// and the origin's nonce if it asked for one.
    pub fn proof(
        &self,
        method: &Method,
        uri: &Uri,
        access_token: Option<&str>,
    ) -> Result<HeaderValue, DpopError> {
        self.proof_with(method, uri, access_token, self.nonce(uri).as_deref())
    }

    fn proof_with(
        &self,
        method: &Method,
        uri: &Uri,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<HeaderValue, DpopError> {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(DpopError::RelativeUri);
        };
        let htu = format!("{scheme}://{authority}{}", uri.path());
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let count = self.inner.proofs.fetch_add(1, Ordering::Relaxed);
        let mut jti = [0u8; 20];
        jti[..12].copy_from_slice(&self.inner.jti_prefix);
        jti[12..].copy_from_slice(&count.to_be_bytes());

        let mut claims = serde_json::Map::with_capacity(6);
        claims.insert("jti".into(), URL_SAFE_NO_PAD.encode(jti).into());
        claims.insert("htm".into(), method.as_str().into());
        claims.insert("htu".into(), htu.into());
        claims.insert("iat".into(), iat.into());
        if let Some(token) = access_token {
            claims.insert("ath".into(), access_token_hash(token).into());
        }
        if let Some(nonce) = nonce {
            claims.insert("nonce".into(), nonce.into());
        }
        let payload = serde_json::Value::Object(claims).to_string();

        let key = &self.inner.key;
        let mut jws = String::with_capacity(key.inner.header.len() + payload.len() * 4 / 3 + 92);
        jws.push_str(&key.inner.header);
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut jws);
        let signature = key.sign(jws.as_bytes())?;
        jws.push('.');
        jws.push_str(&signature);
        // Base64url and dots only: always a valid header value.
        HeaderValue::try_from(jws).map_err(|_| DpopError::Signing)
    }

    /// Sign a proof for a request whose credential (`<scheme> <token>`) is already in
    /// `headers[credential_header]` and add it as the `DPoP` header. Returns what the response
    /// is checked against.
    pub(crate) fn attach(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &mut HeaderMap,
        credential_header: &HeaderName,
    ) -> Result<Box<Sent>, DpopError> {
        let token = headers
            .get(credential_header)
            .and_then(|credential| credential.to_str().ok())
            .and_then(|credential| credential.split_once(' '))
            .map(|(_scheme, token)| token);
        let nonce = self.nonce(uri);
        let proof = self.proof_with(method, uri, token, nonce.as_deref())?;
        headers.insert(DPOP, proof);
        Ok(Box::new(Sent {
            uri: uri.clone(),
            nonce,
        }))
    }

    /// Learn the nonce of a response to `sent`, and say whether it refused the request for a
    /// nonce the proof did not carry: then one replay with the new nonce is worth it.
    pub(crate) fn wants_nonce_replay(
        &self,
        sent: &Sent,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> bool {
        self.observe(&sent.uri, headers);
        if !asks_for_nonce(status, headers) {
            return false;
        }
        let current = self.nonce(&sent.uri);
        let wanted = current.is_some() && current != sent.nonce;
        if wanted {
            self.inner.nonce_replays.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "DPoP proof refused for its nonce; replaying with the server's new one"
            );
        }
        wanted
    }

    /// Learn the nonce of a response to `sent`.
    pub(crate) fn observe_response(&self, sent: &Sent, headers: &HeaderMap) {
        self.observe(&sent.uri, headers);
    }

    /// How many requests were refused with `use_dpop_nonce` and replayed with the new nonce.
    pub fn nonce_replays(&self) -> u64 {
        self.inner.nonce_replays.load(Ordering::Relaxed)
    }

    /// The nonce `uri`'s origin asked for last, if any.
    pub fn nonce(&self, uri: &Uri) -> Option<Arc<str>> {
        let origin = Origin::of(uri)?;
        let nonces = self.inner.nonces.read().unwrap_or_else(|e| e.into_inner());
        nonces.get(&origin).cloned()
    }

    /// Learn the `DPoP-Nonce` of a response from `uri`'s origin. Returns whether it is new: a
    /// request refused with `use_dpop_nonce` is worth a replay only then.
    pub fn observe(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        let Some(nonce) = headers.get(&DPOP_NONCE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(origin) = Origin::of(uri) else {
            return false;
        };
        if self.nonce(uri).is_some_and(|known| known.as_ref() == nonce) {
            return false;
        }
        let mut nonces = self.inner.nonces.write().unwrap_or_else(|e| e.into_inner());
        nonces.insert(origin, Arc::from(nonce));
        true
    }
}

impl fmt::Debug for Dpop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dpop")
            .field("key", &self.inner.key)
            .field("proofs", &self.proofs())
            .field("nonce_replays", &self.nonce_replays())
            .finish_non_exhaustive()
    }
}

/// Whether a resource server refused a request for want of a (new) nonce: `401` with a `DPoP`
/// challenge saying `error="use_dpop_nonce"` (RFC 9449 section 9). Such a refusal says nothing
/// about the token, which is kept.
pub fn asks_for_nonce(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED
        && challenges(headers).iter().any(|challenge| {
            challenge.is("dpop") && challenge.param("error") == Some("use_dpop_nonce")
        })
}

/// `ath`: base64url of the SHA-256 of the access token.
pub fn access_token_hash(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha256(access_token.as_bytes()))
}

fn sha256(input: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    fn decode_json(segment: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    }

    /// The claims of a proof.
    fn claims_of(proof: &HeaderValue) -> serde_json::Value {
        decode_json(proof.to_str().unwrap().split('.').nth(1).unwrap())
    }

    #[test]
    fn a_proof_is_a_signed_jwt_naming_the_request() {
        let dpop = Dpop::generate().unwrap();
        let uri: Uri = "https://API.example.com:8443/v1/contacts?page=2#top"
            .parse()
            .unwrap();
        let proof = dpop.proof(&Method::POST, &uri, Some("tok")).unwrap();
        assert!(!proof.is_sensitive());
        let text = proof.to_str().unwrap();
        let parts: Vec<&str> = text.split('.').collect();
        assert_eq!(parts.len(), 3);

        let header = decode_json(parts[0]);
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["jwk"]["kty"], "EC");
        assert_eq!(header["jwk"]["crv"], "P-256");
        assert!(header["jwk"].get("d").is_none(), "no private part");

        let claims = decode_json(parts[1]);
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://API.example.com:8443/v1/contacts");
        assert_eq!(claims["ath"], access_token_hash("tok"));
        assert!(claims.get("nonce").is_none());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(claims["iat"].as_u64().unwrap().abs_diff(now) <= 5);

        // The signature verifies with the embedded public key.
        let x = URL_SAFE_NO_PAD
            .decode(header["jwk"]["x"].as_str().unwrap())
            .unwrap();
        let y = URL_SAFE_NO_PAD
            .decode(header["jwk"]["y"].as_str().unwrap())
            .unwrap();
        let point = [&[4u8][..], &x, &y].concat();
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &signature)
            .expect("the signature verifies");
        // And a tampered payload does not.
        let tampered = format!("{}.{}x", parts[0], parts[1]);
        assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(tampered.as_bytes(), &signature)
            .is_err());
    }

    #[test]
    fn every_proof_has_its_own_jti() {
        let dpop = Dpop::generate().unwrap();
        let uri: Uri = "https://api.example.com/".parse().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let proof = dpop.proof(&Method::GET, &uri, None).unwrap();
            let claims = claims_of(&proof);
            assert!(claims.get("ath").is_none());
            assert!(seen.insert(claims["jti"].as_str().unwrap().to_owned()));
        }
        assert_eq!(dpop.proofs(), 1000);
        // Another instance of the same key does not repeat them.
        let twin = Dpop::new(dpop.key().clone());
        let claims = claims_of(&twin.proof(&Method::GET, &uri, None).unwrap());
        assert!(!seen.contains(claims["jti"].as_str().unwrap()));
    }

    #[test]
    fn nonces_are_remembered_per_origin() {
        let dpop = Dpop::generate().unwrap();
        let api: Uri = "https://api.example.com/a".parse().unwrap();
        let same_origin: Uri = "https://API.example.com:443/b?c".parse().unwrap();
        let idp: Uri = "https://login.example.com/token".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(DPOP_NONCE, HeaderValue::from_static("n-1"));
        assert!(dpop.observe(&api, &headers));
        assert!(!dpop.observe(&same_origin, &headers), "not new");
        assert_eq!(dpop.nonce(&same_origin).as_deref(), Some("n-1"));
        assert_eq!(dpop.nonce(&idp), None);
        let claims = claims_of(&dpop.proof(&Method::GET, &same_origin, None).unwrap());
        assert_eq!(claims["nonce"], "n-1");
        headers.insert(DPOP_NONCE, HeaderValue::from_static("n-2"));
        assert!(dpop.observe(&api, &headers));
        assert_eq!(dpop.nonce(&api).as_deref(), Some("n-2"));
        assert!(!dpop.observe(&api, &HeaderMap::new()));
    }

    #[test]
    fn a_relative_uri_cannot_be_proven() {
        let dpop = Dpop::generate().unwrap();
        let uri: Uri = "/contacts".parse().unwrap();
        assert_eq!(
            dpop.proof(&Method::GET, &uri, None).unwrap_err(),
            DpopError::RelativeUri
        );
    }

    #[test]
    fn keys_load_from_pkcs8_and_jwk_with_one_thumbprint() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let from_der = DpopKey::from_pkcs8_der(pkcs8.as_ref()).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let from_pem = DpopKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(from_der.thumbprint(), from_pem.thumbprint());
        assert_eq!(from_der.thumbprint().len(), 43, "base64url of 32 bytes");

        // The same key as a private JWK: d is the last 32 bytes of ring's PKCS#8 private key
        // field; take it from the DER by its position after the OCTET STRING header.
        let der = pkcs8.as_ref();
        let at = der
            .windows(2)
            .position(|w| w == [0x04, 0x20])
            .expect("the private key octet string");
        let d = &der[at + 2..at + 34];
        let public: serde_json::Value = serde_json::from_str(from_der.public_jwk()).unwrap();
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": public["x"], "y": public["y"],
            "d": URL_SAFE_NO_PAD.encode(d),
        });
        let from_jwk = DpopKey::from_jwk(&jwk.to_string()).unwrap();
        assert_eq!(from_jwk.thumbprint(), from_der.thumbprint());

        assert!(matches!(
            DpopKey::from_pkcs8_der(b"nonsense"),
            Err(DpopError::InvalidKey(_))
        ));
        assert!(matches!(
            DpopKey::from_jwk(r#"{"kty":"RSA"}"#),
            Err(DpopError::InvalidKey(_))
        ));
        let mut wrong = jwk.clone();
        wrong["d"] = URL_SAFE_NO_PAD.encode([7u8; 32]).into();
        assert!(matches!(
            DpopKey::from_jwk(&wrong.to_string()),
            Err(DpopError::InvalidKey(_))
        ));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let dpop = Dpop::generate().unwrap();
        let shown = format!("{dpop:?}");
        assert!(shown.contains(dpop.key().thumbprint()));
        let public: serde_json::Value = serde_json::from_str(dpop.key().public_jwk()).unwrap();
        assert!(!shown.contains(public["x"].as_str().unwrap()));
    }

    #[test]
    fn only_a_dpop_challenge_for_a_nonce_asks_for_one() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="use_dpop_nonce", error_description="x""#),
        );
        assert!(asks_for_nonce(StatusCode::UNAUTHORIZED, &headers));
        assert!(!asks_for_nonce(StatusCode::BAD_REQUEST, &headers));
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="invalid_token""#),
        );
        assert!(!asks_for_nonce(StatusCode::UNAUTHORIZED, &headers));
    }

    #[test]
    fn the_access_token_hash_is_rfc_9449s() {
        // RFC 9449 section 7.1 example.
        assert_eq!(
            access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }
}
