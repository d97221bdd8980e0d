//! The batch example's job (`examples/batch/job.rs`), small, against the embedded identity
//! provider and API: every record exactly once through the whole stack, one token request per
//! server-side revocation, every 429 retried, and a `Retry-After` too long to wait for reported
//! as failures rather than slept on.
#![cfg(feature = "rustls")]

// The example prints what the tests only assert on.
#[allow(dead_code)]
#[path = "../examples/batch/job.rs"]
mod job;

use std::cell::RefCell;
use std::time::Duration;

use job::paging::Paging;
use job::{JobConfig, Page, Platform, Report, Servers, TokenEndpoint};
use tower_auth_refresh::oauth2::{ClientAuth, Secret};

const RECORDS: usize = 2_000;
const PAGE_SIZE: usize = 50;
const PAGES: usize = RECORDS / PAGE_SIZE;

/// Small numbers; tokens live an hour, so the cache never refreshes them ahead of expiry and
/// every token request comes from a 401.
fn small_job() -> JobConfig {
    JobConfig {
        records: RECORDS,
        page_size: PAGE_SIZE,
        token_lifetime: Duration::from_secs(3600),
        latency: Duration::from_millis(2),
        throttle_every: 7,
        retry_after: 0,
        revoke_at: Vec::new(),
        concurrency: 4,
        // Several 429s in a row for one page are possible with 4 workers; 10 are not.
        max_retries: 10,
        timeout: Duration::from_secs(60),
        ..JobConfig::default()
    }
}

/// What `on_page` saw: the records of the pages that came back, and the pages that failed.
#[derive(Default)]
struct Seen {
    records: RefCell<Vec<u64>>,
    failed: RefCell<Vec<(usize, String)>>,
}

impl Seen {
    fn on_page(&self, page: &Page) {
        match &page.result {
            Ok(_) => self
                .records
                .borrow_mut()
                .extend(page.records().map(|record| record["id"].as_u64().unwrap())),
            Err(error) => self.failed.borrow_mut().push((page.number, error.clone())),
        }
    }

    /// The records, sorted by number.
    fn sorted_records(&self) -> Vec<usize> {
        let mut numbers: Vec<usize> = self
            .records
            .borrow()
            .iter()
            .map(|id| *id as usize)
            .collect();
        numbers.sort_unstable();
        numbers
    }
}

