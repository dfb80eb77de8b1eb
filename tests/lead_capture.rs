//! The lead-capture play, end to end, across real processes: a visitor fills
//! in a landing page form; contacts makes them a lead; segmentation puts them
//! in "new leads"; automation enrols them in the "welcome" journey; messaging
//! renders and delivers two emails over SMTP to a real SMTP server; the open
//! pixel and a tracked link are followed; reporting counts it all. The
//! automation side goes away between the two emails (stopped with SIGTERM
//! when everything runs in one process, killed with SIGKILL when automation
//! runs alone) and the second email still arrives exactly once.
//!
//! It runs twice: all services in one `rapport serve`, and each service in
//! its own `rapport serve --services X`, always over Kafka (tansu).

mod support;

use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use rapport_proto::automation::v1::automation_service_client::AutomationServiceClient;
use rapport_proto::automation::v1::{
    CreateJourneyRequest, Journey, SendMessage, Step, Trigger, Wait, journey, step, trigger,
};
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::ingestion::v1::{CreateLandingPageRequest, Form, FormField, LandingPage};
use rapport_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use rapport_proto::messaging::v1::{Channel, CreateTemplateRequest, Template};
use rapport_proto::reporting::v1::reporting_service_client::ReportingServiceClient;
use rapport_proto::reporting::v1::{GetLeadsBySourceRequest, GetMessagePerformanceRequest};
use rapport_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
use rapport_proto::segmentation::v1::{
    AllOf, Condition, CreateSegmentRequest, FieldCondition, Segment, condition, field_condition,
};
use rapport_proto::service_names;
use support::{Layout, Platform, SmtpSink, eventually, http, with_key};

/// The journey's wait between the two emails; two days in production.
const WAIT_SECONDS: i64 = 8;

