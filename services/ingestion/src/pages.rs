//! Landing pages and forms: storage, validation and HTML.

use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};
use prost::Message;
use rapport_core::{ApiError, ErrorCode, FieldViolation, WorkspaceId};
use rapport_db::map_db_error;
use rapport_proto::ingestion::v1::{FieldType, Form, LandingPage};
use sqlx::PgPool;
use uuid::Uuid;

/// Contact fields a form may fill besides custom attributes.
const MAX_FIELDS: usize = 30;
/// The hidden field bots fill in and people do not see.
pub const HONEYPOT_FIELD: &str = "website";
/// Query parameters a page carries into its submissions.
pub const UTM_PARAMETERS: [&str; 5] = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
];

pub fn check(page: &LandingPage) -> Result<(), ApiError> {
    let mut violations = Vec::new();
    let mut violation = |field: String, description: &str| {
        violations.push(FieldViolation {
            field,
            description: description.to_owned(),
        })
    };
    if page.title.trim().is_empty() {
        violation("page.title".into(), "is required");
    }
    match &page.form {
        None => violation("page.form".into(), "is required"),
        Some(form) => {
            if form.fields.is_empty() || form.fields.len() > MAX_FIELDS {
                violation("page.form.fields".into(), "must hold 1 to 30 fields");
            }
            let mut names = std::collections::HashSet::new();
            for (index, field) in form.fields.iter().enumerate() {
                let name = field.name.trim();
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !UTM_PARAMETERS.contains(&name)
                    && !RESERVED_FIELDS.contains(&name)
                    && name != HONEYPOT_FIELD;
                if !valid {
                    violation(
                        format!("page.form.fields[{index}].name"),
                        "must be 1 to 64 letters, digits or underscores, and not a reserved name",
                    );
                } else if !names.insert(name.to_owned()) {
                    violation(
                        format!("page.form.fields[{index}].name"),
                        "is used by an earlier field",
                    );
                }
                if FieldType::try_from(field.r#type).is_err() {
                    violation(
                        format!("page.form.fields[{index}].type"),
                        "is not a known field type",
                    );
                }
                if !(0..=MAX_VALUE_CHARS as i32).contains(&field.max_length) {
                    violation(
                        format!("page.form.fields[{index}].max_length"),
                        "must be 0 to 500",
                    );
                }
                if !field.pattern.is_empty() && pattern(&field.pattern).is_none() {
                    violation(
                        format!("page.form.fields[{index}].pattern"),
                        "must be a regular expression of up to 200 characters",
                    );
                }
            }
            if !form.fields.iter().any(|f| f.name.trim() == "email") {
                violation(
                    "page.form.fields".into(),
                    "must include a field named `email`",
                );
            }
            let redirect = form.redirect_url.trim();
            if !redirect.is_empty() && !url_is_http(redirect) {
                violation(
                    "page.form.redirect_url".into(),
                    "must be an absolute http or https URL",
                );
            }
            if (form.consent_required || form.double_opt_in) && form.consent_label.trim().is_empty()
            {
                violation(
                    "page.form.consent_label".into(),
                    "is required when consent_required or double_opt_in is set",
                );
            }
            if form.double_opt_in && !valid_name(&form.confirmation_template) {
                violation(
                    "page.form.confirmation_template".into(),
                    "must name an email template when double_opt_in is set",
                );
            }
            if !form.double_opt_in && !form.confirmation_template.is_empty() {
                violation(
                    "page.form.confirmation_template".into(),
                    "is only used with double_opt_in",
                );
            }
        }
    }
    if !page.template.is_empty() {
        if let Err(problem) = check_template(&page.template) {
            violation("page.template".into(), &problem);
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_fields(violations))
    }
}

fn valid_name(name: &str) -> bool {
    !name.trim().is_empty() && name.len() <= 200
}

/// Longest value a form field takes, in characters.
pub const MAX_VALUE_CHARS: usize = 500;
/// Largest page template, in bytes.
const MAX_TEMPLATE_BYTES: usize = 64 * 1024;

/// The longest value `field` takes.
pub fn max_chars(field: &rapport_proto::ingestion::v1::FormField) -> usize {
    match field.max_length {
        1.. => field.max_length as usize,
        _ => MAX_VALUE_CHARS,
    }
}

