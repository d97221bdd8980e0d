//! A copy of a request's head for a possible replay, in one allocation.
//!
//! A replay needs the method, URI, version, headers and extensions of the request the inner
//! service consumed. Cloning them (`Method`, `Uri`, `HeaderMap`, `Extensions`) is cheap in bytes
//! but not in allocations: `HeaderMap::clone` allocates its index table and its entries, and the
//! first clone of a `Bytes` built from a `Vec` (every header value and origin-form URI a program
//! builds at runtime) *promotes* it to a shared allocation. That is about six `malloc`/`free`
//! pairs for a GET with two headers, on every request, for a replay that almost never happens.
//!
//! [`RequestHead::capture`] copies the bytes of the URI and of every header into one buffer
//! instead, sized up front, so a capture is one allocation whatever the number of headers, and
//! the request's own values stay unshared. [`RequestHead::into_parts`], the slow path of a
//! replay, parses them back: header values become slices of that one buffer (zero-copy), names
//! and URI components are parsed again.
//!
//! The method and the extensions are kept as clones: a standard method, or an extension method
//! of up to 15 bytes, clones without allocating, and empty extensions (the common case) are a
//! null pointer.
//!
//! This module only names `http`, `bytes` and `std`, so the benches compile this same file
//! (`#[path]`) to measure it.

use std::fmt;
use std::mem::size_of;
use std::ops::Range;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{Extensions, HeaderMap, Method, Request, Uri, Version};

/// Bytes of one length in the buffer.
const LEN: usize = size_of::<usize>();
/// Bytes of the record that precedes each header's name and value: a flag byte and two lengths.
const RECORD: usize = 1 + 2 * LEN;

/// Flags of the URI prefix: which components the URI has.
const HAS_SCHEME: u8 = 1;
const HAS_AUTHORITY: u8 = 1 << 1;
const HAS_PATH_AND_QUERY: u8 = 1 << 2;
/// Flag of a header record: the value is marked sensitive.
const SENSITIVE: u8 = 1;

/// What a replay needs of a request's head, its URI and headers as bytes in one buffer.
///
/// Buffer layout (lengths are native-endian `usize`, so no length can be out of range):
///
/// ```text
/// flags: u8, scheme_len, authority_len, path_and_query_len, header_count,
/// scheme, authority, path_and_query,
/// per header, in `HeaderMap::iter` order: flags: u8, name_len, value_len, name, value
/// ```
pub(crate) struct RequestHead {
    method: Method,
    version: Version,
    extensions: Extensions,
    buf: Box<[u8]>,
}

impl RequestHead {
    /// Copies the head of a request about to be sent. One allocation for the URI and headers,
    /// whatever their number; none for a standard method or empty extensions.
    pub(crate) fn capture(parts: &Parts) -> Self {
        let uri = &parts.uri;
        let scheme = uri.scheme_str();
        let authority = uri.authority().map(Authority::as_str);
        // `as_str` says "/" for an empty path; only a URI with no scheme can have one that
        // is observably empty (`Uri::from_parts` of nothing), so keep that one absent.
        let path_and_query = uri
            .path_and_query()
            .filter(|_| !uri.path().is_empty())
            .map(PathAndQuery::as_str);
        let str_len = |part: Option<&str>| part.map_or(0, str::len);

        // One pass to size the buffer exactly, one to fill it: no reallocation.
        let mut size = 1 + 4 * LEN + str_len(scheme) + str_len(authority) + str_len(path_and_query);
        let mut count = 0usize;
        for (name, value) in &parts.headers {
            size += RECORD + name.as_str().len() + value.len();
            count += 1;
        }

        let mut buf = Vec::with_capacity(size);
        let mut flags = 0;
        if scheme.is_some() {
            flags |= HAS_SCHEME;
        }
        if authority.is_some() {
            flags |= HAS_AUTHORITY;
        }
        if path_and_query.is_some() {
            flags |= HAS_PATH_AND_QUERY;
        }
        buf.push(flags);
        for len in [
            str_len(scheme),
            str_len(authority),
            str_len(path_and_query),
            count,
        ] {
            buf.extend_from_slice(&len.to_ne_bytes());
        }
        for part in [scheme, authority, path_and_query].into_iter().flatten() {
            buf.extend_from_slice(part.as_bytes());
        }
        for (name, value) in &parts.headers {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            let mut record = [0u8; RECORD];
            record[0] = if value.is_sensitive() { SENSITIVE } else { 0 };
            record[1..1 + LEN].copy_from_slice(&name.len().to_ne_bytes());
            record[1 + LEN..].copy_from_slice(&value_bytes.len().to_ne_bytes());
            buf.extend_from_slice(&record);
            buf.extend_from_slice(name);
            buf.extend_from_slice(value_bytes);
        }

        RequestHead {
            method: parts.method.clone(),
            version: parts.version,
            extensions: parts.extensions.clone(),
            // `size` is exact, so this does not reallocate.
            buf: buf.into_boxed_slice(),
        }
    }

