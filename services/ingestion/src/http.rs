//! Ingestion's public HTTP endpoint (default port 8080): hosted landing pages
//! and their forms, the email open pixel, tracked-link redirects and
//! unsubscribe links (RFC 8058 one-click). Client mistakes get a 4xx with a
//! reason; only Rapport's own failures are 5xx.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use rapport_core::json::json_to_struct;
use rapport_core::signing::{Signer, TrackingKind, TrackingToken};
use rapport_core::{ApiError, WorkspaceId};
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::{FieldType, FormField};

use crate::intake::Intake;
use crate::{pages, segment};

/// A transparent 1x1 GIF.
const PIXEL: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Form submissions allowed per client address and minute.
pub const FORM_SUBMISSIONS_PER_MINUTE: u32 = 10;

/// Counts form submissions per client address in one-minute windows.
#[derive(Default)]
pub struct FormLimiter {
    windows:
        std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
}

impl FormLimiter {
    pub fn allow(&self, ip: std::net::IpAddr) -> bool {
        let now = std::time::Instant::now();
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start).as_secs() < 60);
        }
        let (start, count) = windows.entry(ip).or_insert((now, 0));
        if now.duration_since(*start).as_secs() >= 60 {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= FORM_SUBMISSIONS_PER_MINUTE
    }
}

/// The client's address: the first X-Forwarded-For hop when a proxy in
/// front of ingestion sets it, otherwise the connection's peer.
fn client_ip(headers: &HeaderMap, peer: std::net::SocketAddr) -> std::net::IpAddr {
    headers
        .get("x-forwarded-for")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(',').next())
        .and_then(|first| first.trim().parse().ok())
        .unwrap_or_else(|| peer.ip())
}

pub struct HttpState {
    pub intake: Intake,
    pub signer: Signer,
    pub public_url: String,
    /// Resolves write keys of the Segment-compatible API.
    pub keys: Arc<rapport_tenancy::KeyResolver>,
    pub form_limiter: FormLimiter,
}

/// A server span per request, child of the caller's trace when it sent one.
async fn trace_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "http",
        otel.kind = "server",
        otel.name = format!("{method} {route}"),
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let _ = span.set_parent(rapport_grpc::context_from_headers(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/t.js", get(snippet))
        .route("/p/{page_id}", get(landing_page))
        .route("/f/{form_id}", axum::routing::post(submit_form))
        .route("/o/{token}", get(open_pixel))
        .route("/c/{token}", get(click))
        .route("/u/{token}", get(unsubscribe_page).post(unsubscribe))
        .route("/confirm/{token}", get(confirm_page).post(confirm))
        .route_layer(axum::middleware::from_fn(trace_request))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .merge(
            Router::new()
                .route(
                    "/v1/track",
                    axum::routing::post(segment::track).options(preflight),
                )
                .route(
                    "/v1/identify",
                    axum::routing::post(segment::identify).options(preflight),
                )
                .route(
                    "/v1/page",
                    axum::routing::post(segment::page).options(preflight),
                )
                .route(
                    "/v1/screen",
                    axum::routing::post(segment::screen).options(preflight),
                )
                .route(
                    "/v1/group",
                    axum::routing::post(segment::group).options(preflight),
                )
                .route(
                    "/v1/alias",
                    axum::routing::post(segment::alias).options(preflight),
                )
                .route(
                    "/v1/batch",
                    axum::routing::post(segment::batch).options(preflight),
                )
                .route_layer(axum::middleware::from_fn(trace_request))
                .layer(axum::extract::DefaultBodyLimit::max(
                    segment::MAX_WIRE_BYTES,
                )),
        )
        .with_state(state)
}

fn error_page(error: &ApiError) -> Response {
    let status = StatusCode::from_u16(error.code.http_status().as_u16())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        status,
        Html(pages::render_message(
            "Something is not right",
            &error.message,
        )),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(pages::render_message(
            "Not found",
            &format!("This {what} does not exist."),
        )),
    )
        .into_response()
}

