//! The batch example's job (`examples/batch/job.rs`) as NICE CXone and Genesys Cloud users run
//! it, against the crate's emulators of both (`tower_auth_refresh::testkit::{cxone, genesys}`),
//! with tokens that live 2 seconds: every record once, no failure, no more token requests than
//! the cache's schedule allows, and never a 429 from Genesys's per-token limit.
//!
//! The first three run on the real clock (a few seconds each: the job has to outlive its
//! tokens). A token of 2 s is replaced in the background once it is half spent (the advisory
//! window of a short-lived token), so a job of `t` seconds asks for at most `1 + t / 1 s`
//! tokens; its pacing makes it last more than a lifetime, so it asks for at least 2.
//! The last runs on tokio's paused clock, moved by hand: a minute-long limit in milliseconds.
#![cfg(feature = "rustls")]

// The example prints what the tests only assert on.
#[allow(dead_code)]
#[path = "../examples/batch/job.rs"]
mod job;
mod support;

use std::cell::RefCell;
use std::future::Future;
use std::time::{Duration, Instant};

use job::paging::Preset;
use job::{JobConfig, Page, Platform, Report, TokenEndpoint};
use serde_json::Value;
use tower_auth_refresh::oauth2::{genesys, Secret};
use tower_auth_refresh::testkit::cxone::{Cxone, CxoneConfig};
use tower_auth_refresh::testkit::genesys::{Genesys, GenesysConfig, GenesysCounts};

const LIFETIME: Duration = Duration::from_secs(2);

/// What `on_page` saw: each record's identifying field, and the pages that failed.
struct Seen {
    key: &'static str,
    records: RefCell<Vec<String>>,
    failed: RefCell<Vec<(usize, String)>>,
}

impl Seen {
    fn new(key: &'static str) -> Self {
        Self {
            key,
            records: RefCell::default(),
            failed: RefCell::default(),
        }
    }

    fn on_page(&self, page: &Page) {
        match &page.result {
            Ok(_) => self
                .records
                .borrow_mut()
                .extend(page.records().map(|record| match &record[self.key] {
                    Value::String(id) => id.clone(),
                    other => other.to_string(),
                })),
            Err(error) => self.failed.borrow_mut().push((page.number, error.clone())),
        }
    }

    fn sorted(&self) -> Vec<String> {
        let mut records = self.records.borrow().clone();
        records.sort_unstable();
        records
    }
}

fn sorted(records: impl Iterator<Item = String>) -> Vec<String> {
    let mut records: Vec<String> = records.collect();
    records.sort_unstable();
    records
}

/// The job's options as `main.rs` sets them for a real platform (the embedded servers'
/// settings are not read), 4 workers, no per-second limit.
fn platform_job() -> JobConfig {
    JobConfig {
        concurrency: 4,
        rate: None,
        timeout: Duration::from_secs(60),
        max_retries: 3,
        per_token_limit: None,
        ..JobConfig::default()
    }
}

async fn bounded<T>(job: impl Future<Output = T>) -> T {
    // Generous: a job takes a few seconds; this turns a hang into a failure.
    tokio::time::timeout(Duration::from_secs(120), job)
        .await
        .expect("the job finished")
}

/// At most one token per half lifetime, plus the first; at least one replacement, the job
/// having outlived a token.
fn assert_token_schedule(token_requests: u64, elapsed: Duration, report: &Report) {
    let half_lives = (elapsed.as_millis() / (LIFETIME / 2).as_millis()) as u64;
    assert!(
        (2..=half_lives + 1).contains(&token_requests),
        "{token_requests} token requests in {elapsed:?}: {report:?}"
    );
    assert_eq!(report.token_requests, token_requests);
    assert_eq!(report.refresh_failures, 0);
}

