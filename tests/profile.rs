//! The whole contact profile through the gRPC API, on Postgres and Kafka:
//! identities and merges, typed custom fields, batch calls, companies,
//! orders, score and the timeline, GDPR erasure and export, CSV import and
//! bulk export, and sync from a sales CRM over Kafka.

mod support;

use std::time::Duration;

use rapport_bus::topics;
use rapport_core::json::json_to_struct;
use rapport_proto::common::v1::{Consent, ConsentStatus, Money, PageRequest};
use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::contacts::v1::*;
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::{
    ContactChanged, Envelope, InboundContact, InboundDeal, InboundSync, inbound_sync,
};
use rapport_proto::service_names;
use support::{KafkaWatcher, Layout, Platform, eventually, fields_of, http_with, with_key};
use tonic::Code;
use tonic::transport::Channel;

type Client = ContactsServiceClient<Channel>;

fn json(value: serde_json::Value) -> Option<prost_types::Struct> {
    Some(json_to_struct(&value))
}

async fn client(platform: &Platform) -> Client {
    ContactsServiceClient::connect(platform.address_of(service_names::CONTACTS))
        .await
        .expect("connect contacts")
}

async fn upsert(contacts: &mut Client, key: &str, contact: Contact) -> (Contact, bool) {
    let response = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                contact: Some(contact),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("upsert")
        .into_inner();
    (response.contact.expect("contact"), response.created)
}

async fn get(contacts: &mut Client, key: &str, id: &str) -> Result<Contact, tonic::Status> {
    contacts
        .get_contact(with_key(
            GetContactRequest {
                contact_id: id.into(),
            },
            key,
        ))
        .await
        .map(|r| r.into_inner().contact.expect("contact"))
}

fn changes(watcher: &KafkaWatcher, id: &str) -> Vec<ContactChanged> {
    watcher
        .envelopes_for(id)
        .into_iter()
        .filter_map(|envelope: Envelope| match envelope.payload {
            Some(Payload::ContactChanged(change)) => Some(change),
            _ => None,
        })
        .collect()
}

async fn timeline(contacts: &mut Client, key: &str, id: &str) -> Vec<TimelineEntry> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = contacts
            .get_timeline(with_key(
                GetTimelineRequest {
                    contact_id: id.into(),
                    page: Some(PageRequest {
                        page_size: 3,
                        page_token: token.clone(),
                    }),
                },
                key,
            ))
            .await
            .expect("timeline")
            .into_inner();
        entries.extend(page.entries);
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() {
            return entries;
        }
    }
}

fn kinds(entries: &[TimelineEntry]) -> Vec<TimelineKind> {
    entries.iter().map(|e| e.kind()).collect()
}