async fn landing_page(
    State(state): State<Arc<HttpState>>,
    Path(page_id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let Ok(page_id) = page_id.parse() else {
        return not_found("page");
    };
    match pages::by_page(&state.intake.pool, page_id).await {
        Ok(Some(stored)) => {
            let utm: Vec<(String, String)> = query
                .into_iter()
                .filter(|(name, value)| {
                    pages::UTM_PARAMETERS.contains(&name.as_str()) && value.len() <= 200
                })
                .collect();
            Html(pages::render_page(&stored.page, &state.public_url, &utm)).into_response()
        }
        Ok(None) => not_found("page"),
        Err(error) => error_page(&error),
    }
}

/// Checks one submitted value against its field's rules.
fn check_value(field: &FormField, value: &str) -> Result<(), &'static str> {
    if value.chars().count() > pages::max_chars(field) {
        return Err("is too long");
    }
    let kind = match field.name.as_str() {
        "email" => FieldType::Email,
        _ => field.r#type(),
    };
    match kind {
        FieldType::Email if !looks_like_email(value) => return Err("is not an email address"),
        FieldType::Phone if !looks_like_phone(value) => {
            return Err("is not a phone number with its country code (+44 20 7946 0958)");
        }
        FieldType::Number if value.parse::<f64>().map_or(true, |n| !n.is_finite()) => {
            return Err("is not a number");
        }
        _ => {}
    }
    if !field.pattern.is_empty()
        && !pages::pattern(&field.pattern).is_some_and(|pattern| pattern.is_match(value))
    {
        return Err("is not in the expected format");
    }
    Ok(())
}