    /// The head as it was captured: equal method, URI, version, headers (same order, duplicates
    /// kept, sensitive flags kept) and a clone of the extensions.
    ///
    /// # Errors
    ///
    /// None for a head captured by [`RequestHead::capture`]: every part is parsed again from
    /// bytes that came from a valid part of the same kind. The `Result` exists because `http`
    /// has no safe constructor that skips validation (`HeaderValue::from_maybe_shared_unchecked`
    /// is `unsafe`, and this crate forbids `unsafe`); a caller should treat the error as "not
    /// replayable", never panic on it.
    pub(crate) fn into_parts(self) -> Result<Parts, InvalidHead> {
        let RequestHead {
            method,
            version,
            extensions,
            buf,
        } = self;
        let bytes = Bytes::from(buf);
        let mut reader = Reader {
            bytes: &bytes,
            at: 0,
        };

        let flags = reader.byte()?;
        let scheme_len = reader.len()?;
        let authority_len = reader.len()?;
        let path_and_query_len = reader.len()?;
        let count = reader.len()?;

        let mut uri_parts = uri::Parts::default();
        let scheme = reader.take(scheme_len)?;
        if flags & HAS_SCHEME != 0 {
            let scheme = Scheme::try_from(&bytes[scheme]).map_err(|_| InvalidHead("scheme"))?;
            uri_parts.scheme = Some(scheme);
        }
        let authority = reader.take(authority_len)?;
        if flags & HAS_AUTHORITY != 0 {
            let authority = Authority::from_maybe_shared(bytes.slice(authority))
                .map_err(|_| InvalidHead("authority"))?;
            uri_parts.authority = Some(authority);
        }
        let path_and_query = reader.take(path_and_query_len)?;
        if flags & HAS_PATH_AND_QUERY != 0 {
            let path_and_query = PathAndQuery::from_maybe_shared(bytes.slice(path_and_query))
                .map_err(|_| InvalidHead("path and query"))?;
            uri_parts.path_and_query = Some(path_and_query);
        }
        let uri = Uri::from_parts(uri_parts).map_err(|_| InvalidHead("uri"))?;

        let mut headers =
            HeaderMap::try_with_capacity(count).map_err(|_| InvalidHead("header count"))?;
        for _ in 0..count {
            let flags = reader.byte()?;
            let name_len = reader.len()?;
            let value_len = reader.len()?;
            let name = reader.take(name_len)?;
            let value = reader.take(value_len)?;
            let name =
                HeaderName::from_bytes(&bytes[name]).map_err(|_| InvalidHead("header name"))?;
            let mut value = HeaderValue::from_maybe_shared(bytes.slice(value))
                .map_err(|_| InvalidHead("header value"))?;
            value.set_sensitive(flags & SENSITIVE != 0);
            headers
                .try_append(name, value)
                .map_err(|_| InvalidHead("header count"))?;
        }

        // `Parts` has a private field: start from a request's and fill it in.
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = method;
        parts.uri = uri;
        parts.version = version;
        parts.headers = headers;
        parts.extensions = extensions;
        Ok(parts)
    }

    /// [`RequestHead::into_parts`] with a body.
    pub(crate) fn into_request<B>(self, body: B) -> Result<Request<B>, InvalidHead> {
        Ok(Request::from_parts(self.into_parts()?, body))
    }
}

/// Neither the URI nor header values: either may carry a credential.
impl fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("version", &self.version)
            .field("bytes", &self.buf.len())
            .finish_non_exhaustive()
    }
}

/// A captured head that did not parse back; see [`RequestHead::into_parts`] for why it cannot
/// happen. Names the part, never its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidHead(&'static str);

impl fmt::Display for InvalidHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a captured request head did not restore: invalid {}",
            self.0
        )
    }
}

impl std::error::Error for InvalidHead {}

