//! Rendering: Liquid templates, then tracking (open pixel, tracked links).

use std::sync::OnceLock;

use rapport_core::ApiError;

fn parser() -> &'static liquid::Parser {
    static PARSER: OnceLock<liquid::Parser> = OnceLock::new();
    PARSER.get_or_init(|| {
        liquid::ParserBuilder::with_stdlib()
            .build()
            .unwrap_or_else(|error| panic!("the standard Liquid library builds: {error}"))
    })
}

/// Checks that `source` is a valid Liquid template (for CreateTemplate).
pub fn check(field: &str, source: &str) -> Result<(), ApiError> {
    parser().parse(source).map(|_| ()).map_err(|error| {
        ApiError::invalid_field(field, format!("is not a valid Liquid template: {error}"))
    })
}

/// Renders `source` with `variables` (a JSON object) as Liquid globals.
pub fn render(
    field: &str,
    source: &str,
    variables: &serde_json::Value,
) -> Result<String, ApiError> {
    let template = parser().parse(source).map_err(|error| {
        ApiError::new(
            rapport_core::ErrorCode::FailedPrecondition,
            format!("template {field} does not parse: {error}"),
        )
    })?;
    let globals = liquid::model::to_object(variables).map_err(|error| {
        ApiError::invalid_field(
            "variables",
            format!("cannot be used as template variables: {error}"),
        )
    })?;
    template.render(&globals).map_err(|error| {
        ApiError::new(
            rapport_core::ErrorCode::FailedPrecondition,
            format!("template {field} does not render: {error}"),
        )
    })
}

/// Rewrites every http(s) link of `html` through `track` (links under
/// `own_prefix`, such as the unsubscribe link, are left alone) and adds the
/// open pixel before `</body>`.
pub fn instrument(
    html: &str,
    own_prefix: &str,
    pixel_url: &str,
    track: impl Fn(&str) -> String,
) -> String {
    let mut out = String::with_capacity(html.len() + 256);
    let mut rest = html;
    while let Some(start) = find_href(rest) {
        let (before, after) = rest.split_at(start.value_start);
        out.push_str(before);
        let Some(end) = after.find(start.quote) else {
            rest = after;
            break;
        };
        let raw = &after[..end];
        let url = html_escape::decode_html_entities(raw);
        let lower = url.to_ascii_lowercase();
        if (lower.starts_with("http://") || lower.starts_with("https://"))
            && !url.starts_with(own_prefix)
        {
            out.push_str(&html_escape::encode_double_quoted_attribute(&track(&url)));
        } else {
            out.push_str(raw);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    let pixel = format!(
        r#"<img src="{}" width="1" height="1" alt="" style="display:block;border:0;width:1px;height:1px">"#,
        html_escape::encode_double_quoted_attribute(pixel_url)
    );
    match out.to_ascii_lowercase().rfind("</body>") {
        Some(index) => out.insert_str(index, &pixel),
        None => out.push_str(&pixel),
    }
    out
}

struct HrefStart {
    value_start: usize,
    quote: char,
}

fn find_href(text: &str) -> Option<HrefStart> {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find("href") {
        let mut index = from + found + 4;
        let bytes = lower.as_bytes();
        while index < bytes.len() && bytes[index].is_ascii_whitespace() {
            index += 1;
        }
        if index < bytes.len() && bytes[index] == b'=' {
            index += 1;
            while index < bytes.len() && bytes[index].is_ascii_whitespace() {
                index += 1;
            }
            if index < bytes.len() && (bytes[index] == b'"' || bytes[index] == b'\'') {
                return Some(HrefStart {
                    value_start: index + 1,
                    quote: bytes[index] as char,
                });
            }
        }
        from = from + found + 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liquid_personalises() {
        let variables = serde_json::json!({"contact": {"first_name": "Ada"}});
        assert_eq!(
            render("subject", "Welcome, {{ contact.first_name }}!", &variables).expect("renders"),
            "Welcome, Ada!"
        );
        assert!(check("subject", "{% if %}").is_err());
    }

    #[test]
    fn links_are_tracked_and_the_pixel_added() {
        let html = r#"<html><body><a href="https://example.com/guide?a=1&amp;b=2">Guide</a> <a href='mailto:x@example.com'>mail</a> <a href="https://t.example/u/abc">unsubscribe</a></body></html>"#;
        let out = instrument(
            html,
            "https://t.example/",
            "https://t.example/o/pixel",
            |url| format!("https://t.example/c/{}", url.len()),
        );
        assert!(out.contains(r#"href="https://t.example/c/33""#), "{out}");
        assert!(out.contains("mailto:x@example.com"));
        assert!(
            out.contains(r#"href="https://t.example/u/abc""#),
            "own links untouched: {out}"
        );
        assert!(out.contains(r#"<img src="https://t.example/o/pixel""#));
        assert!(out.ends_with("</body></html>"));
    }
}
