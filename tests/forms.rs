//! Hosted forms: consent checkbox, redirect after submission, a submission
//! that is both a form event and an identify, bad redirect targets refused,
//! the per-address rate limit, field rules, pages rendered from a workspace
//! template, and double opt-in through a real SMTP server.

mod support;

use rapport_proto::common::v1::ConsentStatus;
use rapport_proto::contacts::v1::Contact;
use rapport_proto::contacts::v1::ListContactsRequest;
use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::FieldType;
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::ingestion::v1::{CreateLandingPageRequest, Form, FormField, LandingPage};
use rapport_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use rapport_proto::messaging::v1::{Channel, CreateTemplateRequest, Template};
use rapport_proto::service_names;
use support::{KafkaWatcher, Layout, Platform, SmtpSink, eventually, http, http_with, with_key};
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
                    ..Default::default()
                },
                FormField {
                    name: "role".into(),
                    label: "Role".into(),
                    required: false,
                    ..Default::default()
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
    assert_eq!(attributes["role"], "CTO");
    assert!(attributes.get("email_consent").is_none(), "{attributes}");
    let consent = contact.email_consent.expect("email consent");
    assert_eq!(consent.status(), ConsentStatus::Subscribed);
    assert_eq!(consent.reason, "form");
    assert!(consent.update_time.is_some());
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

/// The contact with `email`, once it exists and `ready` holds for it.
async fn contact_when(
    platform: &Platform,
    key: &str,
    email: &str,
    what: &str,
    ready: impl Fn(&Contact) -> bool,
) -> Contact {
    let contacts = ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect");
    eventually(what, platform, || {
        let mut contacts = contacts.clone();
        let request = with_key(ListContactsRequest::default(), key);
        let found = async move {
            contacts
                .list_contacts(request)
                .await
                .ok()?
                .into_inner()
                .contacts
                .into_iter()
                .find(|c| c.email == email)
        };
        let ready = &ready;
        async move { found.await.filter(|c| ready(c)) }
    })
    .await
}

fn email_consent(contact: &Contact) -> (ConsentStatus, String) {
    let consent = contact.email_consent.clone().unwrap_or_default();
    (consent.status(), consent.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_opt_in_subscribes_only_after_the_confirmation_link_on_a_templated_page() {
    let smtp = SmtpSink::start().await;
    let platform = Platform::start_on_kafka(
        Layout::OneProcess,
        vec![
            ("RAPPORT_SMTP__HOST".into(), "127.0.0.1".into()),
            ("RAPPORT_SMTP__PORT".into(), smtp.port.to_string()),
        ],
    )
    .await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut messaging =
        MessagingServiceClient::connect(platform.address_of(service_names::MESSAGING))
            .await
            .expect("connect");
    messaging
        .create_template(with_key(
            CreateTemplateRequest {
                template: Some(Template {
                    name: "confirm subscription".into(),
                    channel: Channel::Email.into(),
                    subject: "Please confirm your subscription".into(),
                    html_body: "<p><a href=\"{{ confirm_url }}\">Yes, subscribe me</a></p>".into(),
                    text_body: "Confirm {{ contact.email }}: {{ confirm_url }}".into(),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("template");
    let mut ingestion =
        IngestionServiceClient::connect(platform.address_of(service_names::INGESTION))
            .await
            .expect("connect");
    let field = |name: &str, kind: FieldType, max_length: i32, pattern: &str| FormField {
        name: name.into(),
        label: name.replace('_', " "),
        required: name == "email",
        r#type: kind.into(),
        max_length,
        pattern: pattern.into(),
    };
    let page = LandingPage {
        name: "webinar".into(),
        title: "Webinar <live>".into(),
        headline: "Join the webinar".into(),
        body: "Forty minutes on lead scoring.".into(),
        template: "<html><body class=\"acme-brand\"><h1>{{ headline }}</h1>{{ body }}\
                   <div id=\"signup\">{{ form }}</div><footer>{{ title }}</footer></body></html>"
            .into(),
        form: Some(Form {
            fields: vec![
                field("email", FieldType::Email, 0, ""),
                field("phone", FieldType::Phone, 0, ""),
                field("team_size", FieldType::Number, 6, ""),
                field("invite_code", FieldType::Text, 0, "[A-Z]{3}-[0-9]{2}"),
            ],
            consent_label: "Email me about webinars".into(),
            consent_required: true,
            double_opt_in: true,
            confirmation_template: "confirm subscription".into(),
            thank_you_message: "Check your inbox to confirm.".into(),
            ..Default::default()
        }),
        ..Default::default()
    };

    // A template without the form, double opt-in without a confirmation
    // template, and a pattern that is not a regular expression are refused.
    let mut broken = page.clone();
    broken.name = "broken".into();
    broken.template = "<p>{{ headline }}</p>".into();
    let form = broken.form.as_mut().expect("form");
    form.confirmation_template.clear();
    form.fields[3].pattern = "([A-Z".into();
    let refused = ingestion
        .create_landing_page(with_key(
            CreateLandingPageRequest { page: Some(broken) },
            key,
        ))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let mut fields: Vec<String> = refused
        .get_error_details()
        .bad_request()
        .expect("violations")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "page.form.confirmation_template",
            "page.form.fields[3].pattern",
            "page.template"
        ]
    );

    let created = ingestion
        .create_landing_page(with_key(CreateLandingPageRequest { page: Some(page) }, key))
        .await
        .expect("landing page")
        .into_inner()
        .page
        .expect("page");
    let landing = http("GET", &created.url, None, b"").await;
    assert_eq!(landing.status, 200);
    let html = landing.text();
    assert!(html.starts_with("<html><body class=\"acme-brand\"><h1>Join the webinar</h1><p>Forty minutes on lead scoring.</p>"), "{html}");
    assert!(
        html.contains("<div id=\"signup\"><form method=\"post\""),
        "{html}"
    );
    assert!(
        html.contains("<footer>Webinar &lt;live&gt;</footer>"),
        "{html}"
    );
    assert!(html.contains(r#"name="phone" type="tel""#), "{html}");
    assert!(
        html.contains(r#"name="team_size" type="number" maxlength="6""#),
        "{html}"
    );

    let action = format!(
        "{}/f/{}",
        platform.public_url(),
        created.form.expect("form").form_id
    );
    let content_type = "application/x-www-form-urlencoded";
    let post = |body: String| {
        let action = action.clone();
        async move {
            http_with(
                "POST",
                &action,
                &[
                    ("Content-Type", content_type),
                    ("X-Forwarded-For", "203.0.113.9"),
                ],
                body.as_bytes(),
            )
            .await
        }
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("lin-{run}@example.com");
    let encoded = email.replace('@', "%40");
    let invalid = post(format!(
        "email={encoded}&phone=0207946&team_size=many&invite_code=abc-12&email_consent=yes"
    ))
    .await;
    assert_eq!(invalid.status, 422);
    for problem in [
        "phone is not a phone number",
        "team size is not a number",
        "invite code is not in the expected format",
    ] {
        assert!(
            invalid.text().contains(problem),
            "{problem}: {}",
            invalid.text()
        );
    }
    let accepted = post(format!(
        "email={encoded}&phone=%2B44+20+7946+0958&team_size=12&invite_code=ABC-12&email_consent=yes"
    ))
    .await;
    assert_eq!(accepted.status, 200, "{}", accepted.text());
    assert!(accepted.text().contains("Check your inbox to confirm."));

    // The contact exists with consent pending, and the confirmation arrives.
    let pending = contact_when(&platform, key, &email, "a pending contact", |c| {
        email_consent(c).0 != ConsentStatus::Unspecified
    })
    .await;
    assert_eq!(
        email_consent(&pending),
        (ConsentStatus::Pending, "form".to_owned())
    );
    let messages = smtp.wait_for(1, &platform).await;
    let message = mail_parser::MessageParser::default()
        .parse(&messages[0])
        .expect("MIME message");
    assert_eq!(message.subject(), Some("Please confirm your subscription"));
    assert_eq!(
        message
            .to()
            .and_then(|to| to.first())
            .and_then(|a| a.address()),
        Some(email.as_str())
    );
    let text = message.body_text(0).expect("text part").into_owned();
    let prefix = format!("{}/confirm/", platform.public_url());
    let start = text
        .find(&prefix)
        .unwrap_or_else(|| panic!("no confirm link in {text}"));
    let confirm_url: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    assert!(text.contains(&format!("Confirm {email}:")), "{text}");

    // Opening the link only asks; a forged link is not found.
    let asked = http("GET", &confirm_url, None, b"").await;
    assert_eq!(asked.status, 200);
    assert!(asked.text().contains("Confirm your subscription"));
    let forged = http("POST", &format!("{confirm_url}x"), None, b"").await;
    assert_eq!(forged.status, 404);
    let still = contact_when(&platform, key, &email, "the contact", |_| true).await;
    assert_eq!(email_consent(&still).0, ConsentStatus::Pending);

    let confirmed = http("POST", &confirm_url, None, b"").await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text());
    assert!(confirmed.text().contains("Subscription confirmed"));
    let subscribed = contact_when(&platform, key, &email, "a subscribed contact", |c| {
        email_consent(c).0 == ConsentStatus::Subscribed
    })
    .await;
    assert_eq!(email_consent(&subscribed).1, "double_opt_in_confirmed");
    assert_eq!(subscribed.phone, "+442079460958");
    assert_eq!(smtp.messages().len(), 1, "one confirmation per submission");
}
