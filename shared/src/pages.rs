//! List pages bounded by bytes as well as by count: 500 jobs of a megabyte each would be held
//! whole in the API's memory, decoded and then encoded again, for one request.

use futures::{Stream, TryStreamExt};
use sqlx::{postgres::PgRow, FromRow, Row};

/// A page's rows, and whether the byte budget ended it before its count did.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub cut: bool,
}

impl<T> Page<T> {
    /// The next page's cursor: the last item's, when the page came back full or was cut.
    pub fn next_cursor<C>(&self, limit: i64, cursor_of: impl Fn(&T) -> C) -> Option<C> {
        (self.cut || self.items.len() as i64 == limit)
            .then(|| self.items.last().map(cursor_of))
            .flatten()
    }
}

/// The bytes a row took on the wire.
pub fn row_bytes(row: &PgRow) -> usize {
    (0..row.len())
        .filter_map(|i| row.try_get_raw(i).ok())
        .filter_map(|value| value.as_bytes().ok())
        .map(<[u8]>::len)
        .sum()
}

/// Reads `rows` in order until they pass `budget` bytes, keeping at least one so that a page
/// always moves on. The rows not read are left on the connection, which skips them.
pub async fn within<T>(
    rows: impl Stream<Item = sqlx::Result<PgRow>>,
    budget: usize,
) -> sqlx::Result<Page<T>>
where
    T: for<'r> FromRow<'r, PgRow>,
{
    let mut rows = std::pin::pin!(rows);
    let (mut items, mut spent) = (Vec::new(), 0);
    while let Some(row) = rows.try_next().await? {
        spent += row_bytes(&row);
        if spent > budget && !items.is_empty() {
            return Ok(Page { items, cut: true });
        }
        items.push(T::from_row(&row)?);
    }
    Ok(Page { items, cut: false })
}
