//! Cursor paging. A page token is an opaque, URL-safe encoding of the last
//! key a client saw; tampered or foreign tokens are INVALID_ARGUMENT.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rapport_proto::common::v1::{PageRequest, PageResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// A validated page request: how many rows to fetch and after which cursor.
#[derive(Debug, Clone)]
pub struct Page<C> {
    pub size: i64,
    pub after: Option<C>,
}

impl<C: DeserializeOwned> Page<C> {
    pub fn parse(request: Option<&PageRequest>) -> Result<Self, ApiError> {
        let Some(request) = request else {
            return Ok(Page {
                size: DEFAULT_PAGE_SIZE,
                after: None,
            });
        };
        if request.page_size < 0 {
            return Err(ApiError::invalid_field(
                "page.page_size",
                "must not be negative",
            ));
        }
        let size = match i64::from(request.page_size) {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let after =
            if request.page_token.is_empty() {
                None
            } else {
                let bytes = URL_SAFE_NO_PAD.decode(&request.page_token).map_err(|_| {
                    ApiError::invalid_field("page.page_token", "is not a valid token")
                })?;
                Some(serde_json::from_slice(&bytes).map_err(|_| {
                    ApiError::invalid_field("page.page_token", "is not a valid token")
                })?)
            };
        Ok(Page { size, after })
    }

    /// The row limit to query with: one more than the page, to know whether
    /// another page follows.
    pub fn fetch_limit(&self) -> i64 {
        self.size + 1
    }
}

/// Trims `rows` (fetched with [`Page::fetch_limit`]) to the page and builds the
/// response token from the last row kept.
pub fn finish_page<T, C: Serialize>(
    mut rows: Vec<T>,
    size: i64,
    cursor_of: impl Fn(&T) -> C,
) -> (Vec<T>, PageResponse) {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let next_page_token = if rows.len() > size {
        rows.truncate(size);
        rows.last()
            .map(|last| {
                let json = serde_json::to_vec(&cursor_of(last)).unwrap_or_default();
                URL_SAFE_NO_PAD.encode(json)
            })
            .unwrap_or_default()
    } else {
        String::new()
    };
    (rows, PageResponse { next_page_token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let (rows, response) = finish_page(vec![1, 2, 3], 2, |n| *n);
        assert_eq!(rows, vec![1, 2]);
        let page: Page<i32> = Page::parse(Some(&PageRequest {
            page_size: 2,
            page_token: response.next_page_token,
        }))
        .expect("token parses");
        assert_eq!(page.after, Some(2));

        let error = Page::<i32>::parse(Some(&PageRequest {
            page_size: 2,
            page_token: "%%%".into(),
        }))
        .expect_err("garbage refused");
        assert_eq!(error.field_violations[0].field, "page.page_token");
    }
}