/// How the automation side goes away between the two emails.
#[derive(Clone, Copy)]
enum Interruption {
    /// SIGTERM: a deploy or a scale-down.
    Stop,
    /// SIGKILL: a crash or an OOM kill.
    Crash,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lead_capture_play_in_one_process() {
    run_play(Layout::OneProcess, "all", Interruption::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lead_capture_play_with_a_process_per_service() {
    run_play(Layout::ProcessPerService, "automation", Interruption::Crash).await;
}

fn field(
    name: &str,
    operator: field_condition::Operator,
    value: &str,
    within_seconds: i64,
) -> Condition {
    Condition {
        condition: Some(condition::Condition::Field(FieldCondition {
            field: name.into(),
            operator: operator.into(),
            value: value.into(),
            within_seconds,
        })),
    }
}

fn attribute_value<'a>(html: &'a str, marker: &str) -> &'a str {
    // The quoted attribute value that contains `marker`.
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in {html}"));
    let start = html[..at].rfind('"').expect("opening quote") + 1;
    let end = at + html[at..].find('"').expect("closing quote");
    &html[start..end]
}

async fn run_play(layout: Layout, automation_process: &str, interruption: Interruption) {
    let smtp = SmtpSink::start().await;
    let mut platform = Platform::start_on_kafka(
        layout,
        vec![
            ("RAPPORT_SMTP__HOST".into(), "127.0.0.1".into()),
            ("RAPPORT_SMTP__PORT".into(), smtp.port.to_string()),
            (
                "RAPPORT_SMTP__FROM".into(),
                "Acme <hello@acme.example>".into(),
            ),
            ("RAPPORT_AUTOMATION_POLL_MS".into(), "200".into()),
        ],
    )
    .await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();

    // 1. Templates, the "new leads" segment and the published "welcome" journey.
    let mut messaging =
        MessagingServiceClient::connect(platform.address_of(service_names::MESSAGING))
            .await
            .expect("connect messaging");
    let welcome = messaging
        .create_template(with_key(
            CreateTemplateRequest {
                template: Some(Template {
                    name: "welcome".into(),
                    channel: Channel::Email.into(),
                    subject: "Welcome, {{ contact.first_name }}!".into(),
                    html_body: "<html><body><p>Hello {{ contact.first_name }},</p>\
                                <p>Start with <a href=\"https://docs.acme.example/guide?from=welcome&amp;step=1\">our guide</a>.</p>\
                                <p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p></body></html>"
                        .into(),
                    text_body: "Hello {{ contact.first_name }}, start with our guide: https://docs.acme.example/guide".into(),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("welcome template")
        .into_inner()
        .template
        .expect("template");
    let getting_started = messaging
        .create_template(with_key(
            CreateTemplateRequest {
                template: Some(Template {
                    name: "getting started".into(),
                    channel: Channel::Email.into(),
                    subject: "Getting started with Acme".into(),
                    html_body: "<html><body><p>{{ contact.first_name }}, here is how to begin.</p></body></html>".into(),
                    text_body: "{{ contact.first_name }}, here is how to begin.".into(),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("getting started template")
        .into_inner()
        .template
        .expect("template");

    let mut segmentation =
        SegmentationServiceClient::connect(platform.address_of(service_names::SEGMENTATION))
            .await
            .expect("connect segmentation");
    let new_leads = segmentation
        .create_segment(with_key(
            CreateSegmentRequest {
                segment: Some(Segment {
                    name: "new leads".into(),
                    description: "Leads created in the last 7 days".into(),
                    condition: Some(Condition {
                        condition: Some(condition::Condition::All(AllOf {
                            conditions: vec![
                                field(
                                    "lifecycle_stage",
                                    field_condition::Operator::Equals,
                                    "lead",
                                    0,
                                ),
                                field(
                                    "create_time",
                                    field_condition::Operator::WithinLast,
                                    "",
                                    7 * 24 * 3600,
                                ),
                            ],
                        })),
                    }),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("segment")
        .into_inner()
        .segment
        .expect("segment");

    let mut automation =
        AutomationServiceClient::connect(platform.address_of(service_names::AUTOMATION))
            .await
            .expect("connect automation");
    let journey = automation
        .create_journey(with_key(
            CreateJourneyRequest {
                journey: Some(Journey {
                    name: "welcome".into(),
                    state: journey::State::Published.into(),
                    trigger: Some(Trigger {
                        trigger: Some(trigger::Trigger::SegmentEntered(
                            new_leads.segment_id.clone(),
                        )),
                    }),
                    steps: vec![
                        Step {
                            step_id: "send-welcome".into(),
                            action: Some(step::Action::SendMessage(SendMessage {
                                template: "welcome".into(),
                            })),
                        },
                        Step {
                            step_id: "wait".into(),
                            action: Some(step::Action::Wait(Wait {
                                duration: Some(prost_types::Duration {
                                    seconds: WAIT_SECONDS,
                                    nanos: 0,
                                }),
                            })),
                        },
                        Step {
                            step_id: "send-getting-started".into(),
                            action: Some(step::Action::SendMessage(SendMessage {
                                template: "getting started".into(),
                            })),
                        },
                    ],
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("journey")
        .into_inner()
        .journey
        .expect("journey");

    let mut ingestion =
        IngestionServiceClient::connect(platform.address_of(service_names::INGESTION))
            .await
            .expect("connect ingestion");
    let page = ingestion
        .create_landing_page(with_key(
            CreateLandingPageRequest {
                page: Some(LandingPage {
                    name: "spring guide".into(),
                    title: "The Acme spring guide".into(),
                    headline: "Get the guide".into(),
                    body: "Everything you need to start.".into(),
                    form: Some(Form {
                        fields: vec![
                            FormField {
                                name: "email".into(),
                                label: "Email".into(),
                                required: true,
                                ..Default::default()
                            },
                            FormField {
                                name: "first_name".into(),
                                label: "First name".into(),
                                required: false,
                                ..Default::default()
                            },
                        ],
                        submit_label: "Send me the guide".into(),
                        thank_you_message: "Check your inbox.".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("landing page")
        .into_inner()
        .page
        .expect("page");

    // 2. A visitor arrives from the newsletter and submits the form over HTTP.
    let landing = http(
        "GET",
        &format!("{}?utm_source=newsletter&utm_medium=email", page.url),
        None,
        b"",
    )
    .await;
    assert_eq!(landing.status, 200, "{}", landing.text());
    let html = landing.text();
    assert!(html.contains("Get the guide"));
    assert!(
        html.contains(r#"name="utm_source" value="newsletter""#),
        "{html}"
    );
    let action = attribute_value(&html, "/f/").to_owned();
    let bad = http(
        "POST",
        &action,
        Some("application/x-www-form-urlencoded"),
        b"email=not-an-email&first_name=Ada",
    )
    .await;
    assert_eq!(
        bad.status,
        422,
        "an invalid email is the visitor's mistake: {}",
        bad.text()
    );
    let submitted = http(
        "POST",
        &action,
        Some("application/x-www-form-urlencoded"),
        b"email=ada%40example.com&first_name=Ada&utm_source=newsletter&utm_medium=email&website=",
    )
    .await;
    assert_eq!(
        submitted.status,
        200,
        "{}\n{}",
        submitted.text(),
        platform.logs()
    );
    assert!(submitted.text().contains("Check your inbox."));

    // 3. The welcome email arrives: personalised, multipart, tracked, unsubscribable.
    let first = smtp.wait_for(1, &platform).await;
    let email = MessageParser::default()
        .parse(&first[0])
        .expect("MIME message");
    assert_eq!(email.subject(), Some("Welcome, Ada!"));
    assert_eq!(
        email
            .to()
            .and_then(|to| to.first())
            .and_then(|a| a.address()),
        Some("ada@example.com")
    );
    let content_type = email.content_type().expect("content type");
    assert_eq!(content_type.ctype(), "multipart");
    assert_eq!(content_type.subtype(), Some("alternative"));
    let text = email.body_text(0).expect("text part").into_owned();
    assert!(text.contains("Hello Ada"), "{text}");
    let html = email.body_html(0).expect("html part").into_owned();
    assert!(html.contains("Hello Ada"), "{html}");
    let public = platform.public_url();
    let pixel = attribute_value(&html, &format!("{public}/o/")).to_owned();
    let tracked = attribute_value(&html, &format!("{public}/c/")).to_owned();
    assert!(
        !html.contains("href=\"https://docs.acme.example"),
        "links are tracked: {html}"
    );
    let list_unsubscribe = email
        .header_raw("List-Unsubscribe")
        .expect("List-Unsubscribe header")
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned();
    assert!(
        list_unsubscribe.starts_with(&format!("{public}/u/")),
        "{list_unsubscribe}"
    );
    assert_eq!(
        email.header_raw("List-Unsubscribe-Post").map(str::trim),
        Some("List-Unsubscribe=One-Click")
    );

    // 5. The automation side goes away while the journey waits, and comes back.
    match interruption {
        Interruption::Stop => platform.stop_and_restart(automation_process).await,
        Interruption::Crash => platform.crash_and_restart(automation_process).await,
    }

    let both = smtp.wait_for(2, &platform).await;
    let second = MessageParser::default()
        .parse(&both[1])
        .expect("MIME message");
    assert_eq!(second.subject(), Some("Getting started with Acme"));
    assert!(
        second
            .body_text(0)
            .expect("text")
            .contains("Ada, here is how to begin.")
    );
    // Exactly once: nothing else arrives after a few more runner polls.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        smtp.messages().len(),
        2,
        "the second email arrived exactly once"
    );

    // 4. The recipient opens the email and follows the link.
    let opened = http("GET", &pixel, None, b"").await;
    assert_eq!(opened.status, 200);
    assert_eq!(opened.header("content-type"), Some("image/gif"));
    let followed = http("GET", &tracked.replace("&amp;", "&"), None, b"").await;
    assert!(matches!(followed.status, 302 | 303 | 307), "{followed:?}");
    assert_eq!(
        followed.header("location"),
        Some("https://docs.acme.example/guide?from=welcome&step=1")
    );
    let forged = format!("{}x", tracked.replace("&amp;", "&"));
    assert_eq!(
        http("GET", &forged, None, b"").await.status,
        404,
        "no open redirect"
    );

    // Reporting: 1 lead from the newsletter; 2 sent, 1 open, 1 click.
    let mut reporting =
        ReportingServiceClient::connect(platform.address_of(service_names::REPORTING))
            .await
            .expect("connect reporting");
    let leads = eventually("the lead to be counted", &platform, || {
        let mut reporting = reporting.clone();
        async move {
            let rows = reporting
                .get_leads_by_source(with_key(GetLeadsBySourceRequest::default(), key))
                .await
                .ok()?
                .into_inner()
                .rows;
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    assert_eq!(leads.len(), 1);
    assert_eq!(
        (leads[0].source.as_str(), leads[0].leads),
        ("newsletter", 1)
    );

    let performance = |reporting: ReportingServiceClient<tonic::transport::Channel>| {
        let journey_id = journey.journey_id.clone();
        async move {
            reporting
                .clone()
                .get_message_performance(with_key(
                    GetMessagePerformanceRequest {
                        journey_id,
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .ok()
                .map(|response| response.into_inner().rows)
        }
    };
    let welcome_id = welcome.template_id.clone();
    let rows = eventually(
        "sends, the open and the click to be counted",
        &platform,
        || {
            let reporting = reporting.clone();
            let welcome_id = welcome_id.clone();
            async move {
                let rows = performance(reporting).await?;
                let welcome_row = rows.iter().find(|r| r.template_id == welcome_id)?;
                let done = rows.iter().map(|r| r.sent).sum::<i64>() == 2
                    && welcome_row.opened == 1
                    && welcome_row.clicked == 1;
                done.then_some(rows)
            }
        },
    )
    .await;
    let welcome_row = rows
        .iter()
        .find(|r| r.template_id == welcome.template_id)
        .expect("welcome row");
    let started_row = rows
        .iter()
        .find(|r| r.template_id == getting_started.template_id)
        .expect("getting started row");
    assert_eq!(
        (welcome_row.sent, welcome_row.opened, welcome_row.clicked),
        (1, 1, 1)
    );
    assert_eq!(
        (started_row.sent, started_row.opened, started_row.clicked),
        (1, 0, 0)
    );
    assert!(rows.iter().all(|r| r.journey_id == journey.journey_id));

    // The unsubscribe link works (RFC 8058 one-click POST) and is counted.
    let confirm = http("GET", &list_unsubscribe, None, b"").await;
    assert_eq!(confirm.status, 200);
    let unsubscribed = http(
        "POST",
        &list_unsubscribe,
        Some("application/x-www-form-urlencoded"),
        b"List-Unsubscribe=One-Click",
    )
    .await;
    assert_eq!(unsubscribed.status, 200, "{}", unsubscribed.text());
    eventually("the unsubscribe to be counted", &platform, || {
        let reporting = reporting.clone();
        async move {
            let rows = performance(reporting).await?;
            (rows.iter().map(|r| r.unsubscribed).sum::<i64>() == 1).then_some(())
        }
    })
    .await;
    let _ = reporting
        .get_leads_by_source(with_key(GetLeadsBySourceRequest::default(), key))
        .await;
}
