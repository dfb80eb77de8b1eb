//! Hosted forms: consent checkbox, redirect after submission, a submission
//! that is both a form event and an identify, bad redirect targets refused,
//! and the per-address rate limit.

mod support;

use rapport_proto::contacts::v1::ListContactsRequest;
use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::ingestion::v1::{CreateLandingPageRequest, Form, FormField, LandingPage};
use rapport_proto::service_names;
use support::{KafkaWatcher, Layout, Platform, eventually, http, http_with, with_key};
use tonic_types::StatusExt;

fn page(redirect_url: &str) -> LandingPage {
    LandingPage {
        name: format!("newsletter {redirect_url}"),
        title: "Newsletter".into(),
        form: Some(Form {
            fields: vec![
                FormField {
                    name: "email".into(),
                    label: "Email".into(),
                    required: true,
                },
                FormField {
                    name: "role".into(),
                    label: "Role".into(),
                    required: false,
                },
            ],
            redirect_url: redirect_url.into(),
            consent_label: "Email me product news".into(),
            consent_required: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_record_consent_identify_redirect_and_limit_abuse() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let watcher = KafkaWatcher::start(&platform, rapport_bus::topics::INGESTED_EVENTS).await;
    let mut ingestion =
        IngestionServiceClient::connect(platform.address_of(service_names::INGESTION))
            .await
            .expect("connect");

    let refused = ingestion
        .create_landing_page(with_key(
            CreateLandingPageRequest {
                page: Some(page("javascript:alert(1)")),
            },
            &acme.api_key,
        ))
        .await
        .expect_err("only http(s) redirects");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused
            .get_error_details()
            .bad_request()
            .expect("violations")
            .field_violations[0]
            .field,
        "page.form.redirect_url"
    );

    let created = ingestion
        .create_landing_page(with_key(
            CreateLandingPageRequest {
                page: Some(page("https://acme.example/thanks")),
            },
            &acme.api_key,
        ))
        .await
        .expect("landing page")
        .into_inner()
        .page
        .expect("page");
    let landing = http("GET", &created.url, None, b"").await;
    assert!(
        landing.text().contains(r#"name="email_consent""#),
        "{}",
        landing.text()
    );
    let action = format!(
        "{}/f/{}",
        platform.public_url(),
        created.form.expect("form").form_id
    );
    let form = "application/x-www-form-urlencoded";

    let without_consent = http_with(
        "POST",
        &action,
        &[("Content-Type", form), ("X-Forwarded-For", "203.0.113.1")],
        b"email=ada%40example.com",
    )
    .await;
    assert_eq!(without_consent.status, 422);
    assert!(
        without_consent
            .text()
            .contains("Email me product news is required")
    );

    let run = uuid::Uuid::new_v4().simple().to_string();
    let anonymous_id = format!("anon-{run}");
    let body = format!(
        "email=grace-{run}%40example.com&role=CTO&email_consent=yes&anonymous_id={anonymous_id}"
    );
    let submitted = http_with(
        "POST",
        &action,
        &[("Content-Type", form), ("X-Forwarded-For", "203.0.113.2")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(submitted.status, 303, "{}", submitted.text());
    assert_eq!(
        submitted.header("location"),
        Some("https://acme.example/thanks")
    );

    let events = eventually("the form event and the identify", &platform, || {
        let events = watcher.envelopes_for(&anonymous_id);
        async move { (events.len() >= 2).then_some(events) }
    })
    .await;
    let kinds: Vec<Kind> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::IngestedEvent(event)) => Some(event.kind()),
            _ => None,
        })
        .collect();
    assert!(
        kinds.contains(&Kind::FormSubmitted) && kinds.contains(&Kind::Identify),
        "{kinds:?}"
    );

    let mut contacts = ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect");
    let email = format!("grace-{run}@example.com");
    let contact = eventually("the contact with its consent", &platform, || {
        let mut contacts = contacts.clone();
        let key = acme.api_key.clone();
        let email = email.clone();
        async move {
            contacts
                .list_contacts(with_key(ListContactsRequest::default(), &key))
                .await
                .ok()?
                .into_inner()
                .contacts
                .into_iter()
                .find(|c| c.email == email)
        }
    })
    .await;
    let attributes =
        rapport_core::json::struct_to_json(contact.attributes.as_ref().expect("attributes"));
    assert_eq!(attributes["email_consent"], serde_json::json!(true));
    assert_eq!(attributes["role"], "CTO");
    let _ = contacts
        .list_contacts(with_key(ListContactsRequest::default(), &acme.api_key))
        .await;

    // Ten posts a minute per address; the eleventh is refused with a retry hint.
    for attempt in 0..10 {
        let response = http_with(
            "POST",
            &action,
            &[("Content-Type", form), ("X-Forwarded-For", "198.51.100.7")],
            b"email=not-an-email",
        )
        .await;
        assert_eq!(response.status, 422, "attempt {attempt}");
    }
    let limited = http_with(
        "POST",
        &action,
        &[("Content-Type", form), ("X-Forwarded-For", "198.51.100.7")],
        b"email=not-an-email",
    )
    .await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("60"));
    let other = http_with(
        "POST",
        &action,
        &[("Content-Type", form), ("X-Forwarded-For", "198.51.100.8")],
        b"email=not-an-email",
    )
    .await;
    assert_eq!(other.status, 422, "another address is not limited");
}
