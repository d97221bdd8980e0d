//! How a job walks a paginated API: which request asks for the next page, where the records of
//! an answer are, and what marks the last page. Platform presets fill it in.
//!
//! Four styles cover what the platforms document:
//! - a page number, in the URL (`{page}`) or at a path of a JSON body (`paging.pageNumber`),
//!   until a page has no records or, with a page count in the answer, past `pageCount`
//!   (Genesys Cloud's `GET /api/v2/users`, its analytics details query);
//! - a record offset `{skip}`, advanced by the page size, until a page has no records
//!   (NICE CXone's `GET .../agents?skip={skip}&top={size}`);
//! - a cursor or next link read from each answer at a JSON pointer (`/cursor`, `/nextUri`),
//!   until an answer has none.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::ValueEnum;
use http::Method;
use serde_json::Value;

/// How the next page is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Style {
    /// A page number: `{page}` (from the first page number) or `{page0}` (from 0) in the URL,
    /// or the number at `--page-field` in the body
    Page,
    /// A record offset: `{skip}` in the URL (or at `--page-field`), advanced by the page size
    Skip,
    /// A cursor or next link at the `--cursor` JSON pointer of each answer: a URL or a path is
    /// fetched as it is, any other value goes into `{cursor}` (or at `--page-field`)
    Cursor,
}

/// Ready-made settings for the jobs the platforms document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Genesys Cloud `GET /api/v2/users?pageSize={size}&pageNumber={page}`, records in
    /// `/entities`, until `pageNumber > pageCount`
    GenesysUsers,
    /// Genesys Cloud `POST /api/v2/analytics/conversations/details/query`, the page number at
    /// `paging.pageNumber` of the body (the last 7 days), records in `/conversations`, until a
    /// page has none
    GenesysConversations,
    /// NICE CXone `GET .../agents?skip={skip}&top={size}`, records in `/agents`, until the list
    /// is empty (or the API answers 204)
    CxoneAgents,
    /// Follow the `/nextUri` link of each answer (Genesys Cloud lists), records in `/entities`
    NextUri,
    /// An opaque `/cursor` in each answer put into `{cursor}` of the URL, records in `/items`
    Cursor,
}

impl Preset {
    /// The preset a URL asks for by its path, if any: what lets a job run with only a URL.
    pub fn for_url(url: &str) -> Option<Self> {
        let path = url.split(['?', '#']).next().unwrap_or(url);
        let path = path.trim_end_matches('/');
        if path.ends_with("/conversations/details/query") {
            Some(Self::GenesysConversations)
        } else if path.ends_with("/api/v2/users") {
            Some(Self::GenesysUsers)
        } else if path.ends_with("/agents") {
            Some(Self::CxoneAgents)
        } else {
            None
        }
    }

    /// The path and query of this job on the embedded test API (`tower_auth_refresh::testkit::Api`).
    pub fn embedded_path(self) -> &'static str {
        match self {
            Self::GenesysUsers => "/users",
            Self::GenesysConversations => "/conversations/query",
            Self::CxoneAgents => "/agents",
            Self::NextUri => "/users?pageSize={size}&pageNumber=1",
            Self::Cursor => "/items?limit={size}&cursor={cursor}",
        }
    }

    /// The paging of this job at `url` with `page_size` records a page; a URL that already says
    /// where the page goes (`{page}`, `{skip}`, ...) keeps its own query.
    pub fn paging(self, url: &str, page_size: usize) -> Paging {
        let with_query = |query: &str| {
            if has_placeholder(url) {
                url.to_owned()
            } else {
                let joiner = if url.contains('?') { '&' } else { '?' };
                format!("{url}{joiner}{query}")
            }
        };
        let base = Paging::new(url, page_size);
        match self {
            Self::GenesysUsers => Paging {
                url: with_query("pageSize={size}&pageNumber={page}"),
                records: Some("/entities".to_owned()),
                page_count: Some("/pageCount".to_owned()),
                ..base
            },
            Self::GenesysConversations => Paging {
                method: Method::POST,
                body: Some(serde_json::json!({
                    "interval": last_days(7),
                    "order": "asc",
                    "paging": { "pageSize": page_size, "pageNumber": 1 },
                })),
                field: Some("paging.pageNumber".to_owned()),
                records: Some("/conversations".to_owned()),
                ..base
            },
            Self::CxoneAgents => Paging {
                url: with_query("skip={skip}&top={size}"),
                style: Style::Skip,
                records: Some("/agents".to_owned()),
                ..base
            },
            Self::NextUri => Paging {
                style: Style::Cursor,
                cursor: "/nextUri".to_owned(),
                records: Some("/entities".to_owned()),
                ..base
            },
            Self::Cursor => Paging {
                style: Style::Cursor,
                records: Some("/items".to_owned()),
                ..base
            },
        }
    }
}

