//! CSV import. The file arrives in chunks; a blocking task parses it as it
//! comes (the `csv` crate, so quoting and embedded newlines follow RFC
//! 4180) and hands rows back in batches of 500, each written in one
//! transaction in which a bad row is reported and left out whole.

use std::io::Read;

use rapport_core::json::json_to_struct;
use rapport_core::{ApiError, FieldViolation, WorkspaceId};
use rapport_proto::common::v1::{Consent, ConsentStatus};
use rapport_proto::contacts::v1::{Contact, ImportContactsResponse, RowError, Touch};
use tokio::sync::mpsc;

use crate::fields;
use crate::store::Store;
use crate::validate::{check_contact, text_field};

const BATCH: usize = 500;
const MAX_ERRORS: usize = 1_000;
/// Columns that are not custom fields, beside the text fields
/// ([`text_field`]).
const STANDARD: [&str; 10] = [
    "contact_id",
    "company_id",
    "tags",
    "external_id",
    "external_ids",
    "anonymous_id",
    "source",
    "email_consent",
    "utm_source",
    "utm_campaign",
];

/// The request stream's chunks, read as one file by the parser.
struct ChunkReader {
    /// Err: the request stream broke; the file ends in an error, not EOF.
    chunks: mpsc::Receiver<Result<Vec<u8>, ()>>,
    current: Vec<u8>,
    position: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.position >= self.current.len() {
            match self.chunks.blocking_recv() {
                Some(Err(())) => {
                    return Err(std::io::Error::other("the import stream broke"));
                }
                Some(Ok(chunk)) => {
                    self.current = chunk;
                    self.position = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len() - self.position);
        buffer[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

/// What the parser hands back.
enum Parsed {
    Rows(Vec<(i64, Result<Contact, RowError>)>),
    /// The file cannot be read on (bad header, broken CSV).
    Failed(ApiError),
}

fn row_to_contact(
    header: &[String],
    record: &csv::StringRecord,
) -> Result<Contact, (String, String)> {
    let mut contact = Contact::default();
    let mut custom = serde_json::Map::new();
    let mut touch = Touch::default();
    for (column, value) in header.iter().zip(record.iter()) {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        let list = || {
            value
                .split(';')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        };
        match column.as_str() {
            "contact_id" => contact.contact_id = value.to_owned(),
            "company_id" => contact.company_id = value.to_owned(),
            "tags" => contact.tags = list(),
            "external_id" | "external_ids" => contact.external_ids = list(),
            "anonymous_id" => contact.anonymous_ids = list(),
            "source" => contact.source = value.to_owned(),
            "utm_source" => touch.source = value.to_owned(),
            "utm_campaign" => touch.campaign = value.to_owned(),
            "email_consent" => {
                let status = match value.to_lowercase().as_str() {
                    "subscribed" | "yes" | "true" => ConsentStatus::Subscribed,
                    "unsubscribed" | "no" | "false" => ConsentStatus::Unsubscribed,
                    "pending" => ConsentStatus::Pending,
                    _ => {
                        return Err((
                            column.clone(),
                            "must be subscribed, unsubscribed or pending".into(),
                        ));
                    }
                };
                contact.email_consent = Some(Consent {
                    status: status.into(),
                    reason: "import".into(),
                    update_time: None,
                });
            }
            name => match text_field(&mut contact, name) {
                Some(slot) => *slot = value.to_owned(),
                None => {
                    custom.insert(name.to_owned(), serde_json::Value::String(value.to_owned()));
                }
            },
        }
    }
    if !touch.source.is_empty() || !touch.campaign.is_empty() {
        contact.last_touch = Some(touch);
    }
    if !custom.is_empty() {
        contact.custom_fields = Some(json_to_struct(&serde_json::Value::Object(custom)));
    }
    if contact.source.is_empty() {
        contact.source = "import".into();
    }
    Ok(contact)
}

/// Parses the file, sending rows back in batches. Runs on a blocking thread.
fn parse(reader: ChunkReader, custom_keys: Vec<String>, rows: mpsc::Sender<Parsed>) {
    let mut csv = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let header: Vec<String> = match csv.headers() {
        Ok(header) => header.iter().map(|h| h.trim().to_lowercase()).collect(),
        Err(error) => {
            let _ = rows.blocking_send(Parsed::Failed(ApiError::invalid_field(
                "chunk",
                format!("the header row is not CSV: {error}"),
            )));
            return;
        }
    };
    let mut violations = Vec::new();
    if header.iter().all(|h| h.is_empty()) {
        violations.push(FieldViolation {
            field: "chunk".into(),
            description: "the file is empty or has no header row".into(),
        });
    }
    for (index, column) in header.iter().enumerate() {
        let standard = STANDARD.contains(&column.as_str())
            || text_field(&mut Contact::default(), column).is_some();
        if !standard && !custom_keys.contains(column) {
            violations.push(FieldViolation {
                field: format!("columns[{index}]"),
                description: format!(
                    "`{column}` is neither a contact field nor a custom field of this workspace"
                ),
            });
        } else if header[..index].contains(column) {
            violations.push(FieldViolation {
                field: format!("columns[{index}]"),
                description: format!("`{column}` appears twice"),
            });
        }
    }
    if !violations.is_empty() {
        let _ = rows.blocking_send(Parsed::Failed(ApiError::invalid_fields(violations)));
        return;
    }
    let mut batch = Vec::with_capacity(BATCH);
    let mut number = 0_i64;
    for record in csv.records() {
        number += 1;
        let row = match record {
            Ok(record) if record.len() != header.len() => Err(RowError {
                row: number,
                field: String::new(),
                description: format!(
                    "has {} cells; the header has {}",
                    record.len(),
                    header.len()
                ),
            }),
            Ok(record) => {
                row_to_contact(&header, &record).map_err(|(field, description)| RowError {
                    row: number,
                    field,
                    description,
                })
            }
            Err(error) if error.is_io_error() => return,
            Err(error) => Err(RowError {
                row: number,
                field: String::new(),
                description: format!("is not valid CSV: {error}"),
            }),
        };
        batch.push((number, row));
        if batch.len() == BATCH
            && rows
                .blocking_send(Parsed::Rows(std::mem::take(&mut batch)))
                .is_err()
        {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = rows.blocking_send(Parsed::Rows(batch));
    }
}

impl Store {
    /// Imports the CSV file the stream carries.
    pub async fn import<S>(
        &self,
        workspace: WorkspaceId,
        mut chunks: S,
    ) -> Result<ImportContactsResponse, ApiError>
    where
        S: futures::Stream<Item = Result<(Vec<u8>, String), ApiError>> + Unpin + Send + 'static,
    {
        use futures::StreamExt;

        let custom_keys: Vec<String> = fields::definitions(self.pool(), workspace)
            .await?
            .into_keys()
            .collect();
        // The first message names the stage cause.
        let (first_chunk, stage_cause) = match chunks.next().await {
            Some(Ok(first)) => first,
            Some(Err(error)) => return Err(error),
            None => (Vec::new(), String::new()),
        };
        // Three parties, each waiting only on the next: a task forwards the
        // request stream into a bounded channel, the parser (a blocking
        // thread) reads it and sends rows back, and this task writes them.
        let (chunk_sender, chunk_receiver) = mpsc::channel::<Result<Vec<u8>, ()>>(16);
        let forward = tokio::spawn(async move {
            if chunk_sender.send(Ok(first_chunk)).await.is_err() {
                return Ok(());
            }
            while let Some(chunk) = chunks.next().await {
                let bytes = match chunk {
                    Ok((bytes, _)) => bytes,
                    Err(error) => {
                        // The parser drops the unfinished batch: no row
                        // cut short by the break is written.
                        let _ = chunk_sender.send(Err(())).await;
                        return Err(error);
                    }
                };
                if chunk_sender.send(Ok(bytes)).await.is_err() {
                    // The parser stopped (a bad header): nothing more to read.
                    break;
                }
            }
            Ok::<(), ApiError>(())
        });
        let (row_sender, mut row_receiver) = mpsc::channel::<Parsed>(2);
        let parser = tokio::task::spawn_blocking(move || {
            parse(
                ChunkReader {
                    chunks: chunk_receiver,
                    current: Vec::new(),
                    position: 0,
                },
                custom_keys,
                row_sender,
            );
        });
        let mut response = ImportContactsResponse::default();
        while let Some(parsed) = row_receiver.recv().await {
            match parsed {
                Parsed::Failed(error) => {
                    forward.abort();
                    return Err(error);
                }
                Parsed::Rows(rows) => {
                    self.import_batch(workspace, rows, &stage_cause, &mut response)
                        .await?;
                }
            }
        }
        let _ = parser.await;
        match forward.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(error) => return Err(ApiError::internal(&error)),
        }
        // Rows the parser refused are reported before rows the write did.
        response.errors.sort_by_key(|error| error.row);
        Ok(response)
    }

    async fn import_batch(
        &self,
        workspace: WorkspaceId,
        rows: Vec<(i64, Result<Contact, RowError>)>,
        stage_cause: &str,
        response: &mut ImportContactsResponse,
    ) -> Result<(), ApiError> {
        let mut inputs = Vec::new();
        let mut numbers = Vec::new();
        let fail = |response: &mut ImportContactsResponse, error: RowError| {
            response.failed += 1;
            if response.errors.len() < MAX_ERRORS {
                response.errors.push(error);
            }
        };
        for (number, row) in rows {
            response.rows_read += 1;
            let contact = match row {
                Ok(contact) => contact,
                Err(error) => {
                    fail(response, error);
                    continue;
                }
            };
            let mut violations = Vec::new();
            let mut input = check_contact(&contact, "", &mut violations);
            if let Some(violation) = violations.into_iter().next() {
                fail(
                    response,
                    RowError {
                        row: number,
                        field: column_of(&violation.field),
                        description: violation.description,
                    },
                );
                continue;
            }
            if let Some(company_id) = input.company_id
                && !self.company_exists(workspace, company_id).await?
            {
                fail(
                    response,
                    RowError {
                        row: number,
                        field: "company_id".into(),
                        description: format!(
                            "company {company_id} does not exist in this workspace"
                        ),
                    },
                );
                continue;
            }
            input.stage_cause = if stage_cause.is_empty() {
                "import".into()
            } else {
                stage_cause.to_owned()
            };
            inputs.push(input);
            numbers.push(number);
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let results = self.write(workspace, None, inputs, true).await?;
        for (number, result) in numbers.into_iter().zip(results) {
            match result {
                Ok(outcome) if outcome.created => response.created += 1,
                Ok(_) => response.updated += 1,
                Err(error) => {
                    let (field, description) = match error.field_violations.first() {
                        Some(v) => (column_of(&v.field), v.description.clone()),
                        None => (String::new(), error.message.clone()),
                    };
                    fail(
                        response,
                        RowError {
                            row: number,
                            field,
                            description,
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

/// The CSV column a violation names (`custom_fields.plan` -> `plan`,
/// `external_ids[0]` -> `external_id`).
fn column_of(field: &str) -> String {
    let field = field.strip_prefix("custom_fields.").unwrap_or(field);
    let field = field.split('[').next().unwrap_or(field);
    match field {
        "external_ids" => "external_id".into(),
        "anonymous_ids" => "anonymous_id".into(),
        "last_touch.source" => "utm_source".into(),
        "last_touch.campaign" => "utm_campaign".into(),
        other => other.to_owned(),
    }
}