fn basic(write_key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_resolve_the_contact_and_merges_keep_everything() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;
    let watcher = KafkaWatcher::start(&platform, topics::CONTACT_CHANGES).await;

    // A known person, and a visitor known only by a tracking id who came
    // from an ad a week ago.
    let (ada, created) = upsert(
        &mut contacts,
        key,
        Contact {
            email: " Ada@Example.com ".into(),
            external_ids: vec!["Salesforce:0035e00001".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(created);
    assert_eq!(ada.email, "ada@example.com");
    assert_eq!(ada.lifecycle_stage, "lead");
    assert_eq!(ada.external_ids, ["salesforce:0035e00001"]);
    let a_week_ago = chrono::Utc::now() - chrono::Duration::days(7);
    let (visitor, _) = upsert(
        &mut contacts,
        key,
        Contact {
            anonymous_ids: vec!["anon-77".into()],
            last_touch: Some(Touch {
                source: "google".into(),
                medium: "cpc".into(),
                campaign: "spring".into(),
                touch_time: Some(rapport_core::time::to_timestamp(a_week_ago)),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        visitor.lifecycle_stage, "",
        "a visitor known only by a tracking id is no lead yet"
    );
    assert_eq!(
        visitor.first_touch.as_ref().expect("touch").source,
        "google"
    );

    // Any identity finds the contact.
    let (by_external, created) = upsert(
        &mut contacts,
        key,
        Contact {
            external_ids: vec!["salesforce:0035e00001".into()],
            job_title: "CTO".into(),
            time_zone: "Europe/London".into(),
            country: "gb".into(),
            locale: "en_GB".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!created);
    assert_eq!(by_external.contact_id, ada.contact_id);
    assert_eq!(
        (
            by_external.job_title.as_str(),
            by_external.country.as_str(),
            by_external.locale.as_str()
        ),
        ("CTO", "GB", "en-GB")
    );

    // The visitor identifies on the website: the anonymous contact is
    // merged into Ada, keeping its first touch.
    let identify = http_with(
        "POST",
        &format!("{}/v1/identify", platform.public_url()),
        &[
            ("Authorization", &basic(&acme.write_key)),
            ("Content-Type", "application/json"),
        ],
        &serde_json::to_vec(&serde_json::json!({
            "anonymousId": "anon-77",
            "traits": {"email": "ada@example.com", "firstName": "Ada"},
        }))
        .expect("json"),
    )
    .await;
    assert_eq!(identify.status, 200, "{}", identify.text());
    let merged = eventually("the visitor to be merged into Ada", &platform, || {
        let mut contacts = contacts.clone();
        let visitor_id = visitor.contact_id.clone();
        let ada_id = ada.contact_id.clone();
        async move {
            let found = get(&mut contacts, key, &visitor_id).await.ok()?;
            (found.contact_id == ada_id).then_some(found)
        }
    })
    .await;
    assert_eq!(merged.first_name, "Ada");
    assert_eq!(merged.anonymous_ids, ["anon-77"]);
    let first = merged.first_touch.as_ref().expect("first touch");
    assert_eq!(
        (first.source.as_str(), first.campaign.as_str()),
        ("google", "spring")
    );
    let merge_event = eventually("the merge event", &platform, || {
        let found = changes(&watcher, &ada.contact_id)
            .into_iter()
            .find(|c| c.change_type() == ChangeType::Merged);
        async move { found }
    })
    .await;
    assert_eq!(merge_event.merged_contact_ids, [visitor.contact_id.clone()]);

    // An explicit merge, by the documented rule.
    let (carol, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "carol@example.com".into(),
            tags: vec!["webinar".into()],
            company: "Globex".into(),
            ..Default::default()
        },
    )
    .await;
    let (carol_work, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "carol@globex.example".into(),
            first_name: "Carol".into(),
            company: "Initech".into(),
            tags: vec!["trial".into()],
            email_consent: Some(Consent {
                status: ConsentStatus::Unsubscribed.into(),
                reason: "manual".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    for (id, points) in [(&carol.contact_id, 5), (&carol_work.contact_id, 7)] {
        contacts
            .adjust_score(with_key(
                AdjustScoreRequest {
                    contact_id: id.clone(),
                    delta: points,
                    reason: "webinar attended".into(),
                    ..Default::default()
                },
                key,
            ))
            .await
            .expect("score");
    }
    let survivor = contacts
        .merge_contacts(with_key(
            MergeContactsRequest {
                survivor_id: carol.contact_id.clone(),
                merged_ids: vec![carol_work.contact_id.clone()],
            },
            key,
        ))
        .await
        .expect("merge")
        .into_inner()
        .contact
        .expect("contact");
    assert_eq!(
        survivor.email, "carol@example.com",
        "the survivor's value stays"
    );
    assert_eq!(survivor.company, "Globex");
    assert_eq!(
        survivor.first_name, "Carol",
        "an empty field takes the other's"
    );
    assert_eq!(survivor.tags, ["trial", "webinar"]);
    assert_eq!(survivor.score, 12);
    assert_eq!(
        survivor.email_consent.as_ref().expect("consent").status(),
        ConsentStatus::Unsubscribed,
        "who opted out stays out"
    );
    let emails: Vec<&str> = survivor
        .identities
        .iter()
        .filter(|i| i.kind() == IdentityKind::Email)
        .map(|i| i.value.as_str())
        .collect();
    assert_eq!(emails, ["carol@example.com", "carol@globex.example"]);
    // The merged-away id and its email both lead to the survivor.
    assert_eq!(
        get(&mut contacts, key, &carol_work.contact_id)
            .await
            .expect("merged id")
            .contact_id,
        carol.contact_id
    );
    let (via_old_email, created) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "carol@globex.example".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!created);
    assert_eq!(via_old_email.contact_id, carol.contact_id);
    // Merging again changes nothing.
    let again = contacts
        .merge_contacts(with_key(
            MergeContactsRequest {
                survivor_id: carol.contact_id.clone(),
                merged_ids: vec![carol_work.contact_id.clone()],
            },
            key,
        ))
        .await
        .expect("merge again")
        .into_inner()
        .contact
        .expect("contact");
    assert_eq!(again.score, 12);
    let scores = contacts
        .list_score_changes(with_key(
            ListScoreChangesRequest {
                contact_id: carol.contact_id.clone(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("scores")
        .into_inner()
        .changes;
    assert_eq!(scores.len(), 2, "both contacts' score history is kept");
    let history = contacts
        .export_contact(with_key(
            ExportContactRequest {
                contact_id: carol.contact_id.clone(),
            },
            key,
        ))
        .await
        .expect("export")
        .into_inner();
    assert!(
        history
            .consent_changes
            .iter()
            .any(|c| c.status() == ConsentStatus::Unsubscribed && c.reason == "merge (manual)"),
        "the merge's consent change is logged: {:?}",
        history.consent_changes
    );
    assert_eq!(history.merged_contact_ids, [carol_work.contact_id.clone()]);

    // Identities of two known people in one upsert: refused, nothing written.
    let conflict = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                contact: Some(Contact {
                    email: "carol@example.com".into(),
                    external_ids: vec!["salesforce:0035e00001".into()],
                    first_name: "Mallory".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("two people");
    assert_eq!(conflict.code(), Code::FailedPrecondition, "{conflict:?}");
    assert_eq!(
        get(&mut contacts, key, &carol.contact_id)
            .await
            .expect("carol")
            .first_name,
        "Carol"
    );

    // The survivor's timeline holds the merge, the events and both pasts.
    let entries = timeline(&mut contacts, key, &ada.contact_id).await;
    let kinds = kinds(&entries);
    for kind in [
        TimelineKind::Created,
        TimelineKind::Merged,
        TimelineKind::Event,
        TimelineKind::FieldsChanged,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} missing from {entries:#?}");
    }
    let times: Vec<i64> = entries
        .iter()
        .map(|e| e.occur_time.as_ref().expect("time").seconds)
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );

    // Another workspace sees none of it.
    let globex = platform.create_workspace("Globex").await;
    let missing = get(&mut contacts, &globex.api_key, &ada.contact_id)
        .await
        .expect_err("other workspace");
    assert_eq!(missing.code(), Code::NotFound);
    let (theirs, created) = upsert(
        &mut contacts,
        &globex.api_key,
        Contact {
            email: "ada@example.com".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        created,
        "the same email in another workspace is another contact"
    );
    assert_ne!(theirs.contact_id, ada.contact_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_fields_are_typed_checked_and_filterable() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;

    let define =
        |key_name: &str, kind: CustomFieldType, options: &[&str]| DefineCustomFieldRequest {
            field: Some(CustomField {
                key: key_name.into(),
                label: key_name.replace('_', " "),
                r#type: kind.into(),
                options: options.iter().map(|o| (*o).to_owned()).collect(),
            }),
        };
    for request in [
        define("plan", CustomFieldType::Enum, &["free", "pro"]),
        define("seats", CustomFieldType::Number, &[]),
        define("renewal", CustomFieldType::Date, &[]),
        define("last_login", CustomFieldType::Datetime, &[]),
        define(
            "interests",
            CustomFieldType::MultiEnum,
            &["crm", "email", "sms"],
        ),
        define("vip", CustomFieldType::Boolean, &[]),
    ] {
        contacts
            .define_custom_field(with_key(request, key))
            .await
            .expect("define");
    }
    let bad = contacts
        .define_custom_field(with_key(define("Bad Key", CustomFieldType::Enum, &[]), key))
        .await
        .expect_err("bad definition");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(fields_of(&bad), ["field.key", "field.options"]);
    let retype = contacts
        .define_custom_field(with_key(define("seats", CustomFieldType::String, &[]), key))
        .await
        .expect_err("type change");
    assert_eq!(fields_of(&retype), ["field.type"]);
    let dropped = contacts
        .define_custom_field(with_key(
            define("plan", CustomFieldType::Enum, &["pro"]),
            key,
        ))
        .await
        .expect_err("option dropped");
    assert_eq!(fields_of(&dropped), ["field.options"]);
    contacts
        .define_custom_field(with_key(
            define(
                "plan",
                CustomFieldType::Enum,
                &["free", "pro", "enterprise"],
            ),
            key,
        ))
        .await
        .expect("option added");
    let listed = contacts
        .list_custom_fields(with_key(ListCustomFieldsRequest {}, key))
        .await
        .expect("fields")
        .into_inner()
        .fields;
    assert_eq!(listed.len(), 6);

    // Bad values, an unknown field and bad standard fields, all named;
    // nothing is written.
    let refused = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                contact: Some(Contact {
                    email: "ada@example.com".into(),
                    time_zone: "Mars/Olympus_Mons".into(),
                    country: "XX".into(),
                    custom_fields: json(serde_json::json!({
                        "plan": "gold",
                        "seats": "many",
                        "renewal": "next spring",
                        "favourite_colour": "green",
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("bad values");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut named = fields_of(&refused);
    named.sort();
    assert_eq!(
        named,
        ["contact.country", "contact.time_zone",],
        "standard fields are checked first: {refused:?}"
    );
    let refused = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                contact: Some(Contact {
                    email: "ada@example.com".into(),
                    custom_fields: json(serde_json::json!({
                        "plan": "gold",
                        "seats": "many",
                        "renewal": "next spring",
                        "favourite_colour": "green",
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("bad values");
    let mut named = fields_of(&refused);
    named.sort();
    assert_eq!(
        named,
        [
            "contact.custom_fields.favourite_colour",
            "contact.custom_fields.plan",
            "contact.custom_fields.renewal",
            "contact.custom_fields.seats",
        ]
    );
    let all = contacts
        .list_contacts(with_key(ListContactsRequest::default(), key))
        .await
        .expect("list")
        .into_inner()
        .contacts;
    assert!(all.is_empty(), "nothing half-written: {all:?}");

    // Good values are stored normalised.
    let (ada, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "ada@example.com".into(),
            owner_id: "rep-7".into(),
            tags: vec!["beta".into()],
            custom_fields: json(serde_json::json!({
                "plan": "pro",
                "seats": "25",
                "renewal": "2027-01-31",
                "last_login": "2026-12-04T10:00:00+01:00",
                "interests": ["sms", "crm"],
                "vip": "yes",
            })),
            ..Default::default()
        },
    )
    .await;
    let custom = rapport_core::json::struct_to_json(ada.custom_fields.as_ref().expect("fields"));
    assert_eq!(
        custom,
        serde_json::json!({
            "plan": "pro",
            "seats": 25.0,
            "renewal": "2027-01-31",
            "last_login": "2026-12-04T09:00:00Z",
            "interests": ["crm", "sms"],
            "vip": true,
        })
    );
    for (email, plan, interests) in [
        ("bob@example.com", "free", serde_json::json!(["email"])),
        ("cy@example.com", "pro", serde_json::json!(["email", "crm"])),
    ] {
        upsert(
            &mut contacts,
            key,
            Contact {
                email: email.into(),
                custom_fields: json(serde_json::json!({"plan": plan, "interests": interests})),
                ..Default::default()
            },
        )
        .await;
    }
    // A null clears a field.
    let (cleared, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "ada@example.com".into(),
            custom_fields: json(serde_json::json!({"vip": null})),
            ..Default::default()
        },
    )
    .await;
    let custom =
        rapport_core::json::struct_to_json(cleared.custom_fields.as_ref().expect("fields"));
    assert!(custom.get("vip").is_none());
    assert_eq!(custom["plan"], "pro");

    let list = |filter: ContactFilter| {
        let mut contacts = contacts.clone();
        async move {
            let mut emails: Vec<String> = contacts
                .list_contacts(with_key(
                    ListContactsRequest {
                        filter: Some(filter),
                        ..Default::default()
                    },
                    key,
                ))
                .await
                .expect("list")
                .into_inner()
                .contacts
                .into_iter()
                .map(|c| c.email)
                .collect();
            emails.sort();
            emails
        }
    };
    assert_eq!(
        list(ContactFilter {
            custom_fields: json(serde_json::json!({"plan": "pro"})),
            ..Default::default()
        })
        .await,
        ["ada@example.com", "cy@example.com"]
    );
    assert_eq!(
        list(ContactFilter {
            custom_fields: json(serde_json::json!({"interests": "email"})),
            ..Default::default()
        })
        .await,
        ["bob@example.com", "cy@example.com"]
    );
    assert_eq!(
        list(ContactFilter {
            custom_fields: json(serde_json::json!({"plan": "pro"})),
            tag: "beta".into(),
            owner_id: "rep-7".into(),
            ..Default::default()
        })
        .await,
        ["ada@example.com"]
    );
    let bad_filter = contacts
        .list_contacts(with_key(
            ListContactsRequest {
                filter: Some(ContactFilter {
                    custom_fields: json(serde_json::json!({"plan": "gold"})),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("bad filter");
    assert_eq!(fields_of(&bad_filter), ["filter.custom_fields.plan"]);

    // Another workspace has none of these fields, and none of these people.
    let globex = platform.create_workspace("Globex").await;
    let unknown = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                contact: Some(Contact {
                    email: "x@globex.example".into(),
                    custom_fields: json(serde_json::json!({"plan": "pro"})),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &globex.api_key,
        ))
        .await
        .expect_err("not their field");
    assert_eq!(fields_of(&unknown), ["contact.custom_fields.plan"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_all_or_nothing_and_retries_write_nothing() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;
    let watcher = KafkaWatcher::start(&platform, topics::CONTACT_CHANGES).await;
    let person = |email: &str| Contact {
        email: email.into(),
        first_name: "Pat".into(),
        ..Default::default()
    };

    let refused = contacts
        .batch_upsert_contacts(with_key(
            BatchUpsertContactsRequest {
                contacts: vec![
                    person("one@example.com"),
                    person("not an email"),
                    Contact {
                        email: "three@example.com".into(),
                        attributes: json(serde_json::json!({"blob": "x".repeat(70 * 1024)})),
                        ..Default::default()
                    },
                    Contact {
                        email: "four@example.com".into(),
                        first_name: "Fo\u{0}ur".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("bad batch");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        fields_of(&refused),
        [
            "contacts[1].email",
            "contacts[2].attributes",
            "contacts[3].first_name"
        ]
    );
    let too_many = contacts
        .batch_upsert_contacts(with_key(
            BatchUpsertContactsRequest {
                contacts: (0..1001)
                    .map(|i| person(&format!("p{i}@example.com")))
                    .collect(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("too many");
    assert_eq!(fields_of(&too_many), ["contacts"]);
    let listed = contacts
        .list_contacts(with_key(ListContactsRequest::default(), key))
        .await
        .expect("list")
        .into_inner()
        .contacts;
    assert!(listed.is_empty(), "nothing half-written");

    let batch = BatchUpsertContactsRequest {
        request_id: "import-2026-12-04".into(),
        contacts: vec![
            person("one@example.com"),
            person("two@example.com"),
            Contact {
                email: "ONE@example.com".into(),
                last_name: "Smith".into(),
                ..Default::default()
            },
        ],
        stage_cause: "spring import".into(),
    };
    let first = contacts
        .batch_upsert_contacts(with_key(batch.clone(), key))
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(
        first.iter().map(|r| r.created).collect::<Vec<_>>(),
        [true, true, false]
    );
    let one = first[0].contact.as_ref().expect("one");
    assert_eq!(
        first[2].contact.as_ref().expect("one again").contact_id,
        one.contact_id,
        "one email in a batch twice is one contact"
    );
    assert_eq!(first[2].contact.as_ref().expect("one").last_name, "Smith");
    let retried = contacts
        .batch_upsert_contacts(with_key(batch, key))
        .await
        .expect("retry")
        .into_inner()
        .results;
    assert_eq!(
        retried
            .iter()
            .map(|r| (r.contact.as_ref().expect("c").contact_id.clone(), r.created))
            .collect::<Vec<_>>(),
        first
            .iter()
            .map(|r| (r.contact.as_ref().expect("c").contact_id.clone(), r.created))
            .collect::<Vec<_>>()
    );
    let two = first[1].contact.as_ref().expect("two").contact_id.clone();
    eventually("the creation events", &platform, || {
        let done = watcher.count_for(&one.contact_id) >= 1 && watcher.count_for(&two) >= 1;
        async move { done.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        changes(&watcher, &one.contact_id)
            .iter()
            .map(|c| c.change_type())
            .collect::<Vec<_>>(),
        [ChangeType::Created],
        "one event per contact per write, none for the retry"
    );
    let stage_changes = contacts
        .list_stage_changes(with_key(
            ListStageChangesRequest {
                contact_id: two.clone(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("stages")
        .into_inner()
        .changes;
    assert_eq!(stage_changes[0].cause, "spring import");

    let unknown = uuid::Uuid::now_v7().to_string();
    let got = contacts
        .batch_get_contacts(with_key(
            BatchGetContactsRequest {
                contact_ids: vec![two.clone(), unknown.clone(), one.contact_id.clone()],
            },
            key,
        ))
        .await
        .expect("batch get")
        .into_inner();
    assert_eq!(
        got.contacts
            .iter()
            .map(|c| c.contact_id.clone())
            .collect::<Vec<_>>(),
        [two.clone(), one.contact_id.clone()]
    );
    assert_eq!(got.not_found_ids, [unknown]);
    let bad_id = contacts
        .batch_get_contacts(with_key(
            BatchGetContactsRequest {
                contact_ids: vec!["nope".into()],
            },
            key,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(fields_of(&bad_id), ["contact_ids[0]"]);
    // A single upsert's request id is its own, even when a batch used it.
    let single = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                request_id: "import-2026-12-04".into(),
                contact: Some(person("single@example.com")),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("single")
        .into_inner();
    assert!(single.created);
    assert_eq!(single.contact.expect("single").email, "single@example.com");

    // A new contact in a batch that absorbs a known visitor: created, then
    // merged, and the visitor's id leads to it.
    let (visitor, _) = upsert(
        &mut contacts,
        key,
        Contact {
            anonymous_ids: vec!["anon-batch".into()],
            ..Default::default()
        },
    )
    .await;
    let nina = contacts
        .batch_upsert_contacts(with_key(
            BatchUpsertContactsRequest {
                contacts: vec![
                    person("nina@example.com"),
                    Contact {
                        email: "nina@example.com".into(),
                        anonymous_ids: vec!["anon-batch".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("batch with a merge")
        .into_inner()
        .results;
    assert_eq!(
        nina.iter().map(|r| r.created).collect::<Vec<_>>(),
        [true, false]
    );
    let nina_id = nina[0].contact.as_ref().expect("nina").contact_id.clone();
    assert_eq!(
        get(&mut contacts, key, &visitor.contact_id)
            .await
            .expect("visitor")
            .contact_id,
        nina_id
    );
    let merged = eventually("nina's merge event", &platform, || {
        let found = changes(&watcher, &nina_id)
            .into_iter()
            .find(|c| c.change_type() == ChangeType::Merged);
        async move { found }
    })
    .await;
    assert_eq!(merged.merged_contact_ids, [visitor.contact_id.clone()]);
    assert_eq!(
        changes(&watcher, &nina_id)[0].change_type(),
        ChangeType::Created
    );

    let globex = platform.create_workspace("Globex").await;
    let theirs = contacts
        .batch_get_contacts(with_key(
            BatchGetContactsRequest {
                contact_ids: vec![two.clone()],
            },
            &globex.api_key,
        ))
        .await
        .expect("other workspace")
        .into_inner();
    assert!(theirs.contacts.is_empty());
    assert_eq!(theirs.not_found_ids, [two]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companies_orders_score_and_notes_fill_the_timeline() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;

    let company = contacts
        .upsert_company(with_key(
            UpsertCompanyRequest {
                company: Some(Company {
                    name: "Initech".into(),
                    domain: "Initech.example".into(),
                    industry: "software".into(),
                    employee_count: 120,
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("company")
        .into_inner();
    assert!(company.created);
    let company = company.company.expect("company");
    assert_eq!(company.domain, "initech.example");
    let again = contacts
        .upsert_company(with_key(
            UpsertCompanyRequest {
                company: Some(Company {
                    domain: "initech.example".into(),
                    employee_count: 150,
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("company again")
        .into_inner();
    assert!(!again.created, "found by domain");
    assert_eq!(again.company.as_ref().expect("c").name, "Initech");
    assert_eq!(again.company.as_ref().expect("c").employee_count, 150);
    let bad_company = contacts
        .upsert_company(with_key(
            UpsertCompanyRequest {
                company: Some(Company {
                    name: "Bad".into(),
                    domain: "not a domain".into(),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect_err("bad domain");
    assert_eq!(fields_of(&bad_company), ["company.domain"]);

    let (peter, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "peter@initech.example".into(),
            company_id: company.company_id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(peter.company_id, company.company_id);
    let linked = contacts
        .get_company(with_key(
            GetCompanyRequest {
                company_id: company.company_id.clone(),
            },
            key,
        ))
        .await
        .expect("get company")
        .into_inner();
    assert_eq!(linked.contact_count, 1);
    let unknown_company = contacts
        .upsert_contact(with_key(
            UpsertContactRequest {
                contact: Some(Contact {
                    email: "milton@initech.example".into(),
                    company_id: uuid::Uuid::now_v7().to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("unknown company");
    assert_eq!(fields_of(&unknown_company), ["contact.company_id"]);

    // Orders and their aggregates.
    let order = |id: &str, currency: &str, total: i64, days_ago: i64| RecordOrderRequest {
        order: Some(Order {
            order_id: id.into(),
            contact_id: peter.contact_id.clone(),
            line_items: vec![LineItem {
                product: "Stapler".into(),
                sku: "STP-1".into(),
                category: "office".into(),
                quantity: 2,
                unit_price_micros: total / 2,
            }],
            total: Some(Money {
                currency_code: currency.into(),
                amount_micros: total,
            }),
            order_time: Some(rapport_core::time::to_timestamp(
                chrono::Utc::now() - chrono::Duration::days(days_ago),
            )),
        }),
    };
    for request in [
        order("A-1", "EUR", 30_000_000, 30),
        order("A-2", "EUR", 50_000_000, 2),
        order("A-3", "usd", 12_500_000, 10),
    ] {
        contacts
            .record_order(with_key(request, key))
            .await
            .expect("order");
    }
    // The same order again, corrected: replaced, not added.
    let corrected = contacts
        .record_order(with_key(order("A-2", "EUR", 60_000_000, 2), key))
        .await
        .expect("order corrected")
        .into_inner()
        .aggregates
        .expect("aggregates");
    assert_eq!(corrected.order_count, 3);
    let eur = corrected
        .spend
        .iter()
        .find(|s| s.currency_code == "EUR")
        .expect("EUR");
    assert_eq!(eur.order_count, 2);
    assert_eq!(eur.total.as_ref().expect("total").amount_micros, 90_000_000);
    assert_eq!(
        eur.average_order_value.as_ref().expect("aov").amount_micros,
        45_000_000
    );
    let first = corrected.first_purchase_time.expect("first").seconds;
    let last = corrected.last_purchase_time.expect("last").seconds;
    assert!(last - first > 27 * 24 * 3600, "first and last purchase");
    let profile = get(&mut contacts, key, &peter.contact_id)
        .await
        .expect("peter");
    assert_eq!(profile.orders.expect("aggregates").order_count, 3);
    let listed = contacts
        .list_orders(with_key(
            ListOrdersRequest {
                contact_id: peter.contact_id.clone(),
                page: Some(PageRequest {
                    page_size: 2,
                    page_token: String::new(),
                }),
            },
            key,
        ))
        .await
        .expect("orders")
        .into_inner();
    assert_eq!(
        listed
            .orders
            .iter()
            .map(|o| o.order_id.as_str())
            .collect::<Vec<_>>(),
        ["A-2", "A-3"]
    );
    let rest = contacts
        .list_orders(with_key(
            ListOrdersRequest {
                contact_id: peter.contact_id.clone(),
                page: Some(PageRequest {
                    page_size: 2,
                    page_token: listed.page.expect("page").next_page_token,
                }),
            },
            key,
        ))
        .await
        .expect("orders page 2")
        .into_inner();
    assert_eq!(rest.orders[0].order_id, "A-1");
    let bad_order = contacts
        .record_order(with_key(
            RecordOrderRequest {
                order: Some(Order {
                    order_id: "B-1".into(),
                    contact_id: peter.contact_id.clone(),
                    line_items: vec![LineItem {
                        product: "Chair".into(),
                        quantity: 0,
                        ..Default::default()
                    }],
                    total: Some(Money {
                        currency_code: "euros".into(),
                        amount_micros: 1,
                    }),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect_err("bad order");
    assert_eq!(
        fields_of(&bad_order),
        ["order.total.currency_code", "order.line_items[0].quantity"]
    );

    // Score with reasons; a retried adjustment counts once.
    for (request_id, delta, reason) in [
        ("s-1", 10, "visited pricing"),
        ("s-1", 10, "visited pricing"),
        ("s-2", -3, "email bounced"),
    ] {
        contacts
            .adjust_score(with_key(
                AdjustScoreRequest {
                    request_id: request_id.into(),
                    contact_id: peter.contact_id.clone(),
                    delta,
                    reason: reason.into(),
                },
                key,
            ))
            .await
            .expect("score");
    }
    let scores = contacts
        .list_score_changes(with_key(
            ListScoreChangesRequest {
                contact_id: peter.contact_id.clone(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("scores")
        .into_inner()
        .changes;
    assert_eq!(
        scores
            .iter()
            .map(|s| (s.delta, s.score, s.reason.as_str()))
            .collect::<Vec<_>>(),
        [(-3, 7, "email bounced"), (10, 10, "visited pricing")]
    );
    let zero = contacts
        .adjust_score(with_key(
            AdjustScoreRequest {
                contact_id: peter.contact_id.clone(),
                delta: 0,
                ..Default::default()
            },
            key,
        ))
        .await
        .expect_err("zero");
    assert_eq!(fields_of(&zero), ["delta", "reason"]);

    contacts
        .add_note(with_key(
            AddNoteRequest {
                note: Some(Note {
                    contact_id: peter.contact_id.clone(),
                    r#type: NoteType::SalesCall.into(),
                    body: "Wants a demo for 40 seats.".into(),
                    author: "rep-7".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("note");
    let entries = timeline(&mut contacts, key, &peter.contact_id).await;
    let kinds = kinds(&entries);
    assert_eq!(
        kinds.iter().filter(|k| **k == TimelineKind::Order).count(),
        4,
        "each recorded order is on the timeline: {entries:#?}"
    );
    for kind in [
        TimelineKind::Created,
        TimelineKind::ScoreChanged,
        TimelineKind::Note,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} missing: {entries:#?}");
    }
    assert_eq!(
        entries.last().map(|e| e.kind()),
        Some(TimelineKind::Order),
        "the order of 30 days ago is the oldest entry"
    );

    // Another workspace cannot touch any of it.
    let globex = platform.create_workspace("Globex").await;
    let theirs = contacts
        .record_order(with_key(order("G-1", "EUR", 1, 0), &globex.api_key))
        .await
        .expect_err("other workspace's contact");
    assert_eq!(theirs.code(), Code::NotFound);
    let theirs = contacts
        .get_company(with_key(
            GetCompanyRequest {
                company_id: company.company_id.clone(),
            },
            &globex.api_key,
        ))
        .await
        .expect_err("other workspace's company");
    assert_eq!(theirs.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_removes_the_person_everywhere_and_export_shows_all_first() {
    use rapport_proto::automation::v1::automation_service_client::AutomationServiceClient;
    use rapport_proto::automation::v1::{
        CreateJourneyRequest, Journey, SendMessage, Step, Trigger, Wait, journey, step, trigger,
    };
    use rapport_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
    use rapport_proto::messaging::v1::{
        Channel as MessageChannel, CreateTemplateRequest, SendMessageRequest, Template,
    };
    use rapport_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
    use rapport_proto::segmentation::v1::{
        Condition, CreateSegmentRequest, FieldCondition, Segment, condition, field_condition,
    };

    let smtp = support::SmtpSink::start().await;
    let platform = Platform::start_on_kafka(
        Layout::OneProcess,
        vec![
            ("RAPPORT_SMTP__HOST".into(), "127.0.0.1".into()),
            ("RAPPORT_SMTP__PORT".into(), smtp.port.to_string()),
            (
                "RAPPORT_SMTP__FROM".into(),
                "Acme <hello@acme.example>".into(),
            ),
        ],
    )
    .await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;
    let watcher = KafkaWatcher::start(&platform, topics::CONTACT_CHANGES).await;

    // Grace is a lead; a segment holds her and a journey waits on her.
    let segment =
        SegmentationServiceClient::connect(platform.address_of(service_names::SEGMENTATION))
            .await
            .expect("segmentation")
            .create_segment(with_key(
                CreateSegmentRequest {
                    segment: Some(Segment {
                        name: "leads".into(),
                        condition: Some(Condition {
                            condition: Some(condition::Condition::Field(FieldCondition {
                                field: "lifecycle_stage".into(),
                                operator: field_condition::Operator::Equals.into(),
                                value: "lead".into(),
                                within_seconds: 0,
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
    AutomationServiceClient::connect(platform.address_of(service_names::AUTOMATION))
        .await
        .expect("automation")
        .create_journey(with_key(
            CreateJourneyRequest {
                journey: Some(Journey {
                    name: "nurture".into(),
                    state: journey::State::Published.into(),
                    trigger: Some(Trigger {
                        trigger: Some(trigger::Trigger::SegmentEntered(segment.segment_id.clone())),
                    }),
                    steps: vec![
                        Step {
                            step_id: "wait".into(),
                            action: Some(step::Action::Wait(Wait {
                                duration: Some(prost_types::Duration {
                                    seconds: 3600,
                                    nanos: 0,
                                }),
                            })),
                        },
                        Step {
                            step_id: "send".into(),
                            action: Some(step::Action::SendMessage(SendMessage {
                                template: "hello".into(),
                            })),
                        },
                    ],
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("journey");
    let mut messaging =
        MessagingServiceClient::connect(platform.address_of(service_names::MESSAGING))
            .await
            .expect("messaging");
    messaging
        .create_template(with_key(
            CreateTemplateRequest {
                template: Some(Template {
                    name: "hello".into(),
                    channel: MessageChannel::Email.into(),
                    subject: "Hello".into(),
                    html_body: "<p>Hello</p>".into(),
                    text_body: "Hello".into(),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("template");

    let (grace, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "grace@example.com".into(),
            first_name: "Grace".into(),
            phone: "+44 20 7946 0958".into(),
            external_ids: vec!["hubspot:42".into()],
            ..Default::default()
        },
    )
    .await;
    let id = grace.contact_id.clone();
    contacts
        .add_note(with_key(
            AddNoteRequest {
                note: Some(Note {
                    contact_id: id.clone(),
                    r#type: NoteType::SupportTicket.into(),
                    body: "Asked about invoices.".into(),
                    author: "agent-1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("note");
    contacts
        .record_order(with_key(
            RecordOrderRequest {
                order: Some(Order {
                    order_id: "G-1".into(),
                    contact_id: id.clone(),
                    total: Some(Money {
                        currency_code: "GBP".into(),
                        amount_micros: 9_990_000,
                    }),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("order");
    messaging
        .send_message(with_key(
            SendMessageRequest {
                idempotency_key: "hello-grace".into(),
                template: "hello".into(),
                contact_id: id.clone(),
                to_email: "grace@example.com".into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("send");

    let database = sqlx::PgPool::connect(platform.database_url())
        .await
        .expect("database");
    let count = |sql: &'static str| {
        let database = database.clone();
        let id = id.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_one(&database)
                .await
                .expect(sql)
        }
    };
    const MEMBERS: &str =
        "SELECT count(*) FROM segmentation.memberships WHERE contact_id::text = $1";
    const RUNS: &str = "SELECT count(*) FROM automation.runs WHERE contact_id::text = $1";
    const ADDRESSED: &str =
        "SELECT count(*) FROM messaging.sends WHERE contact_id::text = $1 AND recipient <> ''";
    eventually("Grace in the segment and the journey", &platform, || {
        let members = count(MEMBERS);
        let runs = count(RUNS);
        async move { (members.await == 1 && runs.await == 1).then_some(()) }
    })
    .await;
    assert_eq!(count(ADDRESSED).await, 1);
    // The message and the events reach her timeline.
    eventually("the sent message on the timeline", &platform, || {
        let mut contacts = contacts.clone();
        let id = id.clone();
        async move {
            let entries = timeline(&mut contacts, key, &id).await;
            kinds(&entries)
                .contains(&TimelineKind::Message)
                .then_some(())
        }
    })
    .await;

    // Access: everything held, in one answer.
    let export = contacts
        .export_contact(with_key(
            ExportContactRequest {
                contact_id: id.clone(),
            },
            key,
        ))
        .await
        .expect("export")
        .into_inner();
    assert_eq!(
        export.contact.as_ref().expect("contact").first_name,
        "Grace"
    );
    assert_eq!(
        export.contact.as_ref().expect("contact").identities.len(),
        3
    );
    assert_eq!(export.notes.len(), 1);
    assert_eq!(export.orders.len(), 1);
    assert_eq!(export.stage_changes.len(), 1);
    assert!(export.timeline.len() >= 4, "{:#?}", export.timeline);

    // Erasure.
    contacts
        .delete_contact(with_key(
            DeleteContactRequest {
                contact_id: id.clone(),
            },
            key,
        ))
        .await
        .expect("erase");
    let gone = get(&mut contacts, key, &id).await.expect_err("erased");
    assert_eq!(gone.code(), Code::NotFound);
    for table in [
        "identities",
        "notes",
        "orders",
        "timeline",
        "stage_changes",
        "consent_changes",
        "score_changes",
        "contacts",
    ] {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM contacts.{table} WHERE contact_id::text = $1"
        )))
        .bind(&id)
        .fetch_one(&database)
        .await
        .expect("count");
        assert_eq!(left, 0, "contacts.{table} still holds the erased contact");
    }
    let erased = eventually("the erasure event", &platform, || {
        let found = changes(&watcher, &id)
            .into_iter()
            .find(|c| c.change_type() == ChangeType::Erased);
        async move { found }
    })
    .await;
    assert!(
        erased.contact.is_none(),
        "an erasure event carries no personal data"
    );
    // Every other service honours it.
    eventually("segmentation, automation and messaging to forget Grace", &platform, || {
        let members = count(MEMBERS);
        let runs = count(RUNS);
        let addressed = count(ADDRESSED);
        async move {
            (members.await == 0 && runs.await == 0 && addressed.await == 0).then_some(())
        }
    })
    .await;
    // Erasing again is fine; the same email later is a new person.
    contacts
        .delete_contact(with_key(
            DeleteContactRequest {
                contact_id: id.clone(),
            },
            key,
        ))
        .await
        .expect("erase again");
    let (again, created) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "grace@example.com".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(created);
    assert_ne!(again.contact_id, id);
    assert_eq!(
        again.first_name, "",
        "nothing of the erased contact comes back"
    );
    let other = platform.create_workspace("Globex").await;
    let refused = contacts
        .delete_contact(with_key(
            DeleteContactRequest {
                contact_id: again.contact_id.clone(),
            },
            &other.api_key,
        ))
        .await
        .expect_err("other workspace");
    assert_eq!(refused.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_import_reports_bad_rows_and_writes_the_rest_and_export_streams_all() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;
    contacts
        .define_custom_field(with_key(
            DefineCustomFieldRequest {
                field: Some(CustomField {
                    key: "plan".into(),
                    r#type: CustomFieldType::Enum.into(),
                    options: vec!["free".into(), "pro".into()],
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("field");

    let csv = "email,first_name,last_name,tags,plan,external_id,phone\n\
               ada@example.com,Ada,Lovelace,vip;beta,pro,salesforce:001,+44 20 7946 0958\n\
               not-an-email,Bob,,,free,,\n\
               cy@example.com,Cy,,,gold,,\n\
               \"dee@example.com\",\"Dee, Jr\",\"O\"\"Neil\nSecond line\",,free,,\n\
               eve@example.com,Eve\n\
               ADA@example.com,,Byron,,,,\n";
    let importer = contacts.clone();
    let import = move |csv: String, chunk: usize| {
        let mut contacts = importer.clone();
        async move {
            let bytes = csv.into_bytes();
            let messages: Vec<ImportContactsRequest> = bytes
                .chunks(chunk)
                .enumerate()
                .map(|(index, piece)| ImportContactsRequest {
                    chunk: piece.to_vec(),
                    stage_cause: if index == 0 {
                        "trade show".into()
                    } else {
                        String::new()
                    },
                })
                .collect();
            contacts
                .import_contacts(with_key(tokio_stream::iter(messages), key))
                .await
                .map(|r| r.into_inner())
        }
    };
    // Chunks of 7 bytes split rows, quotes and the embedded newline.
    let report = import(csv.to_owned(), 7).await.expect("import");
    assert_eq!(report.rows_read, 6);
    assert_eq!((report.created, report.updated, report.failed), (2, 1, 3));
    assert_eq!(
        report
            .errors
            .iter()
            .map(|e| (e.row, e.field.as_str()))
            .collect::<Vec<_>>(),
        [(2, "email"), (3, "plan"), (5, "")]
    );
    let all = contacts
        .list_contacts(with_key(ListContactsRequest::default(), key))
        .await
        .expect("list")
        .into_inner()
        .contacts;
    let mut emails: Vec<&str> = all.iter().map(|c| c.email.as_str()).collect();
    emails.sort();
    assert_eq!(
        emails,
        ["ada@example.com", "dee@example.com"],
        "bad rows wrote nothing"
    );
    let ada = all
        .iter()
        .find(|c| c.email == "ada@example.com")
        .expect("ada");
    assert_eq!(ada.last_name, "Byron", "the later row updated the earlier");
    assert_eq!(ada.tags, ["beta", "vip"]);
    assert_eq!(ada.external_ids, ["salesforce:001"]);
    assert_eq!(ada.phone, "+442079460958");
    let dee = all
        .iter()
        .find(|c| c.email == "dee@example.com")
        .expect("dee");
    assert_eq!(dee.first_name, "Dee, Jr");
    assert_eq!(dee.last_name, "O\"Neil\nSecond line");
    let stages = contacts
        .list_stage_changes(with_key(
            ListStageChangesRequest {
                contact_id: dee.contact_id.clone(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("stages")
        .into_inner()
        .changes;
    assert_eq!(stages[0].cause, "trade show");

    // A column that is neither a field nor a custom field: nothing imported.
    let unknown = import("email,shoe_size\nzed@example.com,44\n".into(), 1024)
        .await
        .expect_err("unknown column");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(fields_of(&unknown), ["columns[1]"]);

    // Bulk export streams every contact, in pages under the hood.
    let rows: String = (0..1_203)
        .map(|i| format!("bulk{i}@example.com,pro\n"))
        .collect();
    let report = import(format!("email,plan\n{rows}"), 64 * 1024)
        .await
        .expect("bulk import");
    assert_eq!(report.created, 1_203);
    let mut stream = contacts
        .export_contacts(with_key(
            ExportContactsRequest {
                filter: Some(ContactFilter {
                    custom_fields: json(serde_json::json!({"plan": "pro"})),
                    ..Default::default()
                }),
            },
            key,
        ))
        .await
        .expect("export")
        .into_inner();
    let mut exported = std::collections::HashSet::new();
    let mut messages = 0;
    while let Some(page) = stream.message().await.expect("stream") {
        messages += 1;
        exported.extend(page.contacts.into_iter().map(|c| c.email));
    }
    assert_eq!(messages, 3, "pages of up to 500 contacts");
    assert_eq!(exported.len(), 1_204, "1,203 bulk contacts and Ada");
    assert!(exported.contains("ada@example.com"));
    assert!(!exported.contains("dee@example.com"));
}

async fn publish_sync(
    platform: &Platform,
    workspace_id: &str,
    external_id: &str,
    sync: InboundSync,
) {
    let connector = sync.connector.clone();
    support::publish(
        platform,
        topics::CRM_INBOUND,
        external_id,
        workspace_id,
        &connector,
        Payload::InboundSync(sync),
    )
    .await;
}

fn contact_sync(external_id: &str, minute: u32, fields: serde_json::Value) -> InboundSync {
    use chrono::TimeZone;
    InboundSync {
        connector: "salesforce".into(),
        external_id: external_id.into(),
        source_time: Some(rapport_core::time::to_timestamp(
            chrono::Utc
                .with_ymd_and_hms(2026, 12, 1, 10, minute, 0)
                .single()
                .expect("time"),
        )),
        record: Some(inbound_sync::Record::Contact(InboundContact {
            fields: json(fields),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_sync_resolves_conflicts_per_field_and_dead_letters_what_cannot_apply() {
    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let workspace = acme.workspace_id.as_str();
    let mut contacts = client(&platform).await;
    let watcher = KafkaWatcher::start(&platform, topics::CONTACT_CHANGES).await;
    let dead = KafkaWatcher::start(
        &platform,
        &rapport_bus::dead_letter_topic(topics::CRM_INBOUND),
    )
    .await;

    publish_sync(
        &platform,
        workspace,
        "003A",
        contact_sync(
            "003A",
            30,
            serde_json::json!({"email": "ada@example.com", "first_name": "Ada", "job_title": "CTO"}),
        ),
    )
    .await;
    let ada = eventually("the synced contact", &platform, || {
        let mut contacts = contacts.clone();
        async move {
            contacts
                .list_contacts(with_key(ListContactsRequest::default(), key))
                .await
                .ok()?
                .into_inner()
                .contacts
                .into_iter()
                .next()
        }
    })
    .await;
    assert_eq!(ada.external_ids, ["salesforce:003A"]);
    assert_eq!(ada.first_name, "Ada");
    assert_eq!(ada.source, "crm:salesforce");
    let created = eventually("the creation event", &platform, || {
        let found = changes(&watcher, &ada.contact_id).into_iter().next();
        async move { found }
    })
    .await;
    assert_eq!(
        created.source, "crm:salesforce",
        "the connector can tell its own change"
    );

    // Older in the CRM than what is held: those fields are skipped; a field
    // never set before applies. Then a newer change wins.
    publish_sync(
        &platform,
        workspace,
        "003A",
        contact_sync(
            "003A",
            10,
            serde_json::json!({"first_name": "Old", "job_title": "Intern", "phone": "+14155552671"}),
        ),
    )
    .await;
    publish_sync(
        &platform,
        workspace,
        "003A",
        contact_sync("003A", 45, serde_json::json!({"first_name": "Adaline"})),
    )
    .await;
    let synced = eventually("the newer first name", &platform, || {
        let mut contacts = contacts.clone();
        let id = ada.contact_id.clone();
        async move {
            let contact = get(&mut contacts, key, &id).await.ok()?;
            (contact.first_name == "Adaline").then_some(contact)
        }
    })
    .await;
    assert_eq!(
        synced.job_title, "CTO",
        "an older value never overwrites a newer"
    );
    assert_eq!(
        synced.phone, "+14155552671",
        "a field not held before applies"
    );

    // Records that can never apply go to the dead-letter topic, and the
    // partition moves on to the next record.
    let mut no_time = contact_sync("003B", 0, serde_json::json!({"email": "b@example.com"}));
    no_time.source_time = None;
    publish_sync(&platform, workspace, "003B", no_time).await;
    publish_sync(
        &platform,
        workspace,
        "003C",
        contact_sync(
            "003C",
            0,
            serde_json::json!({"email": "c@example.com", "shoe_size": 44}),
        ),
    )
    .await;
    publish_sync(
        &platform,
        workspace,
        "003D",
        contact_sync("003D", 0, serde_json::json!({"email": "not-an-email"})),
    )
    .await;
    let mut deal = contact_sync("006X", 50, serde_json::json!({}));
    deal.record = Some(inbound_sync::Record::Deal(InboundDeal {
        deal_id: "006X".into(),
        name: "40 seats".into(),
        stage: "negotiation".into(),
        amount: Some(Money {
            currency_code: "USD".into(),
            amount_micros: 48_000_000_000,
        }),
        contact_external_id: "003A".into(),
    }));
    publish_sync(&platform, workspace, "006X", deal).await;
    for key in ["003B", "003C", "003D"] {
        eventually("the bad record in the dead-letter topic", &platform, || {
            let found = dead.count_for(key) > 0;
            async move { found.then_some(()) }
        })
        .await;
    }
    eventually("the deal on Ada's timeline", &platform, || {
        let mut contacts = contacts.clone();
        let id = ada.contact_id.clone();
        async move {
            timeline(&mut contacts, key, &id)
                .await
                .into_iter()
                .find(|e| e.summary.contains("40 seats"))
        }
    })
    .await;
    let all = contacts
        .list_contacts(with_key(ListContactsRequest::default(), key))
        .await
        .expect("list")
        .into_inner()
        .contacts;
    assert_eq!(all.len(), 1, "dead-lettered records wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_stops_email_to_the_contact_and_reaches_its_timeline() {
    use rapport_proto::events::v1::MessageEvent;
    use rapport_proto::events::v1::message_event::{Channel as MessageChannel, Status};

    let platform = Platform::start_on_kafka(Layout::OneProcess, Vec::new()).await;
    let acme = platform.create_workspace("Acme").await;
    let key = acme.api_key.as_str();
    let mut contacts = client(&platform).await;
    let (ada, _) = upsert(
        &mut contacts,
        key,
        Contact {
            email: "ada@example.com".into(),
            email_consent: Some(Consent {
                status: ConsentStatus::Subscribed.into(),
                reason: "form".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;

    support::publish(
        &platform,
        topics::MESSAGE_LIFECYCLE,
        &ada.contact_id,
        &acme.workspace_id,
        "messaging",
        Payload::MessageEvent(MessageEvent {
            message_id: uuid::Uuid::now_v7().to_string(),
            contact_id: ada.contact_id.clone(),
            channel: MessageChannel::Email.into(),
            status: Status::Bounced.into(),
            reason: "550 mailbox unavailable".into(),
            ..Default::default()
        }),
    )
    .await;

    let stopped = eventually("the bounce to stop email", &platform, || {
        let mut contacts = contacts.clone();
        let id = ada.contact_id.clone();
        async move {
            let contact = get(&mut contacts, key, &id).await.ok()?;
            let consent = contact.email_consent.clone()?;
            (consent.status() == ConsentStatus::Unsubscribed).then_some(consent)
        }
    })
    .await;
    assert_eq!(stopped.reason, "bounced");
    let entries = timeline(&mut contacts, key, &ada.contact_id).await;
    let message = entries
        .iter()
        .find(|e| e.kind() == TimelineKind::Message)
        .expect("the bounce on the timeline");
    assert_eq!(message.summary, "Email bounced");
    assert!(kinds(&entries).contains(&TimelineKind::ConsentChanged));
}
