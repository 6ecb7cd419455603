//! The `limit` and `cursor` query parameters of a paged list, checked once for every list.

use serde::Deserialize;
use shared::{FieldError, Problem};
use utoipa::IntoParams;
use uuid::Uuid;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Page size, 1-500 (default 50).
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

impl Page {
    /// With `limit` when the request names none (a list that answered whole before it was
    /// paged keeps answering whole what it could hold).
    pub fn or_limit(mut self, limit: i64) -> Self {
        self.limit = self.limit.or(Some(limit));
        self
    }

    /// The page size and the id to continue after; 422 naming the parameter otherwise.
    pub fn checked(self) -> Result<(i64, Option<Uuid>), Problem> {
        let mut errors = Vec::new();
        let page = checked(self.limit, self.cursor.as_deref(), &mut errors);
        if errors.is_empty() {
            Ok(page)
        } else {
            Err(Problem::validation(errors))
        }
    }
}

/// `limit` and `cursor` of a list that has filters of its own: a refusal joins `errors`, so
/// one answer names every bad parameter.
pub fn checked(
    limit: Option<i64>,
    cursor: Option<&str>,
    errors: &mut Vec<FieldError>,
) -> (i64, Option<Uuid>) {
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 500"));
    }
    let cursor = cursor.and_then(|c| {
        let id = Uuid::parse_str(c).ok();
        if id.is_none() {
            errors.push(FieldError::new(
                "cursor",
                "not a cursor returned by this endpoint",
            ));
        }
        id
    });
    (limit, cursor)
}

/// The next page's cursor: the last item's, when the page came back full.
pub fn next_cursor<T, C>(items: &[T], limit: i64, cursor_of: impl Fn(&T) -> C) -> Option<C> {
    (items.len() as i64 == limit)
        .then(|| items.last().map(cursor_of))
        .flatten()
}