/// Reads the buffer front to back; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<Range<usize>, InvalidHead> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(InvalidHead("buffer"))?;
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn byte(&mut self) -> Result<u8, InvalidHead> {
        let range = self.take(1)?;
        Ok(self.bytes[range.start])
    }

    fn len(&mut self) -> Result<usize, InvalidHead> {
        let range = self.take(LEN)?;
        let bytes = self.bytes[range]
            .try_into()
            .map_err(|_| InvalidHead("buffer"))?;
        Ok(usize::from_ne_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;
    use proptest::prelude::*;

    /// Everything `Parts` holds, in a form that compares exactly: header order, duplicates and
    /// sensitive flags included.
    fn observable(parts: &Parts) -> impl PartialEq + fmt::Debug {
        let headers: Vec<(String, Vec<u8>, bool)> = parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    value.as_bytes().to_vec(),
                    value.is_sensitive(),
                )
            })
            .collect();
        let uri = &parts.uri;
        (
            parts.method.clone(),
            (
                uri.clone(),
                uri.to_string(),
                uri.scheme_str().map(str::to_owned),
                uri.authority().map(|a| a.as_str().to_owned()),
                uri.path_and_query().map(|p| p.as_str().to_owned()),
                uri.path().to_owned(),
                uri.query().map(str::to_owned),
            ),
            parts.version,
            headers,
            parts.headers.len(),
            parts.headers.keys_len(),
        )
    }

    fn round_trip(parts: &Parts) -> Parts {
        RequestHead::capture(parts).into_parts().unwrap()
    }

    fn assert_round_trip(parts: &Parts) {
        assert_eq!(observable(&round_trip(parts)), observable(parts));
    }

    fn parts_of(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    #[test]
    fn every_uri_form() {
        for (method, uri) in [
            (Method::GET, "/a?b"),
            (Method::GET, "/"),
            (Method::GET, "/path/only"),
            (Method::GET, "/?"),
            (Method::GET, "http://h:1/p?q"),
            (Method::GET, "https://example.com"),
            (Method::GET, "http://h?q"),
            (Method::GET, "https://user@h:8443/p/%20?x=1&y"),
            (Method::GET, "ftp+x://[::1]:21/f"),
            (Method::CONNECT, "example.com:443"),
            (Method::CONNECT, "[::1]:8080"),
            (Method::OPTIONS, "*"),
            (Method::GET, "/caf\u{e9}?\u{e9}"),
        ] {
            let uri: Uri = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
            let request = Request::builder().method(method).uri(uri).body(()).unwrap();
            assert_round_trip(&parts_of(request));
        }
        // The empty URI of `Uri::default()` and of `Parts` with no components.
        assert_round_trip(&parts_of(Request::new(())));
        let empty = Uri::from_parts(uri::Parts::default()).unwrap();
        assert_round_trip(&parts_of(Request::builder().uri(empty).body(()).unwrap()));
    }

    #[test]
    fn extension_methods_and_versions() {
        for method in [
            "PURGE",
            "PROPFIND",
            "X-VERY-LONG-EXTENSION-METHOD-NAME",
            "QUERY",
        ] {
            for version in [
                Version::HTTP_09,
                Version::HTTP_10,
                Version::HTTP_11,
                Version::HTTP_2,
                Version::HTTP_3,
            ] {
                let request = Request::builder()
                    .method(method)
                    .version(version)
                    .uri("/x")
                    .body(())
                    .unwrap();
                assert_round_trip(&parts_of(request));
            }
        }
    }

    #[test]
    fn duplicates_in_order_sensitive_flags_and_custom_names() {
        let mut secret = HeaderValue::from_static("Bearer old-token");
        secret.set_sensitive(true);
        let mut request = Request::get("http://api.example/contacts?page=1")
            .header(header::ACCEPT, "application/json")
            .header("x-trace", "1")
            .header(header::ACCEPT, "text/plain")
            .header("x-empty", "")
            .header(
                "x-obs-text",
                HeaderValue::from_bytes(b"caf\xe9\tx").unwrap(),
            )
            .header("x-trace", "2")
            .body(())
            .unwrap();
        request.headers_mut().insert(header::AUTHORIZATION, secret);
        let parts = parts_of(request);
        let restored = round_trip(&parts);
        assert_eq!(observable(&restored), observable(&parts));
        let accept: Vec<_> = restored.headers.get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["application/json", "text/plain"]);
        assert!(restored.headers[header::AUTHORIZATION].is_sensitive());
        assert!(!restored.headers["x-trace"].is_sensitive());
    }

    #[test]
    fn values_are_slices_of_one_buffer() {
        let request = Request::get("/x")
            .header("a", "first")
            .header("b", "second")
            .body(())
            .unwrap();
        let head = RequestHead::capture(&parts_of(request));
        let restored = head.into_parts().unwrap();
        let a = restored.headers["a"].as_bytes().as_ptr() as usize;
        let b = restored.headers["b"].as_bytes().as_ptr() as usize;
        // "first", then the record of "b" and its name, then "second".
        assert_eq!(b - a, "first".len() + RECORD + "b".len());
    }

    #[test]
    fn extensions_are_cloned() {
        #[derive(Clone, Debug, PartialEq)]
        struct Marker(u32);
        let mut request = Request::get("/").body(()).unwrap();
        request.extensions_mut().insert(Marker(7));
        let parts = parts_of(request);
        let restored = round_trip(&parts);
        assert_eq!(restored.extensions.get::<Marker>(), Some(&Marker(7)));
        assert_eq!(parts.extensions.get::<Marker>(), Some(&Marker(7)));
    }

    #[test]
    fn capture_allocates_exactly_the_bytes_it_needs() {
        let request = Request::get("http://h:1/p?q")
            .header("accept", "*/*")
            .body(())
            .unwrap();
        let head = RequestHead::capture(&parts_of(request));
        let expected = 1 + 4 * LEN + "http".len() + "h:1".len() + "/p?q".len();
        assert_eq!(
            head.buf.len(),
            expected + RECORD + "accept".len() + "*/*".len()
        );
    }

    #[test]
    fn debug_shows_neither_uri_nor_values() {
        let mut secret = HeaderValue::from_static("Bearer s3cr3t");
        secret.set_sensitive(true);
        let request = Request::get("http://h/?api_key=k3y")
            .header(header::AUTHORIZATION, secret)
            .header("x-plain", "pl41n")
            .body(())
            .unwrap();
        let debug = format!("{:?}", RequestHead::capture(&parts_of(request)));
        for leak in ["s3cr3t", "k3y", "pl41n"] {
            assert!(!debug.contains(leak), "{debug}");
        }
    }

    #[test]
    fn a_corrupt_buffer_is_an_error_not_a_panic() {
        let head = RequestHead::capture(&parts_of(
            Request::get("/").header("a", "b").body(()).unwrap(),
        ));
        let mut truncated = head.buf.to_vec();
        truncated.pop();
        let head = RequestHead {
            buf: truncated.into_boxed_slice(),
            ..head
        };
        assert_eq!(head.into_parts().unwrap_err(), InvalidHead("buffer"));
    }

    fn method() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::GET),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::DELETE),
            Just(Method::HEAD),
            Just(Method::OPTIONS),
            Just(Method::CONNECT),
            Just(Method::PATCH),
            Just(Method::TRACE),
            // Inline (up to 15 bytes) and allocated extension methods.
            "[A-Z!#$%&'*+.^_`|~0-9-]{1,40}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
        ]
    }

    fn uri() -> impl Strategy<Value = Uri> {
        let path = "(/[a-zA-Z0-9._~%!$&'()*+,;=:@\u{e9}-]{0,12}){0,4}";
        let query = "(\\?[a-zA-Z0-9._~%!$&'()*+,;=:@/?\u{e9}-]{0,16})?";
        let host =
            "([a-z0-9-]{1,12}(\\.[a-z0-9-]{1,8}){0,2}|\\[::1\\]|127\\.0\\.0\\.1)(:[0-9]{1,5})?";
        prop_oneof![
            (path, query).prop_map(|(p, q)| format!("{}{q}", if p.is_empty() { "/" } else { &p })),
            ("(http|https|[a-z][a-z0-9+.-]{0,8})", host, path, query)
                .prop_map(|(s, h, p, q)| format!("{s}://{h}{p}{q}")),
            host.prop_map(|h| h.to_owned()),
            Just("*".to_owned()),
        ]
        .prop_filter_map("a URI http accepts", |s| s.parse::<Uri>().ok())
    }

    fn header() -> impl Strategy<Value = (HeaderName, HeaderValue)> {
        let name = prop_oneof![
            Just(header::ACCEPT),
            Just(header::AUTHORIZATION),
            Just(header::CONTENT_TYPE),
            Just(header::USER_AGENT),
            Just(header::COOKIE),
            Just(header::HOST),
            "[a-z0-9!#$%&'*+.^_`|~-]{1,70}"
                .prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
        ];
        // Every byte a header value may hold: visible ASCII, space, tab, obs-text.
        let value = proptest::collection::vec(
            prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff],
            0..100,
        )
        .prop_map(|bytes| HeaderValue::from_bytes(&bytes).unwrap());
        (name, value, any::<bool>()).prop_map(|(name, mut value, sensitive)| {
            value.set_sensitive(sensitive);
            (name, value)
        })
    }

    fn version() -> impl Strategy<Value = Version> {
        prop_oneof![
            Just(Version::HTTP_09),
            Just(Version::HTTP_10),
            Just(Version::HTTP_11),
            Just(Version::HTTP_2),
            Just(Version::HTTP_3),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_is_exact(
            method in method(),
            uri in uri(),
            version in version(),
            headers in proptest::collection::vec(header(), 0..24),
            marker in proptest::option::of(any::<u64>()),
        ) {
            let mut request = Request::new(());
            *request.method_mut() = method;
            *request.uri_mut() = uri;
            *request.version_mut() = version;
            for (name, value) in headers {
                request.headers_mut().append(name, value);
            }
            if let Some(marker) = marker {
                request.extensions_mut().insert(marker);
            }
            let parts = parts_of(request);
            let restored = round_trip(&parts);
            prop_assert_eq!(observable(&restored), observable(&parts));
            prop_assert_eq!(restored.extensions.get::<u64>(), parts.extensions.get::<u64>());
        }
    }
}
