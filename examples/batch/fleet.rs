//! The fleet mode (`--workers N --redis URL`, feature `redis`): one batch split over N processes
//! that share one token through Redis.
//!
//! The parent ([`run_fleet`]) starts the embedded identity provider and API (or takes the real
//! platform's options) and N copies of this program, each with `--shard i/N` and the
//! real-platform options pointing at the same token endpoint and API. Each worker
//! ([`run_worker`]) fetches pages i, i + N, ... through the usual stack, its token cache over a
//! `RedisStore` whose namespace names the client, the token endpoint and the scope, and prints
//! JSON lines on stdout:
//!
//! - `{"page": 7, "error": null, "records": 100, "token_requests": 1, "replays": 0,
//!   "retries": 0}` for each page (`error`: why it failed), with the worker's counters so far;
//! - `{"report": {...}}` once at the end: its job report and `RedisStats`.
//!
//! The parent reads them into one progress bar, passes the workers' stderr on with their number
//! and adds the reports up. A worker that cannot start, dies, or prints anything else is a failed
//! worker in the report (and a non-zero exit status), never a panic.
//!
//! The Redis URL (it may hold a password), the client secret and `TOKEN_KEY` reach the workers
//! through their environment, not their command line.

use clap::ValueEnum;
use std::io::Write;
use std::path::Path;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tower::BoxError;
use tower_auth_refresh::cache::{DEFAULT_ADVISORY_WINDOW, DEFAULT_REFRESH_SKEW};
use tower_auth_refresh::oauth2::Secret;
use tower_auth_refresh::redis_store::{EncryptionKey, RedisStats, RedisStore};

use crate::job::{self, JobConfig, Page, Platform, Report, Servers, Shard, TokenEndpoint};
use crate::{progress_bar, Args, ClientAuthArg};

/// The environment variable of the key that seals the tokens in Redis: 64 hexadecimal digits,
/// the same in every worker.
const TOKEN_KEY: &str = "TOKEN_KEY";

/// The embedded identity provider's client.
const EMBEDDED_CLIENT: (&str, &str) = ("batch", "s3cr3t");

/// Variables the options read from the environment. A worker gets all of its options on its
/// command line, so these are removed from its environment: it runs exactly what the parent
/// parsed, whatever the parent's environment holds.
const OPTION_VARIABLES: &[&str] = &[
    "RECORDS",
    "PAGE_SIZE",
    "CONCURRENCY",
    "API_URL",
    "PAGES",
    "CLIENT_ID",
    "TOKEN_URL",
    "GENESYS_REGION",
    "ISSUER",
    "CXONE_ACCESS_KEY_ID",
    "SCOPE",
    "CLIENT_AUTH",
];

// ---------------------------------------------------------------------------------------------
// The worker: one shard, JSON lines on stdout.