fn looks_like_phone(value: &str) -> bool {
    let compact: String = value
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
        .collect();
    compact.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

fn looks_like_email(value: &str) -> bool {
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !value.contains(char::is_whitespace)
}

async fn submit_form(
    State(state): State<Arc<HttpState>>,
    Path(form_id): Path<String>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(values): Form<Vec<(String, String)>>,
) -> Response {
    let Ok(form_id) = form_id.parse() else {
        return not_found("form");
    };
    if !state.form_limiter.allow(client_ip(&headers, peer)) {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            Html(pages::render_message(
                "Too many submissions",
                "Please wait a minute and try again.",
            )),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return response;
    }
    let stored = match pages::by_form(&state.intake.pool, form_id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return not_found("form"),
        Err(error) => return error_page(&error),
    };
    let form = stored.page.form.clone().unwrap_or_default();
    let thank_you = if form.thank_you_message.is_empty() {
        "Thank you!"
    } else {
        &form.thank_you_message
    };
    let value_of = |name: &str| {
        values
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.trim().to_owned())
            .unwrap_or_default()
    };
    if !value_of(pages::HONEYPOT_FIELD).is_empty() {
        // A bot filled the hidden field: look successful, record nothing.
        return Html(pages::render_message("Thank you", thank_you)).into_response();
    }
    let mut traits = serde_json::Map::new();
    let mut problems = Vec::new();
    for field in &form.fields {
        let value = value_of(&field.name);
        let label = if field.label.is_empty() {
            &field.name
        } else {
            &field.label
        };
        if value.is_empty() {
            if field.required {
                problems.push(format!("{label} is required."));
            }
            continue;
        }
        if let Err(problem) = check_value(field, &value) {
            problems.push(format!("{label} {problem}."));
            continue;
        }
        traits.insert(field.name.clone(), serde_json::Value::String(value));
    }
    let consented = !value_of(pages::CONSENT_FIELD).is_empty();
    if !form.consent_label.trim().is_empty() {
        if form.consent_required && !consented {
            problems.push(format!("{} is required.", form.consent_label.trim()));
        }
        // With double opt-in, consent stays pending until the person
        // follows the link in the confirmation email.
        let consent = if consented && form.double_opt_in {
            serde_json::Value::String("pending".into())
        } else {
            serde_json::Value::Bool(consented)
        };
        traits.insert(pages::CONSENT_FIELD.into(), consent);
    }
    if traits.get("email").is_none() && problems.is_empty() {
        problems.push("An email address is required.".to_owned());
    }
    if !problems.is_empty() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Html(pages::render_message(
                "Please check the form",
                &problems.join(" "),
            )),
        )
            .into_response();
    }
    let mut properties = serde_json::Map::new();
    properties.insert("form_id".into(), form_id.to_string().into());
    properties.insert("page_id".into(), stored.page.page_id.clone().into());
    if form.double_opt_in && consented {
        properties.insert(
            "confirmation_template".into(),
            form.confirmation_template.trim().into(),
        );
    }
    let mut campaign = serde_json::Map::new();
    for name in pages::UTM_PARAMETERS {
        let value = value_of(name);
        if !value.is_empty() {
            properties.insert(name.into(), value.clone().into());
            let key = match name.trim_start_matches("utm_") {
                "campaign" => "name",
                other => other,
            };
            campaign.insert(key.into(), value.into());
        }
    }
    let mut context = serde_json::Map::new();
    context.insert("campaign".into(), serde_json::Value::Object(campaign));
    context.insert("page".into(), serde_json::json!({ "url": stored.page.url }));
    if let Some(agent) = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        context.insert("userAgent".into(), agent.into());
    }
    // The visitor's anonymous id, when the form carries one (a page's own
    // script may add an `anonymous_id` field); otherwise a new one.
    let anonymous_id = value_of("anonymous_id");
    let anonymous_id = if anonymous_id.is_empty() || anonymous_id.len() > 255 {
        rapport_core::ids::new_id().to_string()
    } else {
        anonymous_id
    };
    let traits = json_to_struct(&serde_json::Value::Object(traits));
    let context = json_to_struct(&serde_json::Value::Object(context));
    // A submission is a form event and an identify, accepted together.
    let submitted = IngestedEvent {
        kind: Kind::FormSubmitted.into(),
        name: "Form Submitted".into(),
        anonymous_id: anonymous_id.clone(),
        traits: Some(traits.clone()),
        properties: Some(json_to_struct(&serde_json::Value::Object(properties))),
        context: Some(context.clone()),
        ..Default::default()
    };
    let identify = IngestedEvent {
        kind: Kind::Identify.into(),
        anonymous_id,
        traits: Some(traits),
        context: Some(context),
        ..Default::default()
    };
    match state
        .intake
        .accept_batch(stored.workspace, vec![submitted, identify])
        .await
    {
        Ok(_) if !form.redirect_url.trim().is_empty() => {
            Redirect::to(form.redirect_url.trim()).into_response()
        }
        Ok(_) => Html(pages::render_message("Thank you", thank_you)).into_response(),
        Err(error) => error_page(&error),
    }
}

/// Verifies a tracking token of `kind`.
fn token(
    state: &HttpState,
    token: &str,
    kind: TrackingKind,
) -> Option<(WorkspaceId, TrackingToken)> {
    let token: TrackingToken = state.signer.verify(token).ok()?;
    if token.kind != kind {
        return None;
    }
    let workspace = token.workspace_id.parse().ok()?;
    Some((workspace, token))
}

async fn record(
    state: &HttpState,
    workspace: WorkspaceId,
    token: &TrackingToken,
    kind: Kind,
    name: &str,
) -> Result<(), ApiError> {
    let mut properties = serde_json::json!({ "message_id": token.message_id });
    if !token.url.is_empty() {
        properties["url"] = token.url.clone().into();
    }
    let event = IngestedEvent {
        kind: kind.into(),
        name: name.into(),
        contact_id: token.contact_id.clone(),
        user_id: token.contact_id.clone(),
        properties: Some(json_to_struct(&properties)),
        ..Default::default()
    };
    state.intake.accept(workspace, event).await.map(|_| ())
}

async fn open_pixel(State(state): State<Arc<HttpState>>, Path(raw): Path<String>) -> Response {
    let raw = raw.trim_end_matches(".gif");
    let Some((workspace, token)) = token(&state, raw, TrackingKind::Open) else {
        return not_found("image");
    };
    if let Err(error) = record(&state, workspace, &token, Kind::EmailOpened, "Email Opened").await {
        tracing::warn!(error = %error.message, "open not recorded");
    }
    (
        [
            (header::CONTENT_TYPE, "image/gif"),
            (
                header::CACHE_CONTROL,
                "no-store, no-cache, must-revalidate, max-age=0",
            ),
        ],
        PIXEL.to_vec(),
    )
        .into_response()
}

