//! The batch example's job in each pagination style, end to end against the test kit's API on
//! loopback: a page number in the URL until `pageNumber > pageCount` (Genesys users), a page
//! number in a JSON body until a page has no records (Genesys analytics query), an offset until
//! the list is empty (CXone agents), a next link and an opaque cursor until an answer has none.
//! Every record exactly once, no failure, and exactly one token request per server-side
//! revocation plus the first, whatever the style.
#![cfg(feature = "rustls")]

#[allow(dead_code)]
#[path = "../examples/batch/job.rs"]
mod job;

use std::cell::RefCell;
use std::time::Duration;

use job::paging::Preset;
use job::{JobConfig, Page, Servers};

const RECORDS: usize = 1_000;
const PAGE_SIZE: usize = 50;
const PAGES: usize = RECORDS / PAGE_SIZE;

/// Tokens live an hour, so every token request after the first comes from a revocation; every
/// 7th request is throttled with `Retry-After: 0`.
fn config(preset: Preset) -> JobConfig {
    JobConfig {
        records: RECORDS,
        page_size: PAGE_SIZE,
        token_lifetime: Duration::from_secs(3600),
        latency: Duration::from_millis(2),
        throttle_every: 7,
        retry_after: 0,
        revoke_at: vec![3, 11],
        concurrency: 4,
        max_retries: 10,
        rate: None,
        timeout: Duration::from_secs(60),
        preset,
        ..JobConfig::default()
    }
}

async fn run_style(preset: Preset, sequential: bool) {
    let config = config(preset);
    let servers = Servers::start(&config).await;
    // Besides every 7th request, the first two with a valid token: the API certainly throttles,
    // however the workers' requests interleave with the revocations' 401s.
    servers.api.throttle_next(2);
    let ids = RefCell::new(Vec::new());
    let failed = RefCell::new(Vec::new());
    let on_page = |page: &Page| match &page.result {
        Ok(records) => ids
            .borrow_mut()
            .extend(records.iter().map(|record| record["id"].as_u64().unwrap())),
        Err(error) => failed.borrow_mut().push((page.number, error.clone())),
    };
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        job::run_on(&servers, &config, on_page),
    )
    .await
    .expect("the job finished")
    .unwrap();

    assert_eq!(*failed.borrow(), Vec::new(), "{preset:?}: no page failed");
    assert_eq!(report.failures, 0, "{preset:?}");
    let mut ids = ids.into_inner();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..RECORDS as u64).collect::<Vec<_>>(),
        "{preset:?}: every record exactly once"
    );
    assert_eq!(report.records, RECORDS, "{preset:?}");
    assert_eq!(servers.api.records_served(), RECORDS, "{preset:?}");

    // The pages, and what marked the end.
    let pages = match preset {
        // The page count is known from the first answer: not one page past it.
        Preset::GenesysUsers => PAGES..=PAGES,
        // The last page has no next cursor: nothing is asked for after it.
        Preset::NextUri | Preset::Cursor => PAGES..=PAGES,
        // An empty page marks the end; the other 3 workers may each have asked for one more.
        Preset::GenesysConversations | Preset::CxoneAgents => PAGES + 1..=PAGES + 4,
    };
    assert!(pages.contains(&report.pages), "{preset:?}: {report:?}");
    assert_eq!(servers.api.served(), report.pages, "{preset:?}");
    if sequential {
        assert_eq!(
            report.concurrency, 1,
            "{preset:?}: cursors are followed one by one"
        );
    }

    // One token, then one per revocation, in the cache's count and the identity provider's.
    let revocations = config.revoke_at.len();
    assert_eq!(report.servers.unwrap().revocations, revocations);
    assert_eq!(report.token_requests, revocations as u64 + 1, "{preset:?}");
    assert_eq!(servers.idp.token_requests(), revocations + 1, "{preset:?}");
    // Every 401 replayed, every 429 retried, and nothing else reached the API.
    assert_eq!(report.replays, servers.api.rejected() as u64, "{preset:?}");
    assert!(
        report.replays >= revocations as u64,
        "{preset:?}: {report:?}"
    );
    assert_eq!(report.retries, servers.api.throttled() as u64, "{preset:?}");
    assert!(servers.api.throttled() > 0, "{preset:?}: the API throttled");
    assert_eq!(
        servers.api.requests(),
        report.pages + servers.api.throttled() + servers.api.rejected(),
        "{preset:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_number_in_the_url_until_the_page_count() {
    run_style(Preset::GenesysUsers, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_number_in_a_json_body_until_a_page_without_records() {
    run_style(Preset::GenesysConversations, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_until_the_list_is_empty() {
    run_style(Preset::CxoneAgents, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_links_until_an_answer_has_none() {
    run_style(Preset::NextUri, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_cursors_until_an_answer_has_none() {
    run_style(Preset::Cursor, true).await;
}