/// A worker of the fleet (`--shard i/N`): fetch this shard's pages with a `RedisStore` under the
/// token cache and print JSON lines. Exits with 1 if a page failed or the job could not run.
pub async fn run_worker(args: &Args, shard: Shard) -> ExitCode {
    // The store's warnings (Redis down: this worker fetches its own token) go to stderr, which
    // the parent passes on.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
    match worker(args, shard).await {
        Ok(report) if report.succeeded() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn worker(args: &Args, shard: Shard) -> Result<Report, BoxError> {
    let api_url = args.api_url.as_deref().ok_or("a worker needs --api-url")?;
    let platform = args.platform(api_url)?;
    let store = redis_store(args, &platform)?;
    let report = job::run_platform_shard(&args.config(), &platform, shard, store.clone(), |page| {
        emit(&page_line(page))
    })
    .await?;
    emit(&report_line(&report, store.stats()));
    Ok(report)
}

/// One line on stdout, at once. A parent that is gone is no reason to stop the job.
fn emit(line: &Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn page_line(page: &Page) -> Value {
    json!({
        "page": page.number,
        "error": page.result.as_ref().err(),
        "records": page.records().count(),
        "token_requests": page.token_requests,
        "replays": page.replays,
        "retries": page.retries,
    })
}

fn report_line(report: &Report, redis: RedisStats) -> Value {
    json!({
        "report": {
            "records": report.records,
            "pages": report.pages,
            "failures": report.failures,
            "elapsed_secs": report.elapsed.as_secs_f64(),
            "token_requests": report.token_requests,
            "refresh_failures": report.refresh_failures,
            "replays": report.replays,
            "stale_rejections": report.stale_rejections,
            "retries": report.retries,
            "given_back": report.given_back,
            "redis": {
                "adopted": redis.adopted,
                "published": redis.published,
                "lock_waits": redis.lock_waits,
                "withdrawn": redis.withdrawn,
                "fallbacks": redis.fallbacks,
            },
        }
    })
}

/// The Redis namespace of a platform's tokens: one per client id, token endpoint and scope, so
/// that workers of different clients (or scopes) never share a token.
fn namespace(platform: &Platform) -> String {
    let endpoint = match &platform.token_endpoint {
        TokenEndpoint::Url(url) => url.clone(),
        TokenEndpoint::GenesysRegion(domain) => format!("genesys:{domain}"),
        TokenEndpoint::Issuer(issuer) => format!("issuer:{issuer}"),
        // Each API user's access key has tokens of its own (its tenant, its permissions).
        TokenEndpoint::CxoneAccessKey { issuer, key_id, .. } => {
            format!("cxone:{issuer}:{key_id}")
        }
    };
    match &platform.scope {
        Some(scope) => format!("batch:{}@{endpoint}#{scope}", platform.client_id),
        None => format!("batch:{}@{endpoint}", platform.client_id),
    }
}

fn redis_url(args: &Args) -> Result<&str, BoxError> {
    args.redis
        .as_deref()
        .ok_or_else(|| "the fleet mode needs --redis URL (or REDIS_URL)".into())
}

fn encryption_key() -> Result<Option<EncryptionKey>, BoxError> {
    match std::env::var(TOKEN_KEY) {
        Ok(hex) => EncryptionKey::from_hex(&hex)
            .map(Some)
            .map_err(|error| format!("{TOKEN_KEY}: {error}").into()),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{TOKEN_KEY} is not text").into()),
    }
}

fn redis_store(args: &Args, platform: &Platform) -> Result<RedisStore, BoxError> {
    let mut store = RedisStore::builder(redis_url(args)?, &namespace(platform))?;
    if let Some(key) = encryption_key()? {
        store = store.encryption_key(key);
    }
    Ok(store.build())
}

// ---------------------------------------------------------------------------------------------
// What the parent reads.

/// A worker's final report, or the fleet's sum of them.
#[derive(Clone, Copy, Debug, Default)]
struct WorkerReport {
    records: u64,
    pages: u64,
    failures: u64,
    /// The worker's fetching time; in a sum, the longest.
    elapsed: Duration,
    token_requests: u64,
    refresh_failures: u64,
    replays: u64,
    stale_rejections: u64,
    retries: u64,
    given_back: u64,
    adopted: u64,
    published: u64,
    lock_waits: u64,
    withdrawn: u64,
    fallbacks: u64,
}

impl WorkerReport {
    fn from_json(report: &Value) -> Result<Self, String> {
        let number = |value: Option<&Value>, name: &str| {
            value
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("its report has no count `{name}`"))
        };
        let field = |name: &str| number(report.get(name), name);
        let redis = |name: &str| number(report.get("redis").and_then(|r| r.get(name)), name);
        let elapsed = report
            .get("elapsed_secs")
            .and_then(Value::as_f64)
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .ok_or("its report has no duration `elapsed_secs`")?;
        Ok(Self {
            records: field("records")?,
            pages: field("pages")?,
            failures: field("failures")?,
            elapsed,
            token_requests: field("token_requests")?,
            refresh_failures: field("refresh_failures")?,
            replays: field("replays")?,
            stale_rejections: field("stale_rejections")?,
            retries: field("retries")?,
            given_back: field("given_back")?,
            adopted: redis("adopted")?,
            published: redis("published")?,
            lock_waits: redis("lock_waits")?,
            withdrawn: redis("withdrawn")?,
            fallbacks: redis("fallbacks")?,
        })
    }

    fn add(&mut self, other: &Self) {
        self.records += other.records;
        self.pages += other.pages;
        self.failures += other.failures;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.token_requests += other.token_requests;
        self.refresh_failures += other.refresh_failures;
        self.replays += other.replays;
        self.stale_rejections += other.stale_rejections;
        self.retries += other.retries;
        self.given_back += other.given_back;
        self.adopted += other.adopted;
        self.published += other.published;
        self.lock_waits += other.lock_waits;
        self.withdrawn += other.withdrawn;
        self.fallbacks += other.fallbacks;
    }
}

/// A page a worker finished, as its line says.
struct PageLine {
    number: usize,
    error: Option<String>,
    records: u64,
    token_requests: u64,
    replays: u64,
    retries: u64,
}

enum Line {
    Page(PageLine),
    Report(WorkerReport),
}

/// At most 80 characters of what a worker printed, for an error message.
fn excerpt(line: &str) -> String {
    let mut excerpt: String = line.chars().take(80).collect();
    if excerpt.len() < line.len() {
        excerpt.push_str("...");
    }
    excerpt
}

fn parse_line(line: &str) -> Result<Line, String> {
    let garbage = |what: &str| format!("printed {what}: `{}`", excerpt(line));
    let value: Value =
        serde_json::from_str(line).map_err(|_| garbage("a line that is not JSON"))?;
    if let Some(report) = value.get("report") {
        return WorkerReport::from_json(report).map(Line::Report);
    }
    let count = |name: &str| value.get(name).and_then(Value::as_u64);
    let page = count("page").and_then(|number| {
        Some(PageLine {
            number: usize::try_from(number).ok()?,
            error: match value.get("error")? {
                Value::Null => None,
                Value::String(error) => Some(error.clone()),
                _ => return None,
            },
            records: value.get("records").and_then(Value::as_u64).unwrap_or(0),
            token_requests: count("token_requests")?,
            replays: count("replays")?,
            retries: count("retries")?,
        })
    });
    page.map(Line::Page)
        .ok_or_else(|| garbage("a line that is neither a page nor a report"))
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// What a worker process sends the parent's event loop.
enum Event {
    Stdout(usize, String),
    Stderr(usize, String),
    /// Its stdout could not be read; it was killed.
    Unreadable(usize, String),
    Exited(usize, Result<ExitStatus, String>),
}

/// One worker, as the parent sees it.
#[derive(Default)]
struct WorkerState {
    report: Option<WorkerReport>,
    /// The first thing that went wrong with the worker itself (not with a page).
    problem: Option<String>,
    status: Option<Result<ExitStatus, String>>,
    /// Its counters so far, from its last page line (records: the sum of its page lines).
    records: u64,
    token_requests: u64,
    replays: u64,
    retries: u64,
}

impl WorkerState {
    /// Why this worker counts as failed, if it does. A worker that reported failed pages and
    /// exited with 1 for them is not a failed worker: its pages are counted as failures.
    fn failure(&self) -> Option<String> {
        if let Some(problem) = &self.problem {
            return Some(problem.clone());
        }
        match (&self.report, &self.status) {
            (_, Some(Err(error))) => Some(format!("could not be waited for: {error}")),
            (None, Some(Ok(status))) => Some(format!("exited ({status}) without a report")),
            (None, None) => Some("never reported".to_owned()),
            (Some(report), Some(Ok(status))) if !status.success() && report.failures == 0 => {
                Some(format!("exited ({status}) after a report without failures"))
            }
            (Some(_), _) => None,
        }
    }
}

/// What the whole fleet did.
struct FleetReport {
    workers: usize,
    concurrency: usize,
    api: String,
    token_endpoint: String,
    namespace: String,
    encrypted: bool,
    pages_expected: usize,
    records_expected: Option<usize>,
    /// The workers' reports added up.
    total: WorkerReport,
    failed_workers: Vec<(usize, String)>,
    /// From the parent's start of the workers to the last one's exit.
    elapsed: Duration,
    /// What the embedded servers counted, and the lifetime of their tokens.
    servers: Option<(job::ServerCounts, Duration)>,
}

impl FleetReport {
    fn succeeded(&self) -> bool {
        self.failed_workers.is_empty()
            && self.total.failures == 0
            && self.total.pages == self.pages_expected as u64
            && self
                .records_expected
                .is_none_or(|expected| expected as u64 == self.total.records)
    }
}

/// The fleet mode's parent (`--workers N`): start the servers (or take the real platform's
/// options) and N workers, follow them, and print the fleet's report. Exits with 1 if a worker
/// or a page failed.
pub async fn run_fleet(args: &Args, workers: usize) -> ExitCode {
    match fleet(args, workers).await {
        Ok(report) => {
            print_report(&report);
            if report.succeeded() {
                return ExitCode::SUCCESS;
            }
            let total = &report.total;
            let mut problems = Vec::new();
            if !report.failed_workers.is_empty() {
                problems.push(format!(
                    "{} of {} workers failed",
                    report.failed_workers.len(),
                    report.workers
                ));
            }
            if total.failures > 0 {
                problems.push(format!(
                    "{} of {} pages failed",
                    total.failures, report.pages_expected
                ));
            }
            let unreported = (report.pages_expected as u64).saturating_sub(total.pages);
            if unreported > 0 {
                problems.push(format!("{unreported} pages were never reported"));
            }
            if let Some(expected) = report.records_expected {
                if problems.is_empty() && expected as u64 != total.records {
                    problems.push(format!("fetched {} of {expected} records", total.records));
                }
            }
            eprintln!("error: {}", problems.join(", "));
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn fleet(args: &Args, workers: usize) -> Result<FleetReport, BoxError> {
    if args
        .revoke_at
        .as_ref()
        .is_some_and(|pages| !pages.is_empty())
    {
        return Err("--revoke-at is for a single process; the fleet mode revokes no tokens".into());
    }
    let config = args.config();
    // Everything a worker would trip over, checked once before any of them starts.
    let redis_url = redis_url(args)?;
    RedisStore::builder(redis_url, "check")?;
    let encrypted = encryption_key()?.is_some();
    let exe = std::env::current_exe()
        .map_err(|error| format!("cannot find this program to start its workers: {error}"))?;

    let (servers, platform) = match &args.api_url {
        Some(api_url) => (None, args.platform(api_url)?),
        None => {
            let servers = Servers::start(&config).await;
            let (client_id, client_secret) = EMBEDDED_CLIENT;
            let mut paging = servers.paging(config.preset, config.page_size);
            // Shards need the end up front: the workers are each given every n-th page of it.
            paging.max_pages = Some(config.pages());
            let platform = Platform {
                paging,
                token_endpoint: TokenEndpoint::Url(servers.idp.token_url()),
                client_id: client_id.to_owned(),
                client_secret: Secret::new(client_secret),
                scope: None,
                client_auth: None,
            };
            (Some(servers), platform)
        }
    };
    let namespace = namespace(&platform);
    print_header(
        args,
        &config,
        &platform,
        workers,
        &namespace,
        servers.is_some(),
    );

    let started = Instant::now();
    let (events, mut received) = mpsc::unbounded_channel();
    let mut states: Vec<WorkerState> = (0..workers).map(|_| WorkerState::default()).collect();
    for (index, state) in states.iter_mut().enumerate() {
        let shard = Shard {
            index,
            count: workers,
        };
        let mut command = worker_command(&exe, args, &config, &platform, shard, redis_url);
        if servers.is_some() {
            command.env("CLIENT_SECRET", EMBEDDED_CLIENT.1);
        }
        match command.spawn() {
            Ok(child) => follow(index, child, events.clone()),
            Err(error) => state.problem = Some(format!("could not be started: {error}")),
        }
    }
    drop(events);

    let bar = progress_bar(platform.paging.max_pages);
    let fleet_token_requests = |states: &[WorkerState]| match &servers {
        Some(servers) => servers.idp.token_requests() as u64,
        None => states.iter().map(|state| state.token_requests).sum(),
    };
    while let Some(event) = received.recv().await {
        match event {
            Event::Stdout(index, line) => match parse_line(&line) {
                Ok(Line::Page(page)) => {
                    let state = &mut states[index];
                    state.token_requests = page.token_requests;
                    state.replays = page.replays;
                    state.retries = page.retries;
                    state.records += page.records;
                    bar.on_page(&Page {
                        number: page.number,
                        result: page.error.map_or(Ok(Vec::new()), Err),
                        records_so_far: states.iter().map(|state| state.records as usize).sum(),
                        pages_known: platform.paging.max_pages,
                        token_requests: fleet_token_requests(&states),
                        replays: states.iter().map(|state| state.replays).sum(),
                        retries: states.iter().map(|state| state.retries).sum(),
                    });
                }
                Ok(Line::Report(report)) => {
                    bar.bar.suspend(|| {
                        println!(
                            "worker {index}/{workers} done: {} in {:.2} s, {}, {} adopted from \
                             Redis, {}, {} failed",
                            counted(report.pages, "page"),
                            report.elapsed.as_secs_f64(),
                            counted(report.token_requests, "token request"),
                            counted(report.adopted, "token"),
                            counted(report.lock_waits, "lock wait"),
                            report.failures
                        )
                    });
                    states[index].report = Some(report);
                }
                Err(problem) => {
                    bar.bar
                        .suspend(|| eprintln!("worker {index}/{workers}: {problem}"));
                    states[index].problem.get_or_insert(problem);
                }
            },
            Event::Stderr(index, line) => {
                bar.bar
                    .suspend(|| eprintln!("worker {index}/{workers}: {line}"));
            }
            Event::Unreadable(index, error) => {
                let problem = format!("its output could not be read ({error}); killed");
                bar.bar
                    .suspend(|| eprintln!("worker {index}/{workers}: {problem}"));
                states[index].problem.get_or_insert(problem);
            }
            Event::Exited(index, status) => {
                let state = &mut states[index];
                state.status = Some(status);
                if let Some(failure) = state.failure() {
                    bar.bar
                        .suspend(|| eprintln!("worker {index}/{workers} failed: {failure}"));
                }
            }
        }
    }
    bar.finish();
    let elapsed = started.elapsed();

    let mut total = WorkerReport::default();
    for report in states.iter().filter_map(|state| state.report.as_ref()) {
        total.add(report);
    }
    let failed_workers = states
        .iter()
        .enumerate()
        .filter_map(|(index, state)| Some((index, state.failure()?)))
        .collect();
    Ok(FleetReport {
        workers,
        concurrency: config.concurrency,
        api: platform.paging.url.clone(),
        token_endpoint: match &platform.token_endpoint {
            TokenEndpoint::Url(url) => url.clone(),
            TokenEndpoint::GenesysRegion(domain) => format!("Genesys Cloud, {domain}"),
            TokenEndpoint::Issuer(issuer) => format!("discovered from {issuer}"),
            TokenEndpoint::CxoneAccessKey { issuer, key_id, .. } => {
                format!("discovered from {issuer}, access key {key_id}")
            }
        },
        namespace,
        encrypted,
        pages_expected: platform.paging.max_pages.unwrap_or_default(),
        records_expected: servers.as_ref().map(|_| config.records),
        total,
        failed_workers,
        elapsed,
        servers: servers.as_ref().map(|servers| {
            let counts = job::ServerCounts {
                token_requests: servers.idp.token_requests(),
                api_requests: servers.api.requests(),
                unauthorized: servers.api.rejected(),
                throttled: servers.api.throttled(),
                revocations: 0,
            };
            (counts, config.token_lifetime)
        }),
    })
}

/// This program as worker `shard`, with every option on its command line and the secrets in its
/// environment.
fn worker_command(
    exe: &Path,
    args: &Args,
    config: &JobConfig,
    platform: &Platform,
    shard: Shard,
    redis_url: &str,
) -> Command {
    let mut command = Command::new(exe);
    command
        .arg("--shard")
        .arg(shard.to_string())
        .arg("--api-url")
        .arg(&platform.paging.url)
        .arg("--page-size")
        .arg(platform.paging.page_size.to_string());
    if let Some(pages) = platform.paging.max_pages {
        command.arg("--pages").arg(pages.to_string());
    }
    // The paging options as given: each worker builds the same paging from them.
    let given = [
        (
            "--preset",
            args.preset
                .and_then(|preset| Some(preset.to_possible_value()?.get_name().to_owned())),
        ),
        (
            "--pagination",
            args.pagination
                .and_then(|style| Some(style.to_possible_value()?.get_name().to_owned())),
        ),
        ("--method", args.method.as_ref().map(ToString::to_string)),
        ("--body", args.body.clone()),
        ("--page-field", args.page_field.clone()),
        (
            "--first-page",
            args.first_page.map(|first| first.to_string()),
        ),
        ("--records-at", args.records_at.clone()),
        ("--page-count", args.page_count.clone()),
        ("--cursor", args.cursor.clone()),
    ];
    for (option, value) in given {
        if let Some(value) = value {
            command.arg(option).arg(value);
        }
    }
    command
        .arg("--client-id")
        .arg(&platform.client_id)
        .arg("--concurrency")
        .arg(config.concurrency.to_string())
        .arg("--rate")
        .arg(config.rate.unwrap_or(0).to_string())
        .arg("--timeout")
        .arg(config.timeout.as_secs_f64().to_string())
        .arg("--max-retries")
        .arg(config.max_retries.to_string())
        .arg("--max-retry-after")
        .arg(config.max_retry_after.as_secs_f64().to_string());
    // The share of the per-token limit this process worked out for each worker (0: none).
    command
        .arg("--per-token-limit")
        .arg(config.per_token_limit.unwrap_or(0).to_string());
    let (option, endpoint) = match &platform.token_endpoint {
        TokenEndpoint::Url(url) => ("--token-url", url),
        TokenEndpoint::GenesysRegion(domain) => ("--genesys-region", domain),
        TokenEndpoint::Issuer(issuer) => ("--issuer", issuer),
        // The access key secret reaches the worker through its environment, as CLIENT_SECRET.
        TokenEndpoint::CxoneAccessKey { issuer, key_id, .. } => {
            command.arg("--cxone-access-key-id").arg(key_id);
            ("--issuer", issuer)
        }
    };
    command.arg(option).arg(endpoint);
    if let Some(scope) = &platform.scope {
        command.arg("--scope").arg(scope);
    }
    if let Some(auth) = args.client_auth {
        command.arg("--client-auth").arg(match auth {
            ClientAuthArg::Basic => "basic",
            ClientAuthArg::Post => "post",
        });
    }
    for variable in OPTION_VARIABLES {
        command.env_remove(variable);
    }
    command
        .env("REDIS_URL", redis_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Read a worker's stdout and stderr line by line into `events`, then wait for it.
fn follow(index: usize, mut child: Child, events: mpsc::UnboundedSender<Event>) {
    if let Some(stderr) = child.stderr.take() {
        let events = events.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).split(b'\n');
            while let Ok(Some(line)) = lines.next_segment().await {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                let _ = events.send(Event::Stderr(index, line));
            }
        });
    }
    let stdout = child.stdout.take();
    tokio::spawn(async move {
        if let Some(stdout) = stdout {
            // Bytes, not `lines()`: a line that is not UTF-8 is garbage to report, not a reason
            // to stop reading (a worker blocked on a full pipe would never exit).
            let mut lines = BufReader::new(stdout).split(b'\n');
            loop {
                match lines.next_segment().await {
                    Ok(Some(line)) => {
                        let line = String::from_utf8_lossy(&line).into_owned();
                        let _ = events.send(Event::Stdout(index, line));
                    }
                    Ok(None) => break,
                    Err(error) => {
                        let _ = child.start_kill();
                        let _ = events.send(Event::Unreadable(index, error.to_string()));
                        break;
                    }
                }
            }
        }
        let status = child.wait().await.map_err(|error| error.to_string());
        let _ = events.send(Event::Exited(index, status));
    });
}

/// `1 page`, `2 pages`.
fn counted(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// A Redis URL without its password.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://<credentials>@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// How long one token serves before the caches (default options) replace it: its lifetime less
/// the advisory window, which is at most half the lifetime and at least the refresh skew.
fn token_period(lifetime: Duration) -> Duration {
    let skew = DEFAULT_REFRESH_SKEW.min(lifetime / 4);
    let advisory = DEFAULT_ADVISORY_WINDOW.min(lifetime / 2).max(skew);
    lifetime.saturating_sub(advisory)
}

fn print_header(
    args: &Args,
    config: &JobConfig,
    platform: &Platform,
    workers: usize,
    namespace: &str,
    embedded: bool,
) {
    println!(
        "fleet: {workers} worker processes, {} tasks each, sharing one token through Redis at {} \
         (namespace {namespace})",
        config.concurrency,
        args.redis.as_deref().map(redacted).unwrap_or_default(),
    );
    if !embedded {
        println!(
            "{} pages of {}; worker i fetches pages i, i + {workers}, ...",
            platform.paging.max_pages.unwrap_or_default(),
            platform.paging.url
        );
        if let Some(limit) = config.per_token_limit {
            println!(
                "at most {limit} requests a minute per token in each worker, {} in all",
                limit * workers as u64
            );
        }
        return;
    }
    println!(
        "embedded identity provider and API on 127.0.0.1: {} records, {} per page; tokens live \
         {:?}; {}; {:?} per request; no revocations in a fleet",
        config.records,
        config.page_size,
        config.token_lifetime,
        match config.throttle_every {
            0 => "no 429s".to_owned(),
            n => format!(
                "1 request in {n} gets 429 (Retry-After: {})",
                config.retry_after
            ),
        },
        config.latency,
    );
    println!(
        "a short run, a few seconds: what it shows is the token requests of the whole fleet, one \
         per {:?} (a token's lifetime less the cache's refresh window) plus the first, not one \
         per worker",
        token_period(config.token_lifetime)
    );
}

fn print_report(report: &FleetReport) {
    let total = &report.total;
    let seconds = report.elapsed.as_secs_f64();
    let servers = report.servers.map(|(counts, _)| counts);
    let mut rows: Vec<(&str, String, String)> = Vec::new();
    rows.push((
        "records",
        total.records.to_string(),
        match report.records_expected {
            Some(expected) => format!("of {expected}"),
            None => "non-empty lines of the bodies".to_owned(),
        },
    ));
    rows.push((
        "pages",
        total.pages.to_string(),
        format!(
            "of {}; {} worker processes x {} tasks{}",
            report.pages_expected,
            report.workers,
            report.concurrency,
            match servers {
                Some(servers) => format!("; the API answered {} requests", servers.api_requests),
                None => String::new(),
            }
        ),
    ));
    rows.push((
        "wall time",
        format!("{seconds:.2} s"),
        format!(
            "{:.1} pages/s, workers' start included; the slowest worker fetched for {:.2} s",
            total.pages as f64 / seconds.max(1e-9),
            total.elapsed.as_secs_f64()
        ),
    ));
    rows.push(match servers {
        Some(servers) => (
            "token requests",
            servers.token_requests.to_string(),
            format!(
                "the whole fleet, as the identity provider counted them (the workers' caches: \
                 {}); {} failed",
                total.token_requests, total.refresh_failures
            ),
        ),
        None => (
            "token requests",
            total.token_requests.to_string(),
            format!(
                "the whole fleet, the workers' caches added up; {} failed",
                total.refresh_failures
            ),
        ),
    });
    rows.push((
        "adopted from Redis",
        total.adopted.to_string(),
        format!(
            "tokens a worker took from Redis instead of asking; {} fetched and published",
            total.published
        ),
    ));
    rows.push((
        "lock waits",
        total.lock_waits.to_string(),
        "refreshes that waited for another worker's token request".to_owned(),
    ));
    rows.push((
        "fallbacks",
        total.fallbacks.to_string(),
        "refreshes that asked the provider alone, Redis being down or slow".to_owned(),
    ));
    rows.push((
        "401 replays",
        total.replays.to_string(),
        format!(
            "{}{} for an already replaced token; {} rejected tokens withdrawn from Redis",
            match servers {
                Some(servers) => format!("API sent {} 401s; ", servers.unauthorized),
                None => String::new(),
            },
            total.stale_rejections,
            total.withdrawn
        ),
    ));
    rows.push((
        "429 retries",
        total.retries.to_string(),
        match servers {
            Some(servers) => format!("API sent {} 429s", servers.throttled),
            None => String::new(),
        },
    ));
    rows.push((
        "429s handed back",
        total.given_back.to_string(),
        "Retry-After over the longest accepted wait".to_owned(),
    ));
    rows.push(("failures", total.failures.to_string(), "pages".to_owned()));
    rows.push((
        "failed workers",
        report.failed_workers.len().to_string(),
        format!("of {}", report.workers),
    ));

    println!();
    println!("api             {}", report.api);
    println!("token endpoint  {}", report.token_endpoint);
    println!(
        "redis           namespace {}, tokens {}",
        report.namespace,
        if report.encrypted {
            "sealed with TOKEN_KEY"
        } else {
            "stored as they are (set TOKEN_KEY to seal them)"
        }
    );
    println!();
    crate::print_table(rows);
    for (index, failure) in &report.failed_workers {
        println!("  worker {index}/{}: {failure}", report.workers);
    }

    println!();
    match report.servers {
        Some((servers, lifetime)) => {
            let period = token_period(lifetime);
            let fetching = total.elapsed.as_secs_f64();
            let per_process = 1 + (fetching / period.as_secs_f64().max(1e-9)) as u64;
            println!(
                "Tokens lived {lifetime:?} and were replaced {:?} before expiry: {fetching:.1} s of \
                 fetching needed about {} (the expiries + 1), and the fleet of {} made {}. Without \
                 Redis each worker asks for its own: about {} in all.",
                lifetime.saturating_sub(period),
                counted(per_process, "token"),
                report.workers,
                counted(servers.token_requests as u64, "token request"),
                per_process * report.workers as u64,
            );
        }
        None => println!(
            "The fleet of {} made {}; without Redis each worker asks for its own, at least {} in \
             all.",
            report.workers,
            counted(total.token_requests, "token request"),
            report.workers
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_json() -> Value {
        let report = Report {
            api: String::new(),
            token_endpoint: String::new(),
            records: 5000,
            records_expected: None,
            pages: 50,
            failures: 1,
            elapsed: Duration::from_millis(1500),
            concurrency: 4,
            token_requests: 2,
            refresh_failures: 0,
            replays: 3,
            stale_rejections: 1,
            retries: 4,
            given_back: 0,
            servers: None,
        };
        let mut stats = RedisStats::default();
        stats.adopted = 5;
        stats.lock_waits = 1;
        report_line(&report, stats)
    }

    #[test]
    fn a_report_line_reads_back() {
        let Ok(Line::Report(report)) = parse_line(&report_json().to_string()) else {
            panic!("not read as a report");
        };
        assert_eq!(
            (
                report.records,
                report.pages,
                report.failures,
                report.adopted
            ),
            (5000, 50, 1, 5)
        );
        assert_eq!(report.elapsed, Duration::from_millis(1500));
    }

    #[test]
    fn a_page_line_reads_back() {
        let line = r#"{"page":7,"error":"503 Service Unavailable","records":0,"token_requests":1,"replays":0,"retries":3}"#;
        let Ok(Line::Page(page)) = parse_line(line) else {
            panic!("not read as a page");
        };
        assert_eq!(page.number, 7);
        assert_eq!(page.error.as_deref(), Some("503 Service Unavailable"));
        assert_eq!(page.retries, 3);
    }

    #[test]
    fn anything_else_is_an_error_not_a_panic() {
        let mut truncated = report_json();
        if let Some(report) = truncated.get_mut("report").and_then(Value::as_object_mut) {
            report.remove("redis");
        }
        let huge = r#"{"report":{"elapsed_secs":1e300}}"#.to_owned();
        for line in [
            String::new(),
            "thread 'main' panicked at src/main.rs:1:1".to_owned(),
            "\u{fffd}\u{fffd} not utf-8".to_owned(),
            "[1, 2, 3]".to_owned(),
            r#"{"page":-1,"error":null,"token_requests":0,"replays":0,"retries":0}"#.to_owned(),
            r#"{"page":1,"error":5,"token_requests":0,"replays":0,"retries":0}"#.to_owned(),
            r#"{"report":null}"#.to_owned(),
            huge,
            truncated.to_string(),
            "x".repeat(10_000),
        ] {
            assert!(parse_line(&line).is_err(), "{line:?} was accepted");
        }
    }
}
