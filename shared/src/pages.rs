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

/// `query`'s rows as [`within`] reads them, on a connection of `pool` that is closed, not
/// returned, when the budget ends the page before the rows do: sqlx reads a result to its end
/// before a connection's next use, so PostgreSQL produced and sent, and this process read, up
/// to 500 rows of a megabyte each for a page of 8 MiB, holding one of the pool's connections
/// meanwhile. Closed, it stops at what the socket holds.
pub async fn read<T>(
    pool: &sqlx::PgPool,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    budget: usize,
) -> sqlx::Result<Page<T>>
where
    T: for<'r> FromRow<'r, PgRow>,
{
    let mut connection = pool.acquire().await?;
    let page = within(query.fetch(&mut *connection), budget).await?;
    if page.cut {
        connection.close_on_drop();
    }
    Ok(page)
}

/// Reads `rows` in order until they pass `budget` bytes, keeping at least one so that a page
/// always moves on. The rows not read are left on the connection, which reads them all before
/// its next use (see [`read`]).
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

/// How many rows one filtered page reads at most where no index has all of its filters: a rare
/// match read the tenant's whole history for one page. Such a page may hold fewer items than its
/// `limit`, or none, with a cursor where the reading stopped.
pub const SCAN_ROWS: i64 = 10_000;

/// A filtered page read under a budget of rows (see [`push_scan`]): the rows of `table` that
/// `filter` selects, newest `id` first, at most `scan_rows` of them, answering those that `hit`
/// matches. `columns` (each prefixed `t.`) are read for the matches only.
pub struct Scan<'a> {
    pub table: &'a str,
    pub columns: &'a str,
    pub scan_rows: i64,
    pub limit: i64,
}

impl Scan<'_> {
    /// Pushes the page's statement: `hit` pushes a boolean expression of the scanned row,
    /// `filter` the conditions after `WHERE` that an index answers (e.g. the tenant's id).
    /// A LIMIT in SQL, not a stream dropped early: PostgreSQL would produce, and sqlx drain,
    /// the rest.
    pub fn push<'q>(
        &self,
        q: &mut sqlx::QueryBuilder<'q, sqlx::Postgres>,
        hit: impl FnOnce(&mut sqlx::QueryBuilder<'q, sqlx::Postgres>),
        filter: impl FnOnce(&mut sqlx::QueryBuilder<'q, sqlx::Postgres>),
    ) {
        // `scan`: the next `scan_rows` rows, numbered, each with whether it matches; `s`: the
        // matches and the last row the budget reaches, `limit` of them at most, so that the
        // reading stops at the page's last match; then the matches' whole rows.
        let scan_rows = self.scan_rows.max(1);
        q.push(format!(
            "SELECT s.id AS scan_id, s.hit AS scan_hit, s.scanned AS scan_rank, {columns}
             FROM (SELECT id, hit, scanned FROM (SELECT id, (",
            columns = self.columns
        ));
        hit(q);
        q.push(format!(
            ") IS TRUE AS hit, row_number() OVER (ORDER BY id DESC) AS scanned FROM {} WHERE ",
            self.table
        ));
        filter(q);
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(scan_rows)
            .push(") scan WHERE hit OR scanned = ")
            .push_bind(scan_rows)
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(self.limit)
            .push(format!(
                ") s LEFT JOIN {} t ON t.id = s.id AND s.hit ORDER BY s.id DESC",
                self.table
            ));
    }

    /// The page's matches, and the next page's cursor: where the reading stopped, unless the
    /// rows ran out before the page filled, its bytes or its read budget did.
    pub fn page<K: Clone, T>(&self, page: Page<Scanned<K, T>>) -> (Vec<T>, Option<K>) {
        let full = page.cut || page.items.len() as i64 == self.limit;
        let cursor = page
            .items
            .last()
            .filter(|last| full || last.rank == self.scan_rows.max(1))
            .map(|last| last.key.clone());
        (
            page.items.into_iter().filter_map(|s| s.item).collect(),
            cursor,
        )
    }
}

/// A row a [`Scan`] read: an item that matched, or the last row its read budget reached.
pub struct Scanned<K, T> {
    key: K,
    /// Its place among the rows the request read, from 1.
    rank: i64,
    item: Option<T>,
}

impl<'r, K, T> FromRow<'r, PgRow> for Scanned<K, T>
where
    K: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    T: FromRow<'r, PgRow>,
{
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let hit: bool = row.try_get("scan_hit")?;
        Ok(Self {
            key: row.try_get("scan_id")?,
            rank: row.try_get("scan_rank")?,
            item: hit.then(|| T::from_row(row)).transpose()?,
        })
    }
}
