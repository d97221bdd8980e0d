//! A paginated batch that outlives its tokens, the job this crate exists for.
//!
//! `cargo run --example batch` starts an identity provider and a paginated API on loopback (the
//! same real hyper servers the tests use) and fetches every page through the whole stack:
//! `Timeout` -> retry of 429/503 (`RetryPolicy`) -> `AuthLayer` -> rate limit -> concurrency
//! limit -> hyper-util client. Tokens live 3 seconds, every 50th request is throttled with a
//! `Retry-After`, and halfway through the API forgets every token it issued. A progress bar shows
//! the pages, and a table at the end what it took: token requests, 401 replays, 429 retries,
//! failures (the exit status is non-zero if any page failed). `--help` lists the options.
//!
//! Against a real platform instead, set `API_URL`, `CLIENT_ID`, `CLIENT_SECRET` (environment
//! only), optionally `SCOPE` and `CLIENT_AUTH=post`, and one of `TOKEN_URL`, `GENESYS_REGION` (a
//! Genesys Cloud region such as `eu-west-1`, or its domain such as `mypurecloud.ie`), the
//! `CXONE_ACCESS_KEY_ID` and `CXONE_ACCESS_KEY_SECRET` of a NICE CXone API user (the password
//! grant through discovery at `ISSUER`, by default CXone's), or `ISSUER` alone (client
//! credentials through discovery). Each also works as a flag, but for the secrets. With a Genesys
//! region or a CXone access key, `API_URL` may be a path: Genesys's API host follows from the
//! region, CXone's from the tenant the first token names, so a user never names their cluster.
//! A Genesys run keeps under the per-token request limit (`--per-token-limit`, 300 a minute by
//! default, shared out among the workers of a fleet). The job walks the pages until
//! the answers mark the end: a preset (`--preset`, or found from the URL's path: Genesys users,
//! the Genesys analytics details query, CXone agents) says how, and `--pagination`, `--method`,
//! `--body`, `--page-field`, `--records-at`, `--page-count`, `--cursor` and `--pages` say it for
//! any other API. See README.md.
//!
//! With `--features redis`, `--workers N --redis URL` runs a fleet instead: this process starts
//! the servers (or takes the real platform's options) and N copies of itself, each fetching every
//! N-th page with a `RedisStore` under its token cache, and reports for the whole fleet: one
//! token request per expiry plus the first, not that many per worker. That is `fleet.rs`.
//!
//! The job itself is in `job.rs`, which `tests/batch_job.rs` runs too.

#[cfg(feature = "redis")]
mod fleet;
mod job;

use std::cell::Cell;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use tower::BoxError;
use tower_auth_refresh::oauth2::{genesys, nice_cxone, ClientAuth, Secret};

use job::paging::{Paging, Preset, Style};
use job::{JobConfig, Page, Platform, Report, Shard, TokenEndpoint};

const AFTER_HELP: &str = "\
Without --api-url (API_URL), the job runs against an identity provider and a paginated API it
starts on 127.0.0.1, and needs no network.

With it, the job runs against a real platform: CLIENT_ID and CLIENT_SECRET (the secret from the
environment only), and one of TOKEN_URL, GENESYS_REGION, a CXone access key or ISSUER. Genesys
Cloud (the API host follows from the region; at most 300 requests a minute per token):

  GENESYS_REGION=eu-west-1 CLIENT_ID=... CLIENT_SECRET=... \\
  API_URL=/api/v2/users cargo run --example batch

NICE CXone, a back-end application with an API user's access key (the API host follows from the
tenant the token names):

  CLIENT_ID=... CLIENT_SECRET=... CXONE_ACCESS_KEY_ID=... CXONE_ACCESS_KEY_SECRET=... \\
  API_URL=/inContactAPI/services/v31.0/agents cargo run --example batch