fn genesys_platform(genesys: &Genesys, preset: Preset, path: &str, page_size: usize) -> Platform {
    let config = genesys.config();
    Platform {
        paging: preset.paging(&genesys.api_url(path), page_size),
        token_endpoint: TokenEndpoint::Url(genesys.token_url()),
        client_id: config.client_id.clone(),
        client_secret: Secret::new(config.client_secret.clone()),
        scope: None,
        client_auth: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genesys_users_by_page_count_under_the_per_token_limit_across_expiries() {
    // 400 users in 16 pages of 25; what a Genesys run gets by default: 300 requests a minute
    // per token, one request every 60/299 s, so the 16 pages take at least 3 s.
    let genesys = Genesys::start(GenesysConfig {
        token_lifetime: LIFETIME,
        users: 400,
        per_token_limit: Some(genesys::PER_TOKEN_REQUESTS_PER_MINUTE as usize),
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let config = JobConfig {
        per_token_limit: Some(job::genesys_per_token_limit(1)),
        ..platform_job()
    };
    assert_eq!(config.per_token_limit, Some(300));
    let platform = genesys_platform(&genesys, Preset::GenesysUsers, "/api/v2/users", 25);
    let seen = Seen::new("id");
    let started = Instant::now();
    let report = bounded(job::run_platform(&config, &platform, |page| {
        seen.on_page(page)
    }))
    .await
    .unwrap();
    let elapsed = started.elapsed();

    assert_eq!(*seen.failed.borrow(), Vec::new(), "no page failed");
    assert_eq!(report.failures, 0);
    assert_eq!(report.records, 400);
    assert_eq!(
        seen.sorted(),
        sorted((1..=400).map(|i| format!("user-{i}"))),
        "every user once"
    );
    // The first answer's pageCount ends the walk: no page past the 16th is asked for.
    assert_eq!(report.pages, 16);
    assert!(
        report.elapsed >= Duration::from_secs(60) / 299 * 15,
        "{report:?}"
    );

    let counts = genesys.counts();
    assert_eq!(
        counts.throttled, 0,
        "the per-token limit was never exceeded"
    );
    assert_eq!(report.retries, 0);
    assert_eq!(counts.token_refused, 0);
    assert_eq!(counts.api_requests, 16 + counts.unauthorized);
    assert_eq!(report.replays, counts.unauthorized as u64);
    assert_token_schedule(counts.token_requests as u64, elapsed, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genesys_conversations_query_pages_in_the_post_body_across_expiries() {
    // 120 conversations in 12 pages of 10, the page number at paging.pageNumber of the POST
    // body; the 13th page has no `conversations` and ends the walk.
    let genesys = Genesys::start(GenesysConfig {
        token_lifetime: LIFETIME,
        conversations: 120,
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let config = JobConfig {
        per_token_limit: Some(job::genesys_per_token_limit(1)),
        ..platform_job()
    };
    let platform = genesys_platform(
        &genesys,
        Preset::GenesysConversations,
        "/api/v2/analytics/conversations/details/query",
        10,
    );
    let seen = Seen::new("conversationId");
    let started = Instant::now();
    let report = bounded(job::run_platform(&config, &platform, |page| {
        seen.on_page(page)
    }))
    .await
    .unwrap();
    let elapsed = started.elapsed();

    assert_eq!(*seen.failed.borrow(), Vec::new(), "no page failed");
    assert_eq!(report.failures, 0);
    assert_eq!(report.records, 120);
    assert_eq!(
        seen.sorted(),
        sorted((1..=120).map(|i| format!("conversation-{i}"))),
        "every conversation once"
    );
    // The 12 pages, the empty 13th, and at most one more empty page for each of the other 3
    // workers, handed out before the end was known.
    assert!((13..=16).contains(&report.pages), "{report:?}");
    assert!(
        report.elapsed >= Duration::from_secs(60) / 299 * 12,
        "{report:?}"
    );

    let counts = genesys.counts();
    assert_eq!(
        counts.throttled, 0,
        "the per-token limit was never exceeded"
    );
    assert_eq!(counts.token_refused, 0);
    assert_eq!(counts.api_requests, report.pages + counts.unauthorized);
    assert_eq!(report.replays, counts.unauthorized as u64);
    assert_token_schedule(counts.token_requests as u64, elapsed, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cxone_agents_through_discovery_access_key_and_the_tenant_api() {
    // What a CXone user gives: the client's id and secret, an access key, and a path. The job
    // discovers the token endpoint, gets its first token with the access key, finds the
    // tenant's API from it, then walks 250 agents in 25 pages of 10 (skip/top) at 8 requests a
    // second, so for more than 3 s, on refresh tokens that rotate.
    let cxone = Cxone::start(CxoneConfig {
        token_lifetime: LIFETIME,
        agents: 250,
        ..CxoneConfig::default()
    })
    .await
    .unwrap();
    let emulated = cxone.config();
    let config = JobConfig {
        rate: Some(8),
        ..platform_job()
    };
    let path = "/inContactAPI/services/v31.0/agents";
    let platform = Platform {
        paging: Preset::for_url(path).unwrap().paging(path, 10),
        token_endpoint: TokenEndpoint::CxoneAccessKey {
            issuer: cxone.issuer(),
            key_id: emulated.access_key_id.clone(),
            key_secret: Secret::new(emulated.access_key_secret.clone()),
        },
        client_id: emulated.client_id.clone(),
        client_secret: Secret::new(emulated.client_secret.clone()),
        scope: None,
        client_auth: None,
    };
    let seen = Seen::new("agentId");
    let started = Instant::now();
    let report = bounded(job::run_platform(&config, &platform, |page| {
        seen.on_page(page)
    }))
    .await
    .unwrap();
    let elapsed = started.elapsed();

    assert_eq!(*seen.failed.borrow(), Vec::new(), "no page failed");
    assert_eq!(report.failures, 0);
    assert_eq!(report.records, 250);
    assert_eq!(
        seen.sorted(),
        sorted((1..=250).map(|i| i.to_string())),
        "every agent once"
    );
    assert_eq!(
        report.api,
        format!("{}{path}?skip={{skip}}&top={{size}}", cxone.issuer()),
        "the path, on the API the tenant's configuration names"
    );
    assert_eq!(
        report.token_endpoint,
        format!("{}/auth/token", cxone.issuer())
    );
    // The 25 pages, the empty 26th, and at most 3 more empty ones.
    assert!((26..=29).contains(&report.pages), "{report:?}");

    let counts = cxone.counts();
    assert_eq!(counts.discovery, 1);
    assert_eq!(counts.configuration, 1, "the tenant's API looked up once");
    assert_eq!(
        counts.password_grants, 1,
        "the access key once, then refresh tokens"
    );
    assert_eq!(
        counts.refresh_refused, 0,
        "every rotated refresh token kept"
    );
    assert_eq!(counts.client_credentials_refused, 0);
    assert_eq!(counts.invalid_credentials, 0);
    assert_eq!(counts.api_requests, report.pages + counts.api_unauthorized);
    assert_eq!(report.replays, counts.api_unauthorized as u64);
    assert_token_schedule(
        (counts.password_grants + counts.refresh_grants) as u64,
        elapsed,
        &report,
    );
}

/// Run `job` on the paused clock, moving it 20 ms whenever the tasks have had a chance to
/// run: loopback IO goes on between the steps, timers (the rate limit, the emulator's minute)
/// fire as the clock passes them.
async fn on_manual_clock<T>(job: impl Future<Output = T>) -> T {
    let _clock = support::manual_clock();
    let mut job = std::pin::pin!(job);
    loop {
        let steps = async {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            biased;
            output = &mut job => return output,
            () = steps => tokio::time::advance(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn genesys_per_token_limit_keeps_a_four_worker_job_under_a_low_limit() {
    // An organisation limited to 20 requests a minute per token, tokens that live an hour,
    // 40 pages for 4 workers: without a limiter 20 requests go out at once and the next 20
    // are refused. With the job's limit set to 20 (`--per-token-limit 20`), no 60 s of the
    // emulator's clock holds more than 20 of them, and none is refused.
    let genesys = Genesys::start(GenesysConfig {
        users: 400,
        per_token_limit: Some(20),
        ..GenesysConfig::default()
    })
    .await
    .unwrap();
    let config = JobConfig {
        per_token_limit: Some(20),
        timeout: Duration::from_secs(600),
        ..platform_job()
    };
    let platform = genesys_platform(&genesys, Preset::GenesysUsers, "/api/v2/users", 10);
    let seen = Seen::new("id");
    let started = tokio::time::Instant::now();
    let report = on_manual_clock(job::run_platform(&config, &platform, |page| {
        seen.on_page(page)
    }))
    .await
    .unwrap();

    assert_eq!(*seen.failed.borrow(), Vec::new(), "no page failed");
    assert_eq!(report.records, 400);
    assert_eq!(
        seen.sorted(),
        sorted((1..=400).map(|i| format!("user-{i}")))
    );
    assert_eq!(report.pages, 40);
    assert_eq!(
        genesys.counts(),
        GenesysCounts {
            token_requests: 1,
            token_refused: 0,
            api_requests: 40,
            unauthorized: 0,
            idle_timeouts: 0,
            throttled: 0,
        }
    );
    assert_eq!((report.retries, report.given_back), (0, 0));
    // 40 requests spaced 60/19 s apart (the report's wall time is on the real clock).
    assert!(started.elapsed() >= Duration::from_secs(60) / 19 * 39);

    // Four processes sharing one token share its limit.
    assert_eq!(job::genesys_per_token_limit(4), 75);
}
