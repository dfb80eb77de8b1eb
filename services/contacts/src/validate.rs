//! Checks on what clients send, producing field violations.

use rapport_core::FieldViolation;

/// Largest attributes object accepted, in bytes of JSON.
pub const MAX_ATTRIBUTES_BYTES: usize = 64 * 1024;
const MAX_TEXT: usize = 500;

/// Trims and lower-cases an email, or says why it is not one.
pub fn normalise_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err("is required");
    }
    if email.len() > 254 {
        return Err("is longer than 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("is not an email address (no @)");
    };
    let valid_domain = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    if local.is_empty()
        || local.len() > 64
        || local.contains(char::is_whitespace)
        || domain.contains('@')
        || !valid_domain
    {
        return Err("is not an email address");
    }
    Ok(email)
}

/// Validates a phone number with its country code (libphonenumber's
/// metadata) and returns it in E.164 form; empty stays empty.
pub fn normalise_phone(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(String::new());
    }
    if !raw.starts_with('+') {
        return Err("must start with + and the country code");
    }
    if raw.len() > 40 {
        return Err("is not a phone number");
    }
    let number = phonenumber::parse(None, raw).map_err(|_| "is not a phone number")?;
    if !phonenumber::is_valid(&number) {
        return Err("is not a valid phone number for its country");
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

pub fn check_text(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
    if value.chars().count() > MAX_TEXT {
        violations.push(FieldViolation {
            field: field.to_owned(),
            description: format!("is longer than {MAX_TEXT} characters"),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_or_refused() {
        assert_eq!(
            normalise_email("  Ada@Example.COM ").as_deref(),
            Ok("ada@example.com")
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@ex..com",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn phones_are_validated_per_country_and_stored_as_e164() {
        assert_eq!(
            normalise_phone("+44 20 7946 0958").as_deref(),
            Ok("+442079460958")
        );
        assert_eq!(normalise_phone("").as_deref(), Ok(""));
        assert_eq!(
            normalise_phone("+1 (415) 555-2671").as_deref(),
            Ok("+14155552671")
        );
        assert!(normalise_phone("020 7946 0958").is_err());
        assert!(normalise_phone("+12").is_err());
        // Right length, but no such number range in the UK.
        assert!(normalise_phone("+44 00 0000 0000").is_err());
    }
}