The URL's path picks a preset (Genesys users, .../conversations/details/query, CXone .../agents);
--preset, --pagination, --method, --body, --page-field, --records-at, --page-count and --cursor
describe any other API, for example a JSON body paged at paging.pageNumber:

  --method POST --body '{\"paging\":{\"pageSize\":100}}' --page-field paging.pageNumber \\
  --records-at /conversations

A fleet of worker processes sharing one token through Redis (needs the `redis` feature):

  cargo run --example batch --features redis -- --workers 4 --redis redis://127.0.0.1:6379/

Each worker fetches every 4th page with its own token cache over a RedisStore; the report counts
the token requests of the whole fleet: one per expiry plus the first, not that many per worker.
Set TOKEN_KEY (64 hex digits, environment only) to seal the tokens in Redis. With --api-url, the
workers run against the real platform instead.

The exit status is 1 if any page failed (or, in a fleet, any worker).";

/// A paginated batch that outlives its tokens, through the whole tower stack.
#[derive(Parser, Debug)]
#[command(name = "batch", after_help = AFTER_HELP)]
struct Args {
    /// Records the embedded API serves
    #[arg(long, env = "RECORDS", default_value_t = JobConfig::default().records)]
    records: usize,

    /// Records per page ({size} in the URL, the step of {skip}, the presets' page size)
    #[arg(long, env = "PAGE_SIZE", default_value_t = JobConfig::default().page_size,
          value_parser = at_least_one)]
    page_size: usize,

    /// Seconds the embedded identity provider's tokens live, announced in expires_in
    #[arg(long, value_name = "SECONDS", value_parser = seconds,
          default_value_t = JobConfig::default().token_lifetime.as_secs_f64())]
    token_lifetime: f64,

    /// Seconds the embedded API takes per request
    #[arg(long, value_name = "SECONDS", value_parser = seconds,
          default_value_t = JobConfig::default().latency.as_secs_f64())]
    latency: f64,

    /// The embedded API answers every n-th request with 429 (0: never)
    #[arg(long, value_name = "N", default_value_t = JobConfig::default().throttle_every)]
    throttle_every: usize,

    /// The Retry-After, in seconds, of the embedded API's 429s
    #[arg(long, value_name = "SECONDS", default_value_t = JobConfig::default().retry_after)]
    retry_after: u64,

    /// Pages (from 0) at which the embedded API forgets every token [default: the middle page;
    /// the flag alone: never]
    #[arg(long, value_name = "PAGE", value_delimiter = ',', num_args = 0..)]
    revoke_at: Option<Vec<usize>>,

    /// Worker tasks fetching pages at the same time (in each process, in a fleet)
    #[arg(long, env = "CONCURRENCY", default_value_t = JobConfig::default().concurrency,
          value_parser = at_least_one)]
    concurrency: usize,

    /// Requests per second, at most (0: no limit)
    #[arg(long, value_name = "PER_SECOND",
          default_value_t = JobConfig::default().rate.unwrap_or(0))]
    rate: u64,

    /// Seconds one page may take, retries, token refresh and 401 replay included
    #[arg(long, value_name = "SECONDS", value_parser = seconds,
          default_value_t = JobConfig::default().timeout.as_secs_f64())]
    timeout: f64,

    /// Retries of one page after 429 or 503
    #[arg(long, default_value_t = JobConfig::default().max_retries)]
    max_retries: u32,

    /// The longest Retry-After slept on; a 429 asking for more is a failure
    #[arg(long, value_name = "SECONDS", value_parser = seconds,
          default_value_t = JobConfig::default().max_retry_after.as_secs_f64())]
    max_retry_after: f64,

    /// Worker processes sharing one token through Redis, at least 2 (the fleet mode; feature
    /// `redis`)
    #[arg(long, value_name = "N", value_parser = at_least_two, help_heading = "Fleet")]
    workers: Option<usize>,

    /// The Redis the fleet shares its token through, such as redis://127.0.0.1:6379/ (a
    /// password in it is not shown)
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Fleet"
    )]
    redis: Option<String>,

    /// A worker of a fleet: fetch pages index, index + count, ... of the real-platform options
    /// and print JSON lines on stdout (what the fleet's parent process passes)
    #[arg(long, value_name = "INDEX/COUNT", hide = true)]
    shard: Option<Shard>,

    /// A real API instead of the embedded one; {page} is replaced by the page number (from
    /// --first-page; {page0}: from 0), {skip} by the offset, {size} by the page size, {cursor}
    /// by the last cursor
    #[arg(long, env = "API_URL", help_heading = "Real platform")]
    api_url: Option<String>,

    /// The job's pagination, method, body, records and end [default: from the URL's path; the
    /// embedded API: genesys-users]
    #[arg(long, env = "PRESET", value_enum, help_heading = "Paging")]
    preset: Option<Preset>,

    /// How the next page is asked for [default: the preset's, else from the URL's placeholders]
    #[arg(long, value_enum, help_heading = "Paging")]
    pagination: Option<Style>,

    /// The HTTP method of every page request [default: the preset's, else GET]
    #[arg(long, help_heading = "Paging")]
    method: Option<http::Method>,

    /// A JSON body sent with every page request
    #[arg(long, value_name = "JSON", help_heading = "Paging")]
    body: Option<String>,

    /// A dotted path in the body that takes the page number, offset or cursor, such as
    /// paging.pageNumber
    #[arg(long, value_name = "PATH", help_heading = "Paging")]
    page_field: Option<String>,

    /// The number of the first page [default: 1]
    #[arg(long, value_name = "N", help_heading = "Paging")]
    first_page: Option<usize>,

    /// The JSON pointer of the records array of an answer, such as /entities [default: the
    /// preset's, else the first array]
    #[arg(long, value_name = "POINTER", help_heading = "Paging")]
    records_at: Option<String>,

    /// The JSON pointer of the page count: no page past it is asked for, such as /pageCount
    #[arg(long, value_name = "POINTER", help_heading = "Paging")]
    page_count: Option<String>,

    /// The JSON pointer of the next cursor or link (cursor pagination), such as /nextUri
    /// [default: /cursor]
    #[arg(long, value_name = "POINTER", help_heading = "Paging")]
    cursor: Option<String>,

    /// Ask for at most this many pages [default: until a page is empty, past the page count,
    /// or without a next cursor]
    #[arg(long, env = "PAGES", help_heading = "Paging")]
    pages: Option<usize>,

    /// The OAuth client id (the secret comes from CLIENT_SECRET in the environment only)
    #[arg(long, env = "CLIENT_ID", help_heading = "Real platform")]
    client_id: Option<String>,

    /// The token endpoint
    #[arg(long, env = "TOKEN_URL", help_heading = "Real platform")]
    token_url: Option<String>,

    /// A Genesys Cloud region, such as eu-west-1, or its domain, such as mypurecloud.ie (when
    /// no token URL is given); an API URL may then be a path, such as /api/v2/users
    #[arg(
        long,
        env = "GENESYS_REGION",
        value_name = "REGION",
        help_heading = "Real platform"
    )]
    genesys_region: Option<String>,

    /// Requests a minute made with one token, at most [default: with GENESYS_REGION, Genesys
    /// Cloud's per-token limit of 300, shared out among the --workers; else none] (0: none)
    #[arg(long, value_name = "PER_MINUTE", help_heading = "Real platform")]
    per_token_limit: Option<u64>,

    /// A NICE CXone API user's access key id: the password grant with it and the access key
    /// secret (CXONE_ACCESS_KEY_SECRET, environment only), through discovery at the issuer
    /// [default issuer: https://cxone.niceincontact.com]; an API URL may then be a path, such
    /// as /inContactAPI/services/v31.0/agents
    #[arg(
        long,
        env = "CXONE_ACCESS_KEY_ID",
        value_name = "ID",
        help_heading = "Real platform"
    )]
    cxone_access_key_id: Option<String>,

    /// An OpenID provider whose token endpoint is discovered, such as
    /// https://cxone.niceincontact.com (client credentials, unless a CXone access key is given)
    #[arg(long, env = "ISSUER", help_heading = "Real platform")]
    issuer: Option<String>,

    /// The scope to ask for
    #[arg(long, env = "SCOPE", help_heading = "Real platform")]
    scope: Option<String>,

    /// How the client secret is sent [default: basic, or what discovery prefers]
    #[arg(long, env = "CLIENT_AUTH", value_enum, help_heading = "Real platform")]
    client_auth: Option<ClientAuthArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ClientAuthArg {
    /// HTTP Basic
    Basic,
    /// Form fields
    Post,
}

