//! The contact profile through the gRPC API, on Postgres and Kafka: phone
//! numbers checked against their country's numbering plan, configurable
//! lifecycle stages with a history of every change, and consent set by the
//! API and published with the change, and interaction notes.

mod support;

use rapport_proto::common::v1::{Consent, ConsentStatus};
use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::contacts::v1::{
    AddNoteRequest, Contact, GetContactRequest, ListLifecycleStagesRequest, ListNotesRequest,
    ListStageChangesRequest, Note, NoteType, SetLifecycleStagesRequest, UpsertContactRequest,
};
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::service_names;
use support::{KafkaWatcher, Layout, Platform, eventually, fields_of, with_key};
use tonic::Code;

fn upsert(contact: Contact, stage_cause: &str) -> UpsertContactRequest {
    UpsertContactRequest {
        contact: Some(contact),
        stage_cause: stage_cause.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_are_configurable_and_every_change_is_kept_with_its_cause() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let globex = platform.create_workspace("Globex").await;
    let key = acme.api_key.as_str();
    let mut contacts = ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect");

    let defaults = contacts
        .list_lifecycle_stages(with_key(ListLifecycleStagesRequest {}, key))
        .await
        .expect("stages")
        .into_inner()
        .stages;
    assert_eq!(
        defaults,
        ["lead", "customer", "repeat_buyer", "at_risk", "churned"]
    );

    let created = contacts
        .upsert_contact(with_key(
            upsert(
                Contact {
                    email: "ada@example.com".into(),
                    lifecycle_stage: "customer".into(),
                    ..Default::default()
                },
                "closed-won deal 4411",
            ),
            key,
        ))
        .await
        .expect("created")
        .into_inner()
        .contact
        .expect("contact");
    assert_eq!(created.lifecycle_stage, "customer");

    // A stage the workspace does not have is refused and changes nothing.
    let refused = contacts
        .upsert_contact(with_key(
            upsert(
                Contact {
                    email: "ada@example.com".into(),
                    lifecycle_stage: "vip".into(),
                    first_name: "Ada".into(),
                    ..Default::default()
                },
                "",
            ),
            key,
        ))
        .await
        .expect_err("unknown stage");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(fields_of(&refused), ["contact.lifecycle_stage"]);
    let unchanged = contacts
        .get_contact(with_key(
            GetContactRequest {
                contact_id: created.contact_id.clone(),
            },
            key,
        ))
        .await
        .expect("get")
        .into_inner()
        .contact
        .expect("contact");
    assert_eq!(unchanged.first_name, "");
    assert_eq!(unchanged.lifecycle_stage, "customer");

    // The workspace's own stages; one in use cannot be dropped.
    let bad = contacts
        .set_lifecycle_stages(with_key(
            SetLifecycleStagesRequest {
                stages: vec!["lead".into(), "Trial Users".into(), "lead".into()],
            },
            key,
        ))
        .await
        .expect_err("bad stage keys");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(fields_of(&bad), ["stages[1]", "stages[2]"]);
    let dropped = contacts
        .set_lifecycle_stages(with_key(
            SetLifecycleStagesRequest {
                stages: vec!["lead".into(), "trial".into()],
            },
            key,
        ))
        .await
        .expect_err("customer is in use");
    assert_eq!(dropped.code(), Code::FailedPrecondition);
    assert!(
        dropped.message().contains("customer"),
        "{}",
        dropped.message()
    );
    contacts
        .set_lifecycle_stages(with_key(
            SetLifecycleStagesRequest {
                stages: vec!["lead".into(), "trial".into(), "customer".into()],
            },
            key,
        ))
        .await
        .expect("stages set");

    let watcher = KafkaWatcher::start(&platform, rapport_bus::topics::CONTACT_CHANGES).await;
    let moved = contacts
        .upsert_contact(with_key(
            upsert(
                Contact {
                    email: "ada@example.com".into(),
                    lifecycle_stage: "trial".into(),
                    ..Default::default()
                },
                "",
            ),
            key,
        ))
        .await
        .expect("moved")
        .into_inner()
        .contact
        .expect("contact");
    assert_eq!(moved.lifecycle_stage, "trial");
    let history = contacts
        .list_stage_changes(with_key(
            ListStageChangesRequest {
                contact_id: created.contact_id.clone(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("history")
        .into_inner()
        .changes;
    let summary: Vec<(String, String, String)> = history
        .iter()
        .map(|c| (c.stage.clone(), c.previous_stage.clone(), c.cause.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("trial".into(), "customer".into(), "api".into()),
            (
                "customer".into(),
                String::new(),
                "closed-won deal 4411".into()
            ),
        ]
    );
    assert!(history.iter().all(|c| c.change_time.is_some()));
    let stage_event = eventually("the stage-changed event", &platform, || {
        let events = watcher.envelopes_for(&created.contact_id);
        async move {
            events.into_iter().find_map(|e| match e.payload {
                Some(Payload::ContactChanged(change)) if change.previous_stage == "customer" => {
                    Some(change)
                }
                _ => None,
            })
        }
    })
    .await;
    assert_eq!(
        stage_event.contact.expect("snapshot").lifecycle_stage,
        "trial"
    );

    // Another workspace cannot read the history.
    let hidden = contacts
        .list_stage_changes(with_key(
            ListStageChangesRequest {
                contact_id: created.contact_id.clone(),
                ..Default::default()
            },
            &globex.api_key,
        ))
        .await
        .expect_err("not Globex's contact");
    assert_eq!(hidden.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_follow_their_numbering_plan_and_consent_is_set_with_a_reason() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect");

    for (phone, valid) in [
        ("+44 00 0000 0000", false),
        ("020 7946 0958", false),
        ("+1 (415) 555-2671", true),
    ] {
        let result = contacts
            .upsert_contact(with_key(
                upsert(
                    Contact {
                        email: "grace@example.com".into(),
                        phone: phone.into(),
                        ..Default::default()
                    },
                    "",
                ),
                key,
            ))
            .await;
        match (result, valid) {
            (Ok(response), true) => {
                let contact = response.into_inner().contact.expect("contact");
                assert_eq!(contact.phone, "+14155552671");
            }
            (Err(status), false) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{phone}");
                assert_eq!(fields_of(&status), ["contact.phone"], "{phone}");
            }
            (other, _) => panic!("{phone}: {other:?}"),
        }
    }

    let watcher = KafkaWatcher::start(&platform, rapport_bus::topics::CONTACT_CHANGES).await;
    let contact = contacts
        .upsert_contact(with_key(
            upsert(
                Contact {
                    email: "grace@example.com".into(),
                    email_consent: Some(Consent {
                        status: ConsentStatus::Unsubscribed.into(),
                        reason: "manual".into(),
                        update_time: None,
                    }),
                    sms_consent: Some(Consent {
                        status: ConsentStatus::Subscribed.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "",
            ),
            key,
        ))
        .await
        .expect("consent set")
        .into_inner()
        .contact
        .expect("contact");
    let email = contact.email_consent.expect("email consent");
    assert_eq!(
        (email.status(), email.reason.as_str()),
        (ConsentStatus::Unsubscribed, "manual")
    );
    let sms = contact.sms_consent.expect("sms consent");
    assert_eq!(
        (sms.status(), sms.reason.as_str()),
        (ConsentStatus::Subscribed, "api")
    );
    let change = eventually("the consent change event", &platform, || {
        let events = watcher.envelopes_for(&contact.contact_id);
        async move {
            events.into_iter().find_map(|e| match e.payload {
                Some(Payload::ContactChanged(change))
                    if change.change_type() == ChangeType::Updated =>
                {
                    Some(change)
                }
                _ => None,
            })
        }
    })
    .await;
    let mut changed = change.changed_fields.clone();
    changed.sort();
    assert_eq!(changed, ["email_consent", "sms_consent"]);
    assert_eq!(
        change
            .contact
            .and_then(|c| c.email_consent)
            .map(|c| c.status()),
        Some(ConsentStatus::Unsubscribed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_are_kept_per_contact_newest_first_and_retries_add_nothing() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let globex = platform.create_workspace("Globex").await;
    let key = acme.api_key.as_str();
    let mut contacts = ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect");
    let contact = contacts
        .upsert_contact(with_key(
            upsert(
                Contact {
                    email: "lin@example.com".into(),
                    ..Default::default()
                },
                "",
            ),
            key,
        ))
        .await
        .expect("contact")
        .into_inner()
        .contact
        .expect("contact");
    let note = |kind: NoteType, body: &str| Note {
        contact_id: contact.contact_id.clone(),
        r#type: kind.into(),
        body: body.into(),
        author: "rep-17".into(),
        ..Default::default()
    };
    let add = |request_id: &str, note: Note| AddNoteRequest {
        request_id: request_id.into(),
        note: Some(note),
    };

    let invalid = contacts
        .add_note(with_key(
            add(
                "",
                Note {
                    author: String::new(),
                    ..note(NoteType::Unspecified, " ")
                },
            ),
            key,
        ))
        .await
        .expect_err("invalid note");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(
        fields_of(&invalid),
        ["note.type", "note.body", "note.author"]
    );

    let call = contacts
        .add_note(with_key(
            add(
                "call-1",
                note(NoteType::SalesCall, "Wants SSO before buying."),
            ),
            key,
        ))
        .await
        .expect("note")
        .into_inner()
        .note
        .expect("note");
    let retried = contacts
        .add_note(with_key(
            add(
                "call-1",
                note(NoteType::SalesCall, "Wants SSO before buying."),
            ),
            key,
        ))
        .await
        .expect("retry")
        .into_inner()
        .note
        .expect("note");
    assert_eq!(retried.note_id, call.note_id);
    contacts
        .add_note(with_key(
            add("", note(NoteType::Objection, "Price is above budget.")),
            key,
        ))
        .await
        .expect("objection");

    let notes = contacts
        .list_notes(with_key(
            ListNotesRequest {
                contact_id: contact.contact_id.clone(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("notes")
        .into_inner()
        .notes;
    let listed: Vec<(NoteType, &str, &str)> = notes
        .iter()
        .map(|n| (n.r#type(), n.body.as_str(), n.author.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (NoteType::Objection, "Price is above budget.", "rep-17"),
            (NoteType::SalesCall, "Wants SSO before buying.", "rep-17"),
        ]
    );
    assert!(notes.iter().all(|n| n.occur_time.is_some()));

    // Another workspace can neither read nor add to this contact's notes.
    let hidden = contacts
        .list_notes(with_key(
            ListNotesRequest {
                contact_id: contact.contact_id.clone(),
                ..Default::default()
            },
            &globex.api_key,
        ))
        .await
        .expect_err("not Globex's contact");
    assert_eq!(hidden.code(), Code::NotFound);
    let foreign = contacts
        .add_note(with_key(
            add("", note(NoteType::Other, "Hello")),
            &globex.api_key,
        ))
        .await
        .expect_err("not Globex's contact");
    assert_eq!(foreign.code(), Code::NotFound);
}