async fn bounded(job: impl std::future::Future<Output = Report>) -> Report {
    // Generous: the job takes well under a second; this turns a hang into a failure.
    tokio::time::timeout(Duration::from_secs(120), job)
        .await
        .expect("the job finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_once_with_one_token_per_revocation_and_every_429_retried() {
    // Two revocations on adjacent pages and one later: k = 3.
    let config = JobConfig {
        revoke_at: vec![10, 11, 25],
        ..small_job()
    };
    let k = config.revoke_at.len();
    let servers = Servers::start(&config).await;
    // Besides every 7th request, the first three with a valid token: the API certainly
    // throttles, however the workers' requests interleave.
    servers.api.throttle_next(3);
    let seen = Seen::default();
    let report = bounded(async {
        job::run_on(&servers, &config, |page| seen.on_page(page))
            .await
            .unwrap()
    })
    .await;

    assert_eq!(*seen.failed.borrow(), Vec::new(), "no page failed");
    assert_eq!(report.failures, 0);
    assert!(report.succeeded());
    assert_eq!(report.pages, PAGES);
    assert_eq!(report.records, RECORDS);
    assert_eq!(
        seen.sorted_records(),
        (0..RECORDS).collect::<Vec<_>>(),
        "every record exactly once"
    );
    assert_eq!(servers.api.served(), PAGES, "every page served once");

    // One token to start with, one per revocation; the identity provider saw the same.
    let server_counts = report.servers.unwrap();
    assert_eq!(server_counts.revocations, k);
    assert_eq!(report.token_requests, k as u64 + 1);
    assert_eq!(servers.idp.token_requests(), k + 1);
    assert_eq!(server_counts.token_requests, k + 1);
    assert_eq!(report.refresh_failures, 0);
    // At least the request that met each revocation was replayed; every 401 was.
    assert!(report.replays >= k as u64, "{report:?}");
    assert_eq!(report.replays, servers.api.rejected() as u64, "{report:?}");

    // Every 429 the API sent was retried, none handed back.
    assert!(servers.api.throttled() >= 3, "the API throttled");
    assert_eq!(report.retries, servers.api.throttled() as u64);
    assert_eq!(server_counts.throttled, servers.api.throttled());
    assert_eq!(report.given_back, 0);
    assert_eq!(
        servers.api.requests(),
        PAGES + servers.api.throttled() + servers.api.rejected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_accepted_fails_the_page_at_once() {
    // "Come back in 5 minutes", while the job waits at most 1 s: the 429s come back as failed
    // pages, counted, not slept on. One worker, so the API's 7th, 14th, ... request is the
    // 7th, 14th, ... page (from 1).
    let config = JobConfig {
        retry_after: 300,
        max_retry_after: Duration::from_secs(1),
        concurrency: 1,
        ..small_job()
    };
    let seen = Seen::default();
    let report = bounded(async {
        job::run_embedded(&config, |page| seen.on_page(page))
            .await
            .unwrap()
    })
    .await;

    let server_counts = report.servers.unwrap();
    let failed = seen.failed.borrow();
    let failed_pages: Vec<usize> = failed.iter().map(|(page, _)| *page).collect();
    assert_eq!(failed_pages, [6, 13, 20, 27, 34], "{failed:?}");
    assert_eq!(server_counts.throttled, 5);
    assert_eq!(report.failures, 5, "{report:?}");
    assert!(!report.succeeded());
    assert!(
        failed
            .iter()
            .all(|(_, error)| error.contains("429") && error.contains("Retry-After: 300")),
        "{failed:?}"
    );
    assert_eq!(report.given_back, 5);
    assert_eq!(report.retries, 0);
    assert_eq!(server_counts.api_requests, PAGES);

    // The other pages came back whole, each once.
    assert_eq!(report.records, RECORDS - report.failures * PAGE_SIZE);
    let expected: Vec<usize> = (0..RECORDS)
        .filter(|record| !failed_pages.contains(&(record / PAGE_SIZE)))
        .collect();
    assert_eq!(seen.sorted_records(), expected);
    assert_eq!(report.token_requests, 1);
    assert_eq!(server_counts.token_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_mode_fetches_pages_numbered_from_one() {
    // The real-platform path (client credentials with the secret in the form) against the
    // embedded servers, with a URL of one's own and no preset: `{page}` from 1, until a page
    // comes back empty.
    let config = small_job();
    let servers = Servers::start(&config).await;
    let platform = Platform {
        paging: Paging::new(
            &servers.api.url("/users?pageSize={size}&pageNumber={page}"),
            PAGE_SIZE,
        ),
        token_endpoint: TokenEndpoint::Url(servers.idp.token_url()),
        client_id: "batch".to_owned(),
        client_secret: Secret::new("s3cr3t"),
        scope: Some("contacts:read".to_owned()),
        client_auth: Some(ClientAuth::Post),
    };
    let seen = Seen::default();
    let report = bounded(async {
        job::run_platform(&config, &platform, |page| seen.on_page(page))
            .await
            .unwrap()
    })
    .await;

    assert_eq!(*seen.failed.borrow(), Vec::new(), "no page failed");
    assert_eq!(report.failures, 0);
    assert_eq!(seen.sorted_records(), (0..RECORDS).collect::<Vec<_>>());
    assert_eq!(report.records, RECORDS);
    // The 40 pages, the empty 41st that marks the end, and at most one more empty page for
    // each of the other 3 workers, asked for before the end was known.
    assert!(
        (PAGES + 1..=PAGES + 4).contains(&report.pages),
        "{report:?}"
    );
    assert_eq!(servers.api.served(), report.pages);
    assert_eq!(servers.api.records_served(), RECORDS);
    assert_eq!(report.token_endpoint, servers.idp.token_url());
    assert!(report.servers.is_none());
    assert_eq!(
        (report.token_requests, servers.idp.token_requests()),
        (1, 1)
    );
    assert_eq!(report.retries, servers.api.throttled() as u64);
}