fn seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(seconds),
        _ => Err(format!("`{value}` is not a number of seconds")),
    }
}

fn at_least_two(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(format!(
            "`{value}` is not a whole number of at least 2 (without --workers, the job runs in \
             this process)"
        )),
    }
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{value}` is not a whole number of at least 1")),
    }
}

impl Args {
    fn config(&self) -> JobConfig {
        let mut config = JobConfig {
            records: self.records,
            page_size: self.page_size,
            token_lifetime: Duration::from_secs_f64(self.token_lifetime),
            latency: Duration::from_secs_f64(self.latency),
            throttle_every: self.throttle_every,
            retry_after: self.retry_after,
            revoke_at: Vec::new(),
            concurrency: self.concurrency,
            rate: (self.rate > 0).then_some(self.rate),
            timeout: Duration::from_secs_f64(self.timeout),
            max_retries: self.max_retries,
            max_retry_after: Duration::from_secs_f64(self.max_retry_after),
            preset: self.preset.unwrap_or(Preset::GenesysUsers),
            per_token_limit: self.per_token_limit(),
        };
        config.revoke_at = match &self.revoke_at {
            Some(pages) => pages.clone(),
            None => vec![config.pages() / 2],
        };
        config
    }

    /// Whether the job runs against Genesys Cloud, found by its region.
    fn genesys(&self) -> bool {
        self.api_url.is_some() && self.token_url.is_none() && self.genesys_region.is_some()
    }

    /// The per-token limit of this process: the one given, or Genesys Cloud's for a Genesys
    /// run, shared out among the workers of a fleet (a worker is given its share).
    fn per_token_limit(&self) -> Option<u64> {
        let workers = self.workers.unwrap_or(1);
        match self.per_token_limit {
            Some(0) => None,
            Some(limit) => {
                let share = limit / u64::try_from(workers).unwrap_or(u64::MAX).max(1);
                Some(share.max(1))
            }
            None if self.genesys() => Some(job::genesys_per_token_limit(workers)),
            None => None,
        }
    }

    fn platform(&self, api_url: &str) -> Result<Platform, BoxError> {
        let client_id = self
            .client_id
            .clone()
            .ok_or("CLIENT_ID (or --client-id) is not set")?;
        let client_secret =
            std::env::var("CLIENT_SECRET").map_err(|_| "CLIENT_SECRET is not set")?;
        let access_key = self.cxone_access_key_id.as_ref();
        let token_endpoint = match (&self.token_url, &self.genesys_region, access_key) {
            (Some(_), _, Some(_)) | (None, Some(_), Some(_)) => {
                return Err(
                    "a CXone access key goes with ISSUER (or none), not TOKEN_URL or \
                     GENESYS_REGION"
                        .into(),
                )
            }
            (Some(url), _, None) => TokenEndpoint::Url(url.clone()),
            (None, Some(region), None) => TokenEndpoint::GenesysRegion(genesys_domain(region)),
            (None, None, Some(key_id)) => TokenEndpoint::CxoneAccessKey {
                issuer: self
                    .issuer
                    .clone()
                    .unwrap_or_else(|| nice_cxone::ISSUER.to_owned()),
                key_id: key_id.clone(),
                key_secret: Secret::new(
                    std::env::var("CXONE_ACCESS_KEY_SECRET")
                        .map_err(|_| "CXONE_ACCESS_KEY_SECRET is not set")?,
                ),
            },
            (None, None, None) => match &self.issuer {
                Some(issuer) => TokenEndpoint::Issuer(issuer.clone()),
                None => {
                    return Err("set TOKEN_URL, GENESYS_REGION, CXONE_ACCESS_KEY_ID (with \
                         CXONE_ACCESS_KEY_SECRET) or ISSUER"
                        .into())
                }
            },
        };
        // A path is on the Genesys region's API host; on CXone's, the job finds the tenant's.
        let api_url = match &token_endpoint {
            TokenEndpoint::GenesysRegion(domain) if api_url.starts_with('/') => {
                genesys::Region::Domain(domain.clone()).api_base() + api_url
            }
            TokenEndpoint::CxoneAccessKey { .. } => api_url.to_owned(),
            _ if api_url.starts_with('/') => {
                return Err(format!(
                    "API_URL {api_url} is a path: give the whole URL, or GENESYS_REGION or a \
                     CXone access key, which say where the API is"
                )
                .into())
            }
            _ => api_url.to_owned(),
        };
        Ok(Platform {
            paging: self.paging(&api_url)?,
            token_endpoint,
            client_id,
            client_secret: Secret::new(client_secret),
            scope: self.scope.clone(),
            client_auth: self.client_auth.map(|auth| match auth {
                ClientAuthArg::Basic => ClientAuth::Basic,
                ClientAuthArg::Post => ClientAuth::Post,
            }),
        })
    }
}

impl Args {
    /// How the API at `url` is walked: the preset (named, or found from the URL's path), then
    /// every option given on top of it.
    fn paging(&self, url: &str) -> Result<Paging, BoxError> {
        let preset = self.preset.or_else(|| Preset::for_url(url));
        let mut paging = match preset {
            Some(preset) => preset.paging(url, self.page_size),
            None => Paging::new(url, self.page_size),
        };
        self.apply(&mut paging)?;
        if !paging.says_where_the_page_goes() {
            return Err(format!(
                "{url}: say where the page goes: {{page}}, {{skip}} or {{cursor}} in the URL, \
                 --page-field, --pagination cursor, or a --preset"
            )
            .into());
        }
        Ok(paging)
    }

    /// The paging options given on the command line, over a preset's.
    fn apply(&self, paging: &mut Paging) -> Result<(), BoxError> {
        if let Some(style) = self.pagination {
            paging.style = style;
        }
        if let Some(method) = &self.method {
            paging.method = method.clone();
        }
        if let Some(body) = &self.body {
            let body = serde_json::from_str(body).map_err(|error| format!("--body: {error}"))?;
            paging.body = Some(body);
        }
        if let Some(field) = &self.page_field {
            paging.field = Some(field.clone());
        }
        if let Some(first) = self.first_page {
            paging.first_page = first;
        }
        if let Some(pointer) = &self.records_at {
            paging.records = Some(pointer.clone());
        }
        if let Some(pointer) = &self.page_count {
            paging.page_count = Some(pointer.clone());
        }
        if let Some(pointer) = &self.cursor {
            paging.cursor = pointer.clone();
        }
        if self.pages.is_some() {
            paging.max_pages = self.pages;
        }
        Ok(())
    }
}

/// The domain of a Genesys Cloud region named as Genesys names it (`eu-west-1`); anything else is
/// taken for a domain (`mypurecloud.ie`).
fn genesys_domain(region: &str) -> String {
    use genesys::Region;
    let region = match region.trim().to_ascii_lowercase().as_str() {
        "us-east-1" => Region::UsEast1,
        "us-east-2" => Region::UsEast2,
        "us-west-2" => Region::UsWest2,
        "ca-central-1" => Region::CaCentral1,
        "sa-east-1" => Region::SaEast1,
        "eu-west-1" => Region::EuWest1,
        "eu-west-2" => Region::EuWest2,
        "eu-central-1" => Region::EuCentral1,
        "eu-central-2" => Region::EuCentral2,
        "me-central-1" => Region::MeCentral1,
        "ap-south-1" => Region::ApSouth1,
        "ap-northeast-1" => Region::ApNortheast1,
        "ap-northeast-2" => Region::ApNortheast2,
        "ap-northeast-3" => Region::ApNortheast3,
        "ap-southeast-2" => Region::ApSoutheast2,
        domain => Region::Domain(domain.to_owned()),
    };
    region.domain().to_owned()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    #[cfg(feature = "redis")]
    {
        if let Some(shard) = args.shard {
            return fleet::run_worker(&args, shard).await;
        }
        if let Some(workers) = args.workers {
            return fleet::run_fleet(&args, workers).await;
        }
    }
    #[cfg(not(feature = "redis"))]
    if args.workers.is_some() || args.shard.is_some() {
        eprintln!(
            "error: the fleet mode needs `--features redis`, as in\n  \
             cargo run --example batch --features redis -- --workers 4 --redis redis://127.0.0.1:6379/"
        );
        return ExitCode::FAILURE;
    }
    match run(&args).await {
        Ok(report) => {
            print_report(&report);
            if !report.succeeded() {
                eprintln!(
                    "error: {} of {} pages failed",
                    report.failures, report.pages
                );
                ExitCode::FAILURE
            } else if let Some(expected) = report
                .records_expected
                .filter(|expected| *expected != report.records)
            {
                eprintln!("error: fetched {} of {expected} records", report.records);
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<Report, BoxError> {
    let config = args.config();
    match &args.api_url {
        Some(api_url) => {
            let platform = args.platform(api_url)?;
            println!(
                "{} {}, {:?} pagination, {} workers{}",
                platform.paging.method,
                platform.paging.url,
                platform.paging.style,
                config.concurrency,
                match config.per_token_limit {
                    Some(limit) => format!(", at most {limit} requests a minute per token"),
                    None => String::new(),
                }
            );
            let bar = progress_bar(platform.paging.max_pages);
            let report = job::run_platform(&config, &platform, |page| bar.on_page(page)).await;
            bar.finish();
            report
        }
        None => {
            println!(
                "embedded identity provider and API on 127.0.0.1: {} records, {} per page, \
                 {} workers, the {:?} job",
                config.records, config.page_size, config.concurrency, config.preset
            );
            println!(
                "tokens live {:?}; {}; {:?} per request; tokens revoked at {}",
                config.token_lifetime,
                match config.throttle_every {
                    0 => "no 429s".to_owned(),
                    n => format!(
                        "1 request in {n} gets 429 (Retry-After: {})",
                        config.retry_after
                    ),
                },
                config.latency,
                match config.revoke_at.as_slice() {
                    [] => "no page".to_owned(),
                    pages => format!("page {pages:?}"),
                },
            );
            let bar = progress_bar(None);
            let report = job::run_embedded(&config, |page| bar.on_page(page)).await;
            bar.finish();
            report
        }
    }
}

/// An indicatif bar over the pages, a spinner with the records and pages so far while the end
/// is unknown; where it cannot draw (stderr is not a terminal), a line every tenth of the way
/// (every 10 pages while the end is unknown) instead.
struct Bar {
    bar: ProgressBar,
    known: Cell<bool>,
    done: Cell<usize>,
}

const UNKNOWN_END: &str = "{spinner} {elapsed_precise} {pos} pages, {msg}, {rate}";
const KNOWN_END: &str =
    "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} pages, {rate}, ETA {eta}\n  {msg}";

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.1} pages/s", state.per_sec());
            },
        )
        .progress_chars("=> ")
}

fn progress_bar(pages: Option<usize>) -> Bar {
    let bar = match pages {
        Some(pages) => ProgressBar::new(pages as u64).with_style(bar_style(KNOWN_END)),
        None => ProgressBar::no_length().with_style(bar_style(UNKNOWN_END)),
    };
    bar.enable_steady_tick(Duration::from_millis(100));
    Bar {
        bar,
        known: Cell::new(pages.is_some()),
        done: Cell::new(0),
    }
}

impl Bar {
    fn on_page(&self, page: &Page) {
        let status = format!(
            "{} records, {} token requests, {} 401 replays, {} 429 retries",
            page.records_so_far, page.token_requests, page.replays, page.retries
        );
        if let Err(error) = &page.result {
            self.bar
                .suspend(|| eprintln!("page {} failed: {error}", page.number));
        }
        let done = self.done.get() + 1;
        self.done.set(done);
        if let (false, Some(pages)) = (self.known.get(), page.pages_known) {
            self.known.set(true);
            self.bar.set_style(bar_style(KNOWN_END));
            self.bar.set_length(pages.max(done) as u64);
        }
        self.bar.set_message(status.clone());
        self.bar.inc(1);
        let pages = self.bar.length().map(|pages| pages as usize);
        let every = pages.map_or(10, |pages| (pages / 10).max(1));
        if self.bar.is_hidden() && (done % every == 0 || Some(done) == pages) {
            let of = pages.map_or(String::new(), |pages| {
                format!("{:>3}% ", done * 100 / pages.max(1))
            });
            let total = pages.map_or(String::new(), |pages| format!("/{pages}"));
            println!(
                "  {of}{done}{total} pages, {:.1} s, {status}",
                self.bar.elapsed().as_secs_f64()
            );
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn print_report(report: &Report) {
    let seconds = report.elapsed.as_secs_f64();
    let mut rows: Vec<(&str, String, String)> = Vec::new();
    rows.push((
        "records",
        report.records.to_string(),
        match report.records_expected {
            Some(expected) => format!("of {expected}"),
            None => "the lengths of the pages' record arrays".to_owned(),
        },
    ));
    rows.push((
        "pages",
        report.pages.to_string(),
        match report.servers {
            Some(servers) => format!(
                "{} workers; the API answered {} requests",
                report.concurrency, servers.api_requests
            ),
            None => format!("{} workers", report.concurrency),
        },
    ));
    rows.push((
        "wall time",
        format!("{seconds:.2} s"),
        format!("{:.1} pages/s", report.pages as f64 / seconds.max(1e-9)),
    ));
    rows.push((
        "token requests",
        report.token_requests.to_string(),
        match report.servers {
            Some(servers) => format!(
                "identity provider saw {}; {} refresh failures",
                servers.token_requests, report.refresh_failures
            ),
            None => format!("{} refresh failures", report.refresh_failures),
        },
    ));
    rows.push((
        "401 replays",
        report.replays.to_string(),
        match report.servers {
            Some(servers) => format!(
                "API sent {} 401s, revoked every token {} time(s); {} of the 401s were for \
                 an already replaced token",
                servers.unauthorized, servers.revocations, report.stale_rejections
            ),
            None => format!(
                "{} of the 401s were for an already replaced token",
                report.stale_rejections
            ),
        },
    ));
    rows.push((
        "429 retries",
        report.retries.to_string(),
        match report.servers {
            Some(servers) => format!("API sent {} 429s", servers.throttled),
            None => String::new(),
        },
    ));
    rows.push((
        "429s handed back",
        report.given_back.to_string(),
        "Retry-After over the longest accepted wait".to_owned(),
    ));
    rows.push(("failures", report.failures.to_string(), String::new()));

    println!();
    println!("api             {}", report.api);
    println!("token endpoint  {}", report.token_endpoint);
    println!();
    print_table(rows);
}

/// The report's table: what, how many, and a word on it.
fn print_table(rows: Vec<(&str, String, String)>) {
    let width = rows.iter().map(|(_, n, _)| n.len()).max().unwrap_or(0);
    println!("  {:<18} {:>width$}  detail", "", "count");
    println!("  {:-<18} {:->width$}  {:-<40}", "", "", "");
    for (what, count, detail) in rows {
        println!("  {what:<18} {count:>width$}  {detail}");
    }
}