fn has_placeholder(url: &str) -> bool {
    ["{page}", "{page0}", "{skip}", "{cursor}"]
        .iter()
        .any(|placeholder| url.contains(placeholder))
}

/// `<7 days ago>/<now>` as ISO 8601 UTC, the interval a details query needs.
fn last_days(days: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let from = now.saturating_sub(days * 86_400);
    format!("{}/{}", iso8601(from), iso8601(now))
}

/// Seconds since the epoch as `YYYY-MM-DDThh:mm:ssZ` (Howard Hinnant's civil-from-days).
fn iso8601(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let time = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3_600,
        time / 60 % 60,
        time % 60
    )
}

/// Where the next page is: the page's index (from 0) for the page and skip styles, the cursor
/// of the last answer for the cursor style (`None`: the first page).
#[derive(Clone, Debug)]
pub enum Position {
    /// The page with this index, from 0.
    Index(usize),
    /// After this cursor (`None`: the first page).
    Cursor(Option<String>),
}

/// How a job walks a paginated API.
#[derive(Clone, Debug)]
pub struct Paging {
    /// The method of every request.
    pub method: Method,
    /// The URL, with `{page}`, `{page0}`, `{skip}`, `{size}` or `{cursor}` where the style puts
    /// its value.
    pub url: String,
    /// A JSON body sent with every request (`--page-field` says where the page goes in it).
    pub body: Option<Value>,
    /// How the next page is asked for.
    pub style: Style,
    /// A dotted path in the body (`paging.pageNumber`) that takes the page number, offset or
    /// cursor instead of the URL.
    pub field: Option<String>,
    /// The number of the first page in the page style (default 1).
    pub first_page: usize,
    /// The JSON pointer of the next cursor or link (cursor style).
    pub cursor: String,
    /// The JSON pointer of the records array (`None`: the answer itself if it is an array, else
    /// its first field that is an array).
    pub records: Option<String>,
    /// The JSON pointer of the page count: no page past it is asked for.
    pub page_count: Option<String>,
    /// Records per page: `{size}`, and the step of `{skip}`.
    pub page_size: usize,
    /// Fetch at most this many pages (`None`: until the end marker).
    pub max_pages: Option<usize>,
}

/// What one answer says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The records of the page.
    pub records: Vec<Value>,
    /// The page count it announces, if the paging reads one.
    pub page_count: Option<usize>,
    /// The next cursor or link, if the style is cursor and the answer has one.
    pub next: Option<String>,
}

impl Paging {
    /// GET `url` page by page, the page number (from 1) in its `{page}` (or the offset in
    /// `{skip}`, the cursor at `/cursor` in `{cursor}`), until a page has no records.
    pub fn new(url: &str, page_size: usize) -> Self {
        let style = if url.contains("{cursor}") {
            Style::Cursor
        } else if url.contains("{skip}") {
            Style::Skip
        } else {
            Style::Page
        };
        Self {
            method: Method::GET,
            url: url.to_owned(),
            body: None,
            style,
            field: None,
            first_page: 1,
            cursor: "/cursor".to_owned(),
            records: None,
            page_count: None,
            page_size,
            max_pages: None,
        }
    }