/// A field's pattern, anchored so the whole value must match.
pub fn pattern(source: &str) -> Option<regex::Regex> {
    if source.len() > 200 {
        return None;
    }
    regex::RegexBuilder::new(&format!("^(?:{source})$"))
        .size_limit(1 << 20)
        .build()
        .ok()
}

fn liquid_parser() -> &'static liquid::Parser {
    static PARSER: std::sync::OnceLock<liquid::Parser> = std::sync::OnceLock::new();
    PARSER.get_or_init(|| {
        liquid::ParserBuilder::with_stdlib()
            .build()
            .unwrap_or_else(|error| panic!("the standard Liquid library builds: {error}"))
    })
}

const FORM_MARKER: &str = "<!--rapport:form-->";

/// A page template must parse, render, and place the form exactly once.
fn check_template(source: &str) -> Result<(), String> {
    if source.len() > MAX_TEMPLATE_BYTES {
        return Err(format!("is larger than {MAX_TEMPLATE_BYTES} bytes"));
    }
    let rendered = render_template(source, "Title", "Headline", "<p>Body</p>", FORM_MARKER)?;
    match rendered.matches(FORM_MARKER).count() {
        1 => Ok(()),
        0 => Err("must output {{ form }}".into()),
        _ => Err("must output {{ form }} only once".into()),
    }
}

fn render_template(
    source: &str,
    title: &str,
    headline: &str,
    body: &str,
    form: &str,
) -> Result<String, String> {
    let template = liquid_parser()
        .parse(source)
        .map_err(|error| format!("is not a valid Liquid template: {error}"))?;
    let globals = liquid::object!({
        "title": text(title).to_string(),
        "headline": text(headline).to_string(),
        "body": body,
        "form": form,
    });
    template
        .render(&globals)
        .map_err(|error| format!("does not render: {error}"))
}

fn url_is_http(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    (lower.starts_with("http://") || lower.starts_with("https://"))
        && text.len() > "https://".len()
        && !text.contains(char::is_whitespace)
}

/// The form field carrying the consent checkbox.
pub const CONSENT_FIELD: &str = "email_consent";

/// Field names the form handler gives a meaning of its own.
const RESERVED_FIELDS: [&str; 2] = [CONSENT_FIELD, "anonymous_id"];

pub struct StoredPage {
    pub workspace: WorkspaceId,
    pub page: LandingPage,
}

fn with_url(mut page: LandingPage, page_id: Uuid, form_id: Uuid, public_url: &str) -> LandingPage {
    page.page_id = page_id.to_string();
    page.url = format!("{}/p/{page_id}", public_url.trim_end_matches('/'));
    if let Some(form) = page.form.as_mut() {
        form.form_id = form_id.to_string();
    }
    page
}

pub async fn create(
    pool: &PgPool,
    workspace: WorkspaceId,
    page: LandingPage,
    public_url: &str,
) -> Result<LandingPage, ApiError> {
    let page_id = rapport_core::ids::new_id();
    let form_id = rapport_core::ids::new_id();
    let page = with_url(page, page_id, form_id, public_url);
    let result = sqlx::query(
        "INSERT INTO landing_pages (page_id, form_id, workspace_id, name, definition) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(page_id)
    .bind(form_id)
    .bind(workspace.0)
    .bind(page.name.trim())
    .bind(page.encode_to_vec())
    .execute(pool)
    .await;
    match result {
        Ok(_) => Ok(page),
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23505") => {
            Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("a landing page named `{}` already exists", page.name.trim()),
            ))
        }
        Err(error) => Err(map_db_error(error)),
    }
}

async fn load(pool: &PgPool, column: &str, id: Uuid) -> Result<Option<StoredPage>, ApiError> {
    let query = match column {
        "form_id" => "SELECT workspace_id, definition FROM landing_pages WHERE form_id = $1",
        _ => "SELECT workspace_id, definition FROM landing_pages WHERE page_id = $1",
    };
    let row: Option<(Uuid, Vec<u8>)> = sqlx::query_as(query)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(map_db_error)?;
    row.map(|(workspace, bytes)| {
        LandingPage::decode(bytes.as_slice())
            .map(|page| StoredPage {
                workspace: WorkspaceId(workspace),
                page,
            })
            .map_err(|error| ApiError::internal(&error))
    })
    .transpose()
}