async fn click(State(state): State<Arc<HttpState>>, Path(raw): Path<String>) -> Response {
    let Some((workspace, token)) = token(&state, &raw, TrackingKind::Click) else {
        // Unsigned or altered: never redirect (no open redirect).
        return not_found("link");
    };
    if let Err(error) = record(&state, workspace, &token, Kind::LinkClicked, "Link Clicked").await {
        tracing::warn!(error = %error.message, "click not recorded");
    }
    Redirect::to(&token.url).into_response()
}

/// A page whose button posts back to the link it was opened from, for
/// links whose action must not happen on a mere GET.
fn button_page(
    state: &HttpState,
    raw: &str,
    kind: TrackingKind,
    title: &str,
    prompt: &str,
    button: &str,
) -> Response {
    if token(state, raw, kind).is_none() {
        return not_found("link");
    }
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head><body>\
         <h1>{title}</h1><p>{prompt}</p>\
         <form method=\"post\"><button type=\"submit\">{button}</button></form></body></html>"
    ))
    .into_response()
}

/// Records what a signed link of `kind` stands for as an `event` named
/// `name`, and answers with a page saying it is done.
async fn follow_link(
    state: &HttpState,
    raw: &str,
    kind: TrackingKind,
    event: (Kind, &str),
    done: (&str, &str),
) -> Response {
    let Some((workspace, token)) = token(state, raw, kind) else {
        return not_found("link");
    };
    match record(state, workspace, &token, event.0, event.1).await {
        Ok(()) => Html(pages::render_message(done.0, done.1)).into_response(),
        Err(error) => error_page(&error),
    }
}

async fn unsubscribe_page(
    State(state): State<Arc<HttpState>>,
    Path(raw): Path<String>,
) -> Response {
    button_page(
        &state,
        &raw,
        TrackingKind::Unsubscribe,
        "Unsubscribe",
        "Stop receiving these emails?",
        "Unsubscribe",
    )
}

/// One-click unsubscribe: mail clients POST `List-Unsubscribe=One-Click`
/// here (RFC 8058); the confirmation page's button posts here too.
async fn unsubscribe(State(state): State<Arc<HttpState>>, Path(raw): Path<String>) -> Response {
    follow_link(
        &state,
        &raw,
        TrackingKind::Unsubscribe,
        (Kind::Unsubscribed, "Unsubscribed"),
        ("Unsubscribed", "You will not get these emails any more."),
    )
    .await
}

/// The link in a double opt-in email. Following it shows a button rather
/// than confirming at once, so mail scanners that open links do not
/// subscribe anyone.
async fn confirm_page(State(state): State<Arc<HttpState>>, Path(raw): Path<String>) -> Response {
    button_page(
        &state,
        &raw,
        TrackingKind::ConfirmOptIn,
        "Confirm your subscription",
        "Press the button to start getting our emails.",
        "Confirm",
    )
}

async fn confirm(State(state): State<Arc<HttpState>>, Path(raw): Path<String>) -> Response {
    follow_link(
        &state,
        &raw,
        TrackingKind::ConfirmOptIn,
        (Kind::OptInConfirmed, "Opt-In Confirmed"),
        (
            "Subscription confirmed",
            "Thank you: you will now get our emails.",
        ),
    )
    .await
}

/// The tracking snippet, cached for an hour by browsers and CDNs.
async fn snippet() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../assets/rapport.js"),
    )
        .into_response()
}

/// CORS preflight for the tracking API: pages on any site post to it with
/// their write key, which is public by design.
async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::ACCESS_CONTROL_ALLOW_METHODS, "POST, OPTIONS"),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Authorization, Content-Type, Content-Encoding",
            ),
            (header::ACCESS_CONTROL_MAX_AGE, "86400"),
        ],
    )
        .into_response()
}
