//! Marketing consent per channel, and the rules for changing it.
//!
//! - A double opt-in request makes consent pending, unless the person is
//!   already subscribed (nothing to confirm then).
//! - Following the confirmation link subscribes, whatever the state before:
//!   it is the strongest proof of intent there is.
//! - Any other change (a single opt-in form, an API call, an unsubscribe, a
//!   bounce) sets the status it names.
//!
//! A change to the same status is not a change: the reason and time of the
//! first one stay.

use chrono::{DateTime, Utc};
use rapport_core::time::to_timestamp;
use rapport_proto::common::v1::{Consent, ConsentStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Email,
    Sms,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
        }
    }
}

/// How a status is stored.
pub fn status_text(status: ConsentStatus) -> &'static str {
    match status {
        ConsentStatus::Unspecified => "unspecified",
        ConsentStatus::Pending => "pending",
        ConsentStatus::Subscribed => "subscribed",
        ConsentStatus::Unsubscribed => "unsubscribed",
    }
}

pub fn status_from_text(text: &str) -> ConsentStatus {
    match text {
        "pending" => ConsentStatus::Pending,
        "subscribed" => ConsentStatus::Subscribed,
        "unsubscribed" => ConsentStatus::Unsubscribed,
        _ => ConsentStatus::Unspecified,
    }
}

/// A requested change of one channel's consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentChange {
    pub status: ConsentStatus,
    pub reason: String,
}

impl ConsentChange {
    pub fn new(status: ConsentStatus, reason: &str) -> Self {
        ConsentChange {
            status,
            reason: reason.to_owned(),
        }
    }
}

/// The stored state of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentState {
    pub status: String,
    pub reason: String,
    pub changed_at: Option<DateTime<Utc>>,
}

impl ConsentState {
    pub fn status(&self) -> ConsentStatus {
        status_from_text(&self.status)
    }

    pub fn to_proto(&self) -> Consent {
        Consent {
            status: self.status().into(),
            reason: self.reason.clone(),
            update_time: self.changed_at.map(to_timestamp),
        }
    }
}

/// The status `change` leads to from `current`, or None when nothing changes.
pub fn next(current: ConsentStatus, change: &ConsentChange) -> Option<ConsentStatus> {
    let next = match change.status {
        ConsentStatus::Pending if current == ConsentStatus::Subscribed => return None,
        ConsentStatus::Unspecified => return None,
        status => status,
    };
    (next != current).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConsentStatus::*;

    #[test]
    fn double_opt_in_never_downgrades_a_subscriber() {
        let pending = ConsentChange::new(Pending, "form");
        assert_eq!(next(Unspecified, &pending), Some(Pending));
        assert_eq!(next(Unsubscribed, &pending), Some(Pending));
        assert_eq!(next(Subscribed, &pending), None);
        assert_eq!(next(Pending, &pending), None);
    }

    #[test]
    fn explicit_changes_apply_and_repeats_do_not() {
        let confirmed = ConsentChange::new(Subscribed, "double_opt_in_confirmed");
        assert_eq!(next(Pending, &confirmed), Some(Subscribed));
        assert_eq!(next(Subscribed, &confirmed), None);
        let out = ConsentChange::new(Unsubscribed, "unsubscribed");
        assert_eq!(next(Subscribed, &out), Some(Unsubscribed));
        assert_eq!(next(Pending, &out), Some(Unsubscribed));
        assert_eq!(
            next(Subscribed, &ConsentChange::new(Unspecified, "api")),
            None
        );
    }
}