pub async fn by_page(pool: &PgPool, page_id: Uuid) -> Result<Option<StoredPage>, ApiError> {
    load(pool, "page_id", page_id).await
}

pub async fn by_form(pool: &PgPool, form_id: Uuid) -> Result<Option<StoredPage>, ApiError> {
    load(pool, "form_id", form_id).await
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem}}\
         label{{display:block;margin:.75rem 0 .25rem}}input{{width:100%;padding:.5rem}}\
         button{{margin-top:1rem;padding:.6rem 1.2rem}}.hp{{position:absolute;left:-10000px}}</style></head>\
         <body>{body}</body></html>\n",
        text(title)
    )
}

/// The page with its form, from the page's template or the built-in layout;
/// UTM parameters of the request ride along as hidden fields.
pub fn render_page(page: &LandingPage, public_url: &str, utm: &[(String, String)]) -> String {
    let headline = if page.headline.is_empty() {
        &page.title
    } else {
        &page.headline
    };
    let mut paragraphs = String::new();
    for paragraph in page.body.split("\n\n").filter(|p| !p.trim().is_empty()) {
        paragraphs.push_str(&format!("<p>{}</p>", text(paragraph.trim())));
    }
    let form = render_form(
        page.form.as_ref().unwrap_or(&Form::default()),
        public_url,
        utm,
    );
    if !page.template.is_empty() {
        match render_template(&page.template, &page.title, headline, &paragraphs, &form) {
            Ok(html) => return html,
            // Checked when the page was created; should rendering still
            // fail, the built-in layout keeps the form reachable.
            Err(problem) => tracing::warn!(page = %page.page_id, %problem, "page template"),
        }
    }
    document(
        &page.title,
        &format!("<h1>{}</h1>{paragraphs}{form}", text(headline)),
    )
}

fn render_form(form: &Form, public_url: &str, utm: &[(String, String)]) -> String {
    let mut body = String::new();
    body.push_str(&format!(
        "<form method=\"post\" action=\"{}/f/{}\">",
        attr(public_url.trim_end_matches('/')),
        attr(&form.form_id)
    ));
    for field in &form.fields {
        let kind = match (field.r#type(), field.name.as_str()) {
            (FieldType::Email, _) | (_, "email") => "email",
            (FieldType::Phone, _) | (_, "phone") => "tel",
            (FieldType::Number, _) => "number",
            _ => "text",
        };
        let label = if field.label.is_empty() {
            &field.name
        } else {
            &field.label
        };
        body.push_str(&format!(
            "<label for=\"{name}\">{label}</label><input id=\"{name}\" name=\"{name}\" type=\"{kind}\" maxlength=\"{max}\"{required}>",
            name = attr(&field.name),
            label = text(label),
            max = max_chars(field),
            required = if field.required { " required" } else { "" },
        ));
    }
    if !form.consent_label.trim().is_empty() {
        body.push_str(&format!(
            "<label><input type=\"checkbox\" name=\"{CONSENT_FIELD}\" value=\"yes\"{required} style=\"width:auto\"> {label}</label>",
            required = if form.consent_required { " required" } else { "" },
            label = text(form.consent_label.trim()),
        ));
    }
    for (name, value) in utm {
        body.push_str(&format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            attr(name),
            attr(value)
        ));
    }
    body.push_str(&format!(
        "<div class=\"hp\" aria-hidden=\"true\"><label>Leave empty<input name=\"{HONEYPOT_FIELD}\" tabindex=\"-1\" autocomplete=\"off\"></label></div>"
    ));
    let submit = if form.submit_label.is_empty() {
        "Submit"
    } else {
        &form.submit_label
    };
    body.push_str(&format!(
        "<button type=\"submit\">{}</button></form>",
        text(submit)
    ));
    body
}

pub fn render_message(title: &str, message: &str) -> String {
    document(
        title,
        &format!("<h1>{}</h1><p>{}</p>", text(title), text(message)),
    )
}
