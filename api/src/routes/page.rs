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
    /// The page size and the id to continue after; 422 naming the parameter otherwise.
    pub fn checked(self) -> Result<(i64, Option<Uuid>), Problem> {
        let invalid =
            |field: &str, message: &str| Problem::validation(vec![FieldError::new(field, message)]);
        let limit = self.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(invalid("limit", "must be between 1 and 500"));
        }
        let cursor = match self.cursor.as_deref() {
            None => None,
            Some(c) => Some(
                Uuid::parse_str(c)
                    .map_err(|_| invalid("cursor", "not a cursor returned by this endpoint"))?,
            ),
        };
        Ok((limit, cursor))
    }
}
