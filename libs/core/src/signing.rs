//! Signed tokens for public URLs (tracking pixels, tracked links, unsubscribe
//! links) and the credential services present to each other.
//!
//! A token is `base64url(json payload) . base64url(HMAC-SHA256(payload))[..16 bytes]`.
//! Only holders of the deployment's internal secret can mint one, so a
//! click-redirect never sends a visitor to a URL Rapport did not sign.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const MAC_BYTES: usize = 16;

#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
}

impl Signer {
    /// A signer for `purpose` ("links", ...) keyed by the internal secret;
    /// different purposes get unrelated keys.
    pub fn new(internal_secret: &str, purpose: &str) -> Self {
        let key =
            Sha256::digest(format!("rapport-signing-v1:{purpose}:{internal_secret}")).to_vec();
        Signer { key }
    }

    fn mac(&self, data: &[u8]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_mac());
        mac.update(data);
        mac.finalize().into_bytes()[..MAC_BYTES].to_vec()
    }

    pub fn sign<T: Serialize>(&self, payload: &T) -> String {
        let json = serde_json::to_vec(payload).unwrap_or_default();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(self.mac(&json))
        )
    }

    pub fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        let (body, mac) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenError::Malformed)?;
        let mut verifier =
            HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_mac());
        verifier.update(&json);
        verifier
            .verify_truncated_left(&mac)
            .map_err(|_| TokenError::BadSignature)?;
        if mac.len() != MAC_BYTES {
            return Err(TokenError::BadSignature);
        }
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
    }

    /// The credential one service presents to another
    /// (`x-rapport-internal` metadata).
    pub fn internal_credential(internal_secret: &str) -> String {
        hex_encode(&Sha256::digest(format!(
            "rapport-internal-v1:{internal_secret}"
        )))
    }
}

fn unreachable_mac() -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot happen.
    panic!("HMAC rejected a key")
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
    struct Link {
        url: String,
    }

    #[test]
    fn tokens_verify_only_with_the_same_key_and_untampered() {
        let signer = Signer::new("secret", "links");
        let token = signer.sign(&Link {
            url: "https://example.com".into(),
        });
        assert_eq!(
            signer.verify::<Link>(&token),
            Ok(Link {
                url: "https://example.com".into()
            })
        );
        assert_eq!(
            Signer::new("other", "links").verify::<Link>(&token),
            Err(TokenError::BadSignature)
        );
        let forged = Signer::new("secret", "links")
            .sign(&Link {
                url: "https://evil.example".into(),
            })
            .split_once('.')
            .map(|(body, _)| body.to_owned())
            .unwrap_or_default()
            + "."
            + token
                .split_once('.')
                .map(|(_, mac)| mac)
                .unwrap_or_default();
        assert_eq!(
            signer.verify::<Link>(&forged),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            signer.verify::<Link>("nonsense"),
            Err(TokenError::Malformed)
        );
    }
}

/// Signing purpose of tracking links; messaging signs, ingestion verifies.
pub const TRACKING_PURPOSE: &str = "tracking-links";

/// What a tracking URL stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum TrackingKind {
    /// The open pixel of a message.
    #[serde(rename = "o")]
    Open,
    /// A link in a message; `url` is where it goes.
    #[serde(rename = "c")]
    Click,
    /// The unsubscribe link of a message.
    #[serde(rename = "u")]
    Unsubscribe,
    /// The confirmation link of a double opt-in.
    #[serde(rename = "v")]
    ConfirmOptIn,
}

/// The payload of a tracking token (short keys keep URLs short).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TrackingToken {
    #[serde(rename = "k")]
    pub kind: TrackingKind,
    #[serde(rename = "w")]
    pub workspace_id: String,
    #[serde(rename = "m")]
    pub message_id: String,
    #[serde(rename = "c")]
    pub contact_id: String,
    #[serde(rename = "u", default, skip_serializing_if = "String::is_empty")]
    pub url: String,
}
