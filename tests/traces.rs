//! One trace follows a form submission across services and Kafka hops: the
//! spans of every process are exported over OTLP to a receiver this test
//! runs, and one trace must hold spans of at least three services, with a
//! producer and a consumer span (the Kafka hop) and a database span.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::ingestion::v1::{CreateLandingPageRequest, Form, FormField, LandingPage};
use rapport_proto::service_names;
use support::{Layout, Platform, eventually, http, with_key};

#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    trace_id: Vec<u8>,
    name: String,
    kind: i32,
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| resource.attributes.iter())
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref())
                .and_then(|value| match &value.value {
                    Some(Value::StringValue(name)) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: span.trace_id,
                        name: span.name,
                        kind: span.kind,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_submission_is_one_trace_across_services_and_kafka() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("address"));
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let platform = Platform::start_on_kafka(
        Layout::ProcessPerService,
        vec![
            ("RAPPORT_OTLP_ENDPOINT".into(), otlp),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        ],
    )
    .await;
    let acme = platform.create_workspace("Acme").await;
    let mut ingestion =
        IngestionServiceClient::connect(platform.address_of(service_names::INGESTION))
            .await
            .expect("connect");
    let page = ingestion
        .create_landing_page(with_key(
            CreateLandingPageRequest {
                page: Some(LandingPage {
                    name: "trial".into(),
                    title: "Start a trial".into(),
                    form: Some(Form {
                        fields: vec![FormField {
                            name: "email".into(),
                            label: "Email".into(),
                            required: true,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            &acme.api_key,
        ))
        .await
        .expect("landing page")
        .into_inner()
        .page
        .expect("page");
    let form_id = page.form.expect("form").form_id;
    let submitted = http(
        "POST",
        &format!("{}/f/{form_id}", platform.public_url()),
        Some("application/x-www-form-urlencoded"),
        b"email=grace%40example.com",
    )
    .await;
    assert_eq!(submitted.status, 200, "{}", submitted.text());

    let (services, kinds) = eventually("one trace across three services", &platform, || {
        let spans = receiver.spans.lock().expect("lock").clone();
        async move {
            let mut traces: BTreeMap<Vec<u8>, Vec<ReceivedSpan>> = BTreeMap::new();
            for span in spans {
                traces.entry(span.trace_id.clone()).or_default().push(span);
            }
            traces.into_values().find_map(|spans| {
                let services: BTreeSet<String> = spans.iter().map(|s| s.service.clone()).collect();
                let kinds: BTreeSet<i32> = spans.iter().map(|s| s.kind).collect();
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                let crosses = [
                    "rapport-ingestion",
                    "rapport-contacts",
                    "rapport-segmentation",
                ]
                .iter()
                .all(|service| services.contains(*service));
                let kafka_hop = kinds.contains(&(SpanKind::Producer as i32))
                    && kinds.contains(&(SpanKind::Consumer as i32));
                let starts_at_the_form = names.iter().any(|name| name.starts_with("POST /f/"));
                let database = spans.iter().any(|s| {
                    s.service == "rapport-contacts"
                        && s.name == "UPSERT contacts"
                        && s.kind == SpanKind::Client as i32
                });
                (crosses && kafka_hop && starts_at_the_form && database)
                    .then_some((services, kinds))
            })
        }
    })
    .await;
    assert!(services.len() >= 3, "{services:?}");
    assert!(kinds.contains(&(SpanKind::Server as i32)));
}
