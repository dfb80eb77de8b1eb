//! Email delivery over SMTP with lettre.

use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rapport_config::SmtpConfig;
use rapport_core::ApiError;

/// `List-Unsubscribe: <https://...>` (RFC 2369).
#[derive(Clone)]
struct ListUnsubscribe(String);

impl Header for ListUnsubscribe {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("List-Unsubscribe")
    }

    fn parse(text: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribe(text.trim_matches(['<', '>']).to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), format!("<{}>", self.0))
    }
}

/// `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058).
#[derive(Clone)]
struct ListUnsubscribePost;

impl Header for ListUnsubscribePost {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("List-Unsubscribe-Post")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribePost)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "List-Unsubscribe=One-Click".to_owned())
    }
}

pub struct Email {
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub html: String,
    pub text: String,
    pub unsubscribe_url: String,
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    domain: String,
}

impl Mailer {
    pub fn new(config: &SmtpConfig) -> Result<Self, String> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|error| format!("smtp.from `{}` is not a mailbox: {error}", config.from))?;
        let domain = from.email.domain().to_owned();
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .timeout(Some(std::time::Duration::from_secs(20)))
            .build();
        Ok(Mailer {
            transport,
            from,
            domain,
        })
    }

    /// Hands the email to the SMTP server; UNAVAILABLE when it refuses or
    /// cannot be reached (the caller may retry).
    pub async fn send(&self, email: Email) -> Result<(), ApiError> {
        let to: Mailbox = email
            .to
            .parse()
            .map_err(|_| ApiError::invalid_field("to_email", "is not an email address"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject)
            .message_id(Some(format!("<{}@{}>", email.message_id, self.domain)))
            .header(ListUnsubscribe(email.unsubscribe_url))
            .header(ListUnsubscribePost)
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(email.text),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(email.html),
                    ),
            )
            .map_err(|error| ApiError::invalid_field("message", error.to_string()))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|error| {
                tracing::warn!(%error, "SMTP delivery failed");
                ApiError::unavailable("mail server refused the message or is unreachable; retry")
            })
    }
}