    /// Whether the pages can be told apart: a placeholder in the URL, a body field, or a cursor.
    pub fn says_where_the_page_goes(&self) -> bool {
        self.style == Style::Cursor || self.field.is_some() || has_placeholder(&self.url)
    }

    /// The method, URL and body that ask for the page at `position`.
    pub fn request(&self, position: &Position) -> Result<(Method, String, Option<Value>), String> {
        let size = self.page_size.to_string();
        let mut url = self.url.replace("{size}", &size);
        let mut body = self.body.clone();
        let value = match position {
            Position::Index(index) => {
                let (placeholder, number) = match self.style {
                    Style::Skip => ("{skip}", index * self.page_size),
                    _ => ("{page}", self.first_page + index),
                };
                url = url
                    .replace("{page0}", &index.to_string())
                    .replace(placeholder, &number.to_string());
                Value::from(number)
            }
            Position::Cursor(None) => {
                url = url.replace("{cursor}", "");
                return Ok((self.method.clone(), url, body));
            }
            Position::Cursor(Some(next)) => {
                if next.starts_with("http://") || next.starts_with("https://") {
                    return Ok((self.method.clone(), next.clone(), body));
                }
                if next.starts_with('/') {
                    return Ok((self.method.clone(), origin(&self.url)? + next, body));
                }
                let encoded = percent_encode(next);
                if url.contains("{cursor}") {
                    url = url.replace("{cursor}", &encoded);
                } else if self.field.is_none() {
                    let joiner = if url.contains('?') { '&' } else { '?' };
                    url = format!("{url}{joiner}cursor={encoded}");
                }
                Value::from(next.as_str())
            }
        };
        if let Some(field) = &self.field {
            let body = body.get_or_insert_with(|| Value::Object(Default::default()));
            set_path(body, field, value)?;
        }
        Ok((self.method.clone(), url, body))
    }

    /// Read an answer's body (empty: a 204, no records).
    pub fn parse(&self, body: &Bytes) -> Result<Parsed, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Parsed::default());
        }
        let json: Value = serde_json::from_slice(body)
            .map_err(|error| format!("the answer is not JSON: {error}"))?;
        let records = match &self.records {
            // An absent array is an empty page: past its end, a details query leaves it out.
            Some(pointer) => match json.pointer(pointer) {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(records)) => records.clone(),
                Some(_) => return Err(format!("{pointer} of the answer is not an array")),
            },
            None => match &json {
                Value::Array(records) => records.clone(),
                Value::Object(fields) => fields
                    .values()
                    .find_map(|value| value.as_array().cloned())
                    .unwrap_or_default(),
                _ => return Err("the answer holds no array of records".to_owned()),
            },
        };
        let page_count = match &self.page_count {
            Some(pointer) => json
                .pointer(pointer)
                .and_then(Value::as_u64)
                .and_then(|count| usize::try_from(count).ok()),
            None => None,
        };
        let next = match self.style {
            Style::Cursor => match json.pointer(&self.cursor) {
                Some(Value::String(next)) if !next.is_empty() => Some(next.clone()),
                Some(Value::Number(next)) => Some(next.to_string()),
                _ => None,
            },
            _ => None,
        };
        Ok(Parsed {
            records,
            page_count,
            next,
        })
    }
}

/// `scheme://authority` of `url`, for a next link given as a path.
fn origin(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .replace(['{', '}'], "")
        .parse()
        .map_err(|error| format!("{url}: {error}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => Ok(format!("{scheme}://{authority}")),
        _ => Err(format!("{url} is not an absolute URL")),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Set `value` at the dotted `path` of `body`, making the objects on the way.
fn set_path(body: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut at = body;
    for key in path.split('.') {
        let Value::Object(fields) = at else {
            return Err(format!("the body has no object where {path} goes"));
        };
        at = fields.entry(key.to_owned()).or_insert(Value::Null);
    }
    *at = value;
    Ok(())
}
