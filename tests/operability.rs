//! What SREs rely on: Prometheus metrics that move with work, liveness and
//! readiness probes, and a SIGTERM that drains without losing or duplicating
//! anything, within the grace period.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::contacts::v1::{
    Contact, GetContactRequest, ListContactsRequest, UpsertContactRequest,
};
use rapport_proto::ingestion::v1::TrackRequest;
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::service_names;
use support::{KafkaWatcher, Layout, Platform, eventually, http, sample_value, scrape, with_key};

fn upsert(email: &str, request_id: &str) -> UpsertContactRequest {
    UpsertContactRequest {
        request_id: request_id.into(),
        contact: Some(Contact {
            email: email.into(),
            first_name: "Load".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_work() {
    let platform = Platform::start_in_memory(Vec::new()).await;
    let admin = platform.admin_url("all");
    assert_eq!(
        http("GET", &format!("{admin}/livez"), None, b"")
            .await
            .status,
        200
    );
    let ready = http("GET", &format!("{admin}/readyz"), None, b"").await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    let before = scrape(&admin).await;
    assert!(sample_value(&before, "process_resident_memory_bytes", &[]) > 0.0);

    let acme = platform.create_workspace("Acme").await;
    let mut contacts = ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect");
    for n in 0..3 {
        contacts
            .upsert_contact(with_key(
                upsert(&format!("m{n}@example.com"), ""),
                &acme.api_key,
            ))
            .await
            .expect("upsert");
    }
    let refused = contacts
        .upsert_contact(with_key(upsert("nope", ""), &acme.api_key))
        .await
        .expect_err("invalid email");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let mut ingestion =
        IngestionServiceClient::connect(platform.address_of(service_names::INGESTION))
            .await
            .expect("connect");
    ingestion
        .track(with_key(
            TrackRequest {
                event: "Pricing Viewed".into(),
                anonymous_id: "anon-1".into(),
                ..Default::default()
            },
            &acme.api_key,
        ))
        .await
        .expect("track");

    let upserts = |samples: &[support::Sample], code: &str| {
        sample_value(
            samples,
            "rapport_grpc_server_handled_total",
            &[
                ("grpc_service", service_names::CONTACTS),
                ("grpc_method", "UpsertContact"),
                ("grpc_code", code),
            ],
        )
    };
    let after = eventually(
        "the outbox relay to publish the contact changes",
        &platform,
        || {
            let admin = admin.clone();
            let before = before.clone();
            async move {
                let after = scrape(&admin).await;
                let published = sample_value(
                    &after,
                    "rapport_bus_produced_records_total",
                    &[("topic", "rapport.contacts.changes.v1")],
                ) - sample_value(
                    &before,
                    "rapport_bus_produced_records_total",
                    &[("topic", "rapport.contacts.changes.v1")],
                );
                (published >= 3.0).then_some(after)
            }
        },
    )
    .await;
    assert_eq!(upserts(&after, "OK") - upserts(&before, "OK"), 3.0);
    assert_eq!(
        upserts(&after, "INVALID_ARGUMENT") - upserts(&before, "INVALID_ARGUMENT"),
        1.0
    );
    let timed = |samples: &[support::Sample]| {
        sample_value(
            samples,
            "rapport_grpc_server_handling_seconds_count",
            &[
                ("grpc_service", service_names::CONTACTS),
                ("grpc_method", "UpsertContact"),
            ],
        )
    };
    assert_eq!(timed(&after) - timed(&before), 4.0);
    let tracked = |samples: &[support::Sample]| {
        sample_value(
            samples,
            "rapport_ingestion_events_total",
            &[("kind", "track")],
        )
    };
    assert_eq!(tracked(&after) - tracked(&before), 1.0);
    let ingested = |samples: &[support::Sample]| {
        sample_value(
            samples,
            "rapport_bus_produced_records_total",
            &[("topic", "rapport.ingestion.events.v1")],
        )
    };
    assert_eq!(ingested(&after) - ingested(&before), 1.0);
    let consumed = |samples: &[support::Sample]| {
        sample_value(
            samples,
            "rapport_bus_consumed_records_total",
            &[
                ("topic", "rapport.contacts.changes.v1"),
                ("group", "rapport-segmentation"),
                ("outcome", "handled"),
            ],
        )
    };
    let consumed_after = eventually("segmentation to consume the changes", &platform, || {
        let admin = admin.clone();
        async move {
            let now = scrape(&admin).await;
            (consumed(&now) >= 3.0).then_some(consumed(&now))
        }
    })
    .await;
    assert_eq!(consumed_after - consumed(&before), 3.0);
    let families: Vec<&str> = after.iter().map(|s| s.family.as_str()).collect();
    for expected in [
        "rapport_db_pool_connections",
        "rapport_outbox_backlog_records",
        "rapport_grpc_server_handling_seconds",
    ] {
        assert!(
            families.contains(&expected),
            "{expected} missing from /metrics"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_within_the_grace_period_without_losing_or_duplicating() {
    const GRACE: Duration = Duration::from_secs(10);
    let mut platform = Platform::start_on_kafka(
        Layout::OneProcess,
        vec![
            (
                "RAPPORT_SHUTDOWN_GRACE_MS".into(),
                GRACE.as_millis().to_string(),
            ),
            ("RAPPORT_SHUTDOWN_DRAIN_DELAY_MS".into(), "1500".into()),
        ],
    )
    .await;
    let acme = platform.create_workspace("Acme").await;
    let admin = platform.admin_url("all");
    let watcher = KafkaWatcher::start(&platform, rapport_bus::topics::CONTACT_CHANGES).await;
    let contacts_address = platform.address_of(service_names::CONTACTS);

    // Load: four clients upserting new contacts as fast as they can.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let address = contacts_address.clone();
        let key = acme.api_key.clone();
        let acknowledged = acknowledged.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let Ok(mut client) = ContactsServiceClient::connect(address).await else {
                return 0;
            };
            let mut failures = 0;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let email = format!("w{worker}-{n}@example.com");
                match client
                    .upsert_contact(with_key(upsert(&email, &email), &key))
                    .await
                {
                    Ok(response) => acknowledged
                        .lock()
                        .expect("lock")
                        .push(response.into_inner().contact.expect("contact").contact_id),
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acknowledged_before_signal = acknowledged.lock().expect("lock").len();
    assert!(acknowledged_before_signal > 10, "the load is running");

    let signalled = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &platform.pid("all").to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    // Readiness turns false at once, while calls are still being served.
    let mut not_ready = false;
    while signalled.elapsed() < Duration::from_millis(1200) {
        let ready = http("GET", &format!("{admin}/readyz"), None, b"").await;
        if ready.status == 503 {
            assert!(ready.text().contains("shutting down"), "{}", ready.text());
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(not_ready, "/readyz answered 503 while draining");
    let exit = platform
        .wait_for_exit("all", GRACE + Duration::from_secs(5))
        .await;
    let took = signalled.elapsed();
    assert!(exit.success(), "clean exit: {exit:?}\n{}", platform.logs());
    assert!(took < GRACE, "exited after {took:?}, grace is {GRACE:?}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for worker in workers {
        let _ = worker.await;
    }
    let acknowledged: Vec<String> = acknowledged.lock().expect("lock").clone();
    assert!(acknowledged.len() >= acknowledged_before_signal);

    // Start again; everything acknowledged is there, and every contact in
    // the workspace has exactly one event on the topic.
    platform.start_again("all").await;
    let mut contacts = ContactsServiceClient::connect(contacts_address)
        .await
        .expect("connect");
    for contact_id in &acknowledged {
        contacts
            .get_contact(with_key(
                GetContactRequest {
                    contact_id: contact_id.clone(),
                },
                &acme.api_key,
            ))
            .await
            .unwrap_or_else(|error| panic!("acknowledged contact {contact_id} lost: {error:?}"));
    }
    let mut stored = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = contacts
            .list_contacts(with_key(
                ListContactsRequest {
                    page: Some(rapport_proto::common::v1::PageRequest {
                        page_size: 1000,
                        page_token: page_token.clone(),
                    }),
                    ..Default::default()
                },
                &acme.api_key,
            ))
            .await
            .expect("list")
            .into_inner();
        stored.extend(page.contacts.into_iter().map(|c| c.contact_id));
        page_token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if page_token.is_empty() {
            break;
        }
    }
    assert!(stored.len() >= acknowledged.len());
    eventually(
        "every stored contact's event on the topic",
        &platform,
        || {
            let ready = stored.iter().all(|id| watcher.count_for(id) >= 1);
            async move { ready.then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts: BTreeMap<usize, usize> = stored.iter().fold(BTreeMap::new(), |mut counts, id| {
        *counts.entry(watcher.count_for(id)).or_default() += 1;
        counts
    });
    assert_eq!(
        counts,
        BTreeMap::from([(1, stored.len())]),
        "events per contact (count -> contacts)"
    );
}
