//! End-to-end tests of the platform foundation, against the real `rapport`
//! binary, a real Postgres and (for Kafka) a real broker.
//!
//! Each test creates its own database and runs `rapport` as child processes on
//! free ports, so tests never share state. Postgres comes from
//! `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`,
//! used only to create the per-test database); Kafka from `TEST_KAFKA_BROKERS`
//! (default `127.0.0.1:9092`).

mod support;

use std::collections::BTreeSet;

use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::contacts::v1::{
    Contact, GetContactRequest, ListContactsRequest, UpsertContactRequest, WhoAmIRequest,
};
use rapport_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
use rapport_proto::segmentation::v1::{
    Condition, CreateSegmentRequest, FieldCondition, GetSegmentRequest, Segment,
};
use support::{ALL_SERVICE_NAMES, Platform};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_reports_serving_and_reflection_lists_it() {
    let platform = Platform::start_single_process().await;
    let mut listed = BTreeSet::new();
    for (name, address) in platform.grpc_addresses() {
        let status = support::health_status(&address, name).await;
        assert_eq!(status, ServingStatus::Serving, "{name} on {address}");
        let overall = support::health_status(&address, "").await;
        assert_eq!(
            overall,
            ServingStatus::Serving,
            "server health on {address}"
        );
        let services = support::reflection_services(&address).await;
        assert!(
            services.contains(&name.to_owned()),
            "{name} not listed by reflection on {address}: {services:?}"
        );
        assert!(services.contains(&"grpc.health.v1.Health".to_owned()));
        listed.extend(services.into_iter().filter(|s| s.starts_with("rapport.")));
    }
    let expected: BTreeSet<String> = ALL_SERVICE_NAMES.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(listed, expected, "reflection lists every Rapport service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_key_never_reaches_another_workspace() {
    let platform = Platform::start_single_process().await;
    let acme = platform.create_workspace("Acme").await;
    let globex = platform.create_workspace("Globex").await;
    let contacts_address = platform.address_of(rapport_proto::service_names::CONTACTS);
    let mut contacts = ContactsServiceClient::connect(contacts_address.clone())
        .await
        .expect("connect");

    // Each key knows its own workspace.
    let who = contacts
        .who_am_i(support::with_key(WhoAmIRequest {}, &acme.api_key))
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(
        who.workspace.expect("workspace").workspace_id,
        acme.workspace_id
    );

    let created = contacts
        .upsert_contact(support::with_key(
            UpsertContactRequest {
                request_id: String::new(),
                contact: Some(Contact {
                    email: "Ada@Example.com".into(),
                    first_name: "Ada".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &acme.api_key,
        ))
        .await
        .expect("upsert in acme")
        .into_inner();
    assert!(created.created);
    let ada = created.contact.expect("contact");
    assert_eq!(ada.email, "ada@example.com");

    // Acme reads it back.
    let got = contacts
        .get_contact(support::with_key(
            GetContactRequest {
                contact_id: ada.contact_id.clone(),
            },
            &acme.api_key,
        ))
        .await
        .expect("acme reads its contact")
        .into_inner();
    assert_eq!(got.contact.expect("contact").first_name, "Ada");

    // Globex's key cannot read it, list it or overwrite it.
    let refused = contacts
        .get_contact(support::with_key(
            GetContactRequest {
                contact_id: ada.contact_id.clone(),
            },
            &globex.api_key,
        ))
        .await
        .expect_err("globex must not read acme's contact");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    let listed = contacts
        .list_contacts(support::with_key(
            ListContactsRequest::default(),
            &globex.api_key,
        ))
        .await
        .expect("globex lists")
        .into_inner();
    assert!(listed.contacts.is_empty(), "globex sees no acme contacts");
    let globex_ada = contacts
        .upsert_contact(support::with_key(
            UpsertContactRequest {
                request_id: String::new(),
                contact: Some(Contact {
                    email: "ada@example.com".into(),
                    first_name: "Someone else".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &globex.api_key,
        ))
        .await
        .expect("globex upserts the same email")
        .into_inner();
    assert!(
        globex_ada.created,
        "the same email in another workspace is another contact"
    );
    assert_ne!(
        globex_ada.contact.expect("contact").contact_id,
        ada.contact_id
    );
    let unchanged = contacts
        .get_contact(support::with_key(
            GetContactRequest {
                contact_id: ada.contact_id.clone(),
            },
            &acme.api_key,
        ))
        .await
        .expect("acme reads again")
        .into_inner();
    assert_eq!(
        unchanged.contact.expect("contact").first_name,
        "Ada",
        "acme's contact untouched"
    );

    // The same holds in another service.
    let segmentation_address = platform.address_of(rapport_proto::service_names::SEGMENTATION);
    let mut segmentation = SegmentationServiceClient::connect(segmentation_address)
        .await
        .expect("connect");
    let segment = segmentation
        .create_segment(support::with_key(
            CreateSegmentRequest {
                segment: Some(Segment {
                    name: "new leads".into(),
                    condition: Some(Condition {
                        condition: Some(rapport_proto::segmentation::v1::condition::Condition::Field(FieldCondition {
                            field: "lifecycle_stage".into(),
                            operator: rapport_proto::segmentation::v1::field_condition::Operator::Equals.into(),
                            value: "lead".into(),
                            within_seconds: 0,
                        })),
                    }),
                    ..Default::default()
                }),
            },
            &acme.api_key,
        ))
        .await
        .expect("acme creates a segment")
        .into_inner()
        .segment
        .expect("segment");
    let refused = segmentation
        .get_segment(support::with_key(
            GetSegmentRequest {
                segment_id: segment.segment_id.clone(),
            },
            &globex.api_key,
        ))
        .await
        .expect_err("globex must not read acme's segment");
    assert_eq!(refused.code(), Code::NotFound);

    // No key, an unknown key, and a write key used as an API key are all refused.
    let missing = contacts
        .get_contact(GetContactRequest {
            contact_id: ada.contact_id.clone(),
        })
        .await
        .expect_err("no key");
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let wrong = contacts
        .get_contact(support::with_key(
            GetContactRequest {
                contact_id: ada.contact_id.clone(),
            },
            "rpk_0000000000000000000000000000000000000000000000000000000000000000",
        ))
        .await
        .expect_err("unknown key");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let write_key = contacts
        .get_contact(support::with_key(
            GetContactRequest {
                contact_id: ada.contact_id.clone(),
            },
            &acme.write_key,
        ))
        .await
        .expect_err("write key is not an API key");
    assert_eq!(write_key.code(), Code::Unauthenticated, "{write_key:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    use tonic_types::StatusExt;
    let platform = Platform::start_single_process().await;
    let acme = platform.create_workspace("Acme").await;
    let mut contacts =
        ContactsServiceClient::connect(platform.address_of(rapport_proto::service_names::CONTACTS))
            .await
            .expect("connect");
    let error = contacts
        .upsert_contact(support::with_key(
            UpsertContactRequest {
                request_id: String::new(),
                contact: Some(Contact {
                    email: "not-an-email".into(),
                    phone: "12345".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &acme.api_key,
        ))
        .await
        .expect_err("bad email refused");
    assert_eq!(error.code(), Code::InvalidArgument);
    let details = error.get_error_details();
    let fields: Vec<String> = details
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, vec!["contact.email", "contact.phone"]);

    let error = contacts
        .get_contact(support::with_key(
            GetContactRequest {
                contact_id: "42".into(),
            },
            &acme.api_key,
        ))
        .await
        .expect_err("malformed id refused");
    assert_eq!(error.code(), Code::InvalidArgument);

    let listed = contacts
        .list_contacts(support::with_key(
            ListContactsRequest::default(),
            &acme.api_key,
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.contacts.is_empty(), "nothing was half-written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_of_services_needs_a_broker() {
    let output =
        support::run_rapport_expecting_exit(&["serve", "--services", "contacts"], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("RAPPORT_KAFKA_BROKERS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_in_separate_processes_publish_contact_changes_to_kafka() {
    let platform = Platform::start_per_service_processes().await;
    for (name, address) in platform.grpc_addresses() {
        assert_eq!(
            support::health_status(&address, name).await,
            ServingStatus::Serving,
            "{name}"
        );
    }
    let acme = platform.create_workspace("Acme").await;
    let consumer =
        support::KafkaWatcher::start(&platform, rapport_bus::topics::CONTACT_CHANGES).await;
    let mut contacts =
        ContactsServiceClient::connect(platform.address_of(rapport_proto::service_names::CONTACTS))
            .await
            .expect("connect");
    let contact = contacts
        .upsert_contact(support::with_key(
            UpsertContactRequest {
                request_id: "req-1".into(),
                contact: Some(Contact {
                    email: format!("grace-{}@example.com", uuid::Uuid::new_v4().simple()),
                    first_name: "Grace".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &acme.api_key,
        ))
        .await
        .expect("upsert")
        .into_inner()
        .contact
        .expect("contact");
    let envelope = consumer.wait_for_contact(&contact.contact_id).await;
    assert_eq!(envelope.workspace_id, acme.workspace_id);
    assert_eq!(envelope.producer, "contacts");
    let Some(rapport_proto::events::v1::envelope::Payload::ContactChanged(change)) =
        envelope.payload
    else {
        panic!("expected ContactChanged");
    };
    assert_eq!(
        change.change_type(),
        rapport_proto::events::v1::contact_changed::ChangeType::Created
    );
    assert_eq!(change.contact.expect("snapshot").first_name, "Grace");

    // A retry with the same request id writes nothing and publishes nothing.
    let retried = contacts
        .upsert_contact(support::with_key(
            UpsertContactRequest {
                request_id: "req-1".into(),
                contact: Some(Contact {
                    email: contact.email.clone(),
                    first_name: "Changed".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &acme.api_key,
        ))
        .await
        .expect("retry")
        .into_inner();
    assert!(retried.created, "the retry returns the first answer");
    assert_eq!(retried.contact.expect("contact").first_name, "Grace");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        consumer.count_for(&contact.contact_id),
        1,
        "one event for one change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_issue_then_revoke() {
    let platform =
        Platform::start_in_memory(vec![("RAPPORT_API_KEY_CACHE_MS".into(), "200".into())]).await;
    let acme = platform.create_workspace("Acme").await;
    let mut contacts =
        ContactsServiceClient::connect(platform.address_of(rapport_proto::service_names::CONTACTS))
            .await
            .expect("connect");
    let issued = platform
        .run(&["workspace", "issue-key", &acme.workspace_id])
        .await;
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let new_key = String::from_utf8_lossy(&issued.stdout).trim().to_owned();
    assert!(new_key.starts_with("rpk_") && new_key != acme.api_key);
    for key in [&acme.api_key, &new_key] {
        let who = contacts
            .who_am_i(support::with_key(WhoAmIRequest {}, key))
            .await
            .expect("both keys work during the rotation")
            .into_inner();
        assert_eq!(
            who.workspace.expect("workspace").workspace_id,
            acme.workspace_id
        );
    }
    let revoked = platform
        .run(&["workspace", "revoke-key", &acme.api_key])
        .await;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let refused = contacts
        .who_am_i(support::with_key(WhoAmIRequest {}, &acme.api_key))
        .await
        .expect_err("the revoked key is refused once the cache expires");
    assert_eq!(refused.code(), Code::Unauthenticated);
    contacts
        .who_am_i(support::with_key(WhoAmIRequest {}, &new_key))
        .await
        .expect("the new key still works");
    let again = platform
        .run(&["workspace", "revoke-key", &acme.api_key])
        .await;
    assert!(!again.status.success(), "revoking twice is an error");
    let unknown = platform
        .run(&[
            "workspace",
            "issue-key",
            "01a241cd-c8e5-760e-bcfe-e2a068d50b75",
        ])
        .await;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no workspace"));
}
