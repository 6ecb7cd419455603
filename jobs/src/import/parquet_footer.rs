//! A Parquet file checked before polars reads it: polars trusts the sizes the file declares (it
//! reads a footer of the declared length, reserves a list's declared length before reading its
//! elements, and reserves a page's declared uncompressed size before decompressing it), so a few
//! hostile bytes could make the process reserve hundreds of GB and abort. Here the footer must
//! fit a bound and every count in it must be backed by bytes, walked without allocating; then
//! every column chunk's pages are walked by their headers, their bodies seeked over: they must
//! tile the chunk, and no page may unpack to more than a bound.
//!
//! polars reads a field it knows as the type the Parquet schema gives it, whatever type the file
//! declares (a field 1 declared a string is read as the integer polars expects there, and the
//! string's bytes as the next fields), so a walk by declared types could pass bytes that polars
//! reads otherwise. A field polars knows must have the type polars reads it as ([`Wire`]); the
//! others are skipped by their declared type, as polars skips them.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    ops::Range,
    path::Path,
};

/// The largest footer (file metadata) read; real files' footers are kilobytes to a few MB.
pub const FOOTER_LIMIT: u64 = 16 << 20;

/// The most a page may unpack to: polars reserves a page's declared size before decompressing
/// it. Writers cut pages at about 1 MB.
pub const PAGE_LIMIT: u64 = 256 << 20;

/// The longest page header read; real ones are tens of bytes, a few KB with long statistics.
const HEADER_LIMIT: u64 = 1 << 20;

/// The most pages walked in one file (a TB of 1 MB pages); each costs a read of its header.
const MAX_PAGES: u64 = 1 << 20;

/// The most values a column chunk may declare: polars reserves a nested column's declared
/// count before decoding it (2^28 values of 8 bytes: 2 GiB).
const MAX_CHUNK_VALUES: i64 = 1 << 28;

/// Thrift structs nest a few levels in Parquet metadata; a deeper file is hostile.
const MAX_DEPTH: usize = 32;

/// Whether the Parquet file at `path` is safe to hand to polars; why not.
pub fn check(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size < 12 {
        return Err("too short to be a Parquet file".into());
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::End(-8))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| e.to_string())?;
    if &tail[4..] != b"PAR1" {
        return Err("does not end with PAR1".into());
    }
    let declared = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")));
    if declared > size - 12 {
        return Err(format!(
            "its footer declares {declared} bytes of metadata, more than the file holds"
        ));
    }
    if declared > FOOTER_LIMIT {
        return Err(format!(
            "its footer declares {declared} bytes of metadata; at most {FOOTER_LIMIT} are read"
        ));
    }
    let mut metadata = vec![0; declared as usize];
    file.seek(SeekFrom::End(-8 - declared as i64))
        .and_then(|_| file.read_exact(&mut metadata))
        .map_err(|e| e.to_string())?;
    let walk = |seen: &mut Seen| {
        Compact {
            bytes: &metadata,
            pos: 0,
        }
        .walk(file_metadata, &mut Vec::new(), seen)
    };
    walk(&mut |_, _| Ok(())).map_err(|why| format!("its metadata {why}"))?;
    // The metadata reads as polars reads it. Again, for each column chunk: its pages lie between
    // the leading PAR1 and the footer.
    let mut pages = Pages {
        file,
        data: 4..size - 8 - declared,
        walked: 0,
        header: Vec::new(),
        ranges: Vec::new(),
    };
    let mut chunk = Chunk::default();
    let mut each = |path: &[i64], value: Option<i64>| {
        match (path, value) {
            // FileMetaData.row_groups[].columns[].meta_data
            ([4, 1, 3, field], Some(value)) => chunk.set(*field, value),
            ([4, 1, 3], None) => return pages.chunk(std::mem::take(&mut chunk)),
            _ => {}
        }
        Ok(())
    };
    walk(&mut each)?;
    pages.disjoint()
}

/// What the file's data takes once decoded, by its metadata: each row group's declared size,
/// and at least 8 bytes a value, since a column of repeats or nulls encodes to nothing; and
/// for list columns, 12 bytes an element (polars decodes every element of a nested column with
/// its two levels, 2 bytes each, however few rows hold them).
pub fn decoded_bytes(metadata: &polars::prelude::FileMetadata) -> u64 {
    let columns = metadata.schema().columns().len() as u64;
    metadata
        .row_groups
        .iter()
        .zip(list_bytes(metadata))
        .map(|(g, lists)| {
            let cells = (g.num_rows() as u64).saturating_mul(columns);
            // The row group's own total is the file's word alone; its chunks' sizes are backed
            // by their pages (see `check`).
            let chunks = g
                .parquet_columns()
                .iter()
                .map(|c| c.uncompressed_size().max(0) as u64)
                .fold(0, u64::saturating_add);
            (g.total_byte_size() as u64)
                .max(chunks)
                .max(cells.saturating_mul(8))
                .max(lists)
        })
        .fold(0, u64::saturating_add)
}

/// The file's rows, refused unless they are its row groups': the reader stops at the file's
/// count and sizes its slices by it, so a lower count dropped the rest of the rows from an
/// import that succeeded.
pub fn rows(metadata: &polars::prelude::FileMetadata) -> Result<usize, String> {
    let in_groups: usize = metadata.row_groups.iter().map(|g| g.num_rows()).sum();
    if in_groups != metadata.num_rows {
        return Err(format!(
            "it declares {} rows where its row groups hold {in_groups}",
            metadata.num_rows
        ));
    }
    Ok(in_groups)
}

/// What each row group's list columns take once decoded, 12 bytes an element: a slice of rows
/// reads a flat column's pages only as far as its rows, but decodes each page of a list column
/// it touches whole, so one row holding millions of elements costs all of them.
pub fn list_bytes(metadata: &polars::prelude::FileMetadata) -> impl Iterator<Item = u64> + '_ {
    metadata.row_groups.iter().map(|g| {
        g.parquet_columns()
            .iter()
            .filter(|c| c.descriptor().descriptor.max_rep_level > 0)
            .map(|c| (c.num_values().max(0) as u64).saturating_mul(12))
            .fold(0, u64::saturating_add)
    })
}

/// A column chunk's metadata, as far as its pages go.
#[derive(Default)]
struct Chunk {
    values: Option<i64>,
    uncompressed: Option<i64>,
    compressed: Option<i64>,
    data_page: Option<i64>,
    dictionary_page: Option<i64>,
}

impl Chunk {
    /// ColumnMetaData's field `id`.
    fn set(&mut self, id: i64, value: i64) {
        let field = match id {
            5 => &mut self.values,
            6 => &mut self.uncompressed,
            7 => &mut self.compressed,
            9 => &mut self.data_page,
            11 => &mut self.dictionary_page,
            _ => return,
        };
        *field = Some(value);
    }
}

/// What a page's header declares.
struct Page {
    /// The header's own length.
    header: u64,
    compressed: u64,
    uncompressed: u64,
    /// A dictionary page's values, which polars reserves room for before reading them.
    dictionary_values: Option<i64>,
    /// A v2 data page's level lengths, which polars splits the page at unchecked.
    levels: [Option<i64>; 2],
    /// A data page's values (elements and nulls), for which polars reserves and fills levels
    /// whatever bytes back them: a few bytes of run-length levels may declare billions.
    values: Option<i64>,
}

/// A walk over column chunks' pages: their headers read, their bodies seeked over.
struct Pages {
    file: File,
    /// Where pages may lie: after the leading PAR1, before the footer.
    data: Range<u64>,
    walked: u64,
    header: Vec<u8>,
    /// The byte ranges of the chunks walked: chunks sharing bytes made polars unpack the same
    /// page once for each.
    ranges: Vec<Range<u64>>,
}

impl Pages {
    /// One column chunk's pages, where polars reads them: from its dictionary page (else its
    /// first data page) over its declared compressed size, header, body, header, body...
    fn chunk(&mut self, chunk: Chunk) -> Result<(), String> {
        let (Some(compressed), Some(uncompressed), Some(data_page)) =
            (chunk.compressed, chunk.uncompressed, chunk.data_page)
        else {
            return Err("has a column chunk without its sizes".into());
        };
        if !(0..=MAX_CHUNK_VALUES).contains(&chunk.values.unwrap_or(0)) {
            return Err(format!(
                "has a column chunk declaring {} values; at most {MAX_CHUNK_VALUES} are read",
                chunk.values.unwrap_or(0)
            ));
        }
        let start = chunk.dictionary_page.unwrap_or(data_page);
        let (Ok(start), Ok(compressed), Ok(uncompressed)) = (
            u64::try_from(start),
            u64::try_from(compressed),
            u64::try_from(uncompressed),
        ) else {
            return Err(format!(
                "its column chunk at byte {start} declares a negative size"
            ));
        };
        let end = start
            .checked_add(compressed)
            .filter(|&end| self.data.start <= start && end <= self.data.end)
            .ok_or_else(|| {
                format!("its column chunk at byte {start} declares {compressed} bytes outside the file's data")
            })?;
        self.ranges.push(start..end);
        let (mut at, mut unpacked, mut values) = (start, 0u64, 0i64);
        while at < end {
            self.walked += 1;
            if self.walked > MAX_PAGES {
                return Err(format!("it has more than {MAX_PAGES} pages"));
            }
            let page = self
                .page(at, end)
                .map_err(|why| format!("its page header at byte {at} {why}"))?;
            let body = at + page.header;
            // Values take a byte each at least (booleans are never a dictionary's).
            if page
                .dictionary_values
                .is_some_and(|n| n < 0 || n as u64 > page.uncompressed)
            {
                return Err(format!(
                    "its dictionary page at byte {at} declares more values than its bytes hold"
                ));
            }
            let levels = page.levels.iter().flatten();
            if levels.clone().any(|&n| n < 0)
                || levels.map(|&n| n as u64).sum::<u64>() > page.compressed.min(page.uncompressed)
            {
                return Err(format!(
                    "its page at byte {at} declares levels longer than the page"
                ));
            }
            if page.uncompressed > PAGE_LIMIT {
                return Err(format!(
                    "its page at byte {at} declares {} bytes uncompressed; at most {PAGE_LIMIT} \
                     are unpacked",
                    page.uncompressed
                ));
            }
            values = values.saturating_add(page.values.unwrap_or(0));
            if page.values.is_some_and(|n| n < 0) || values > chunk.values.unwrap_or(0) {
                return Err(format!(
                    "the pages of its column chunk at byte {start} declare more values than \
                     the chunk's {}",
                    chunk.values.unwrap_or(0)
                ));
            }
            unpacked += page.uncompressed;
            if unpacked > uncompressed {
                return Err(format!(
                    "the pages of its column chunk at byte {start} declare more than the \
                     chunk's {uncompressed} bytes uncompressed"
                ));
            }
            if page.compressed > end - body {
                return Err(format!(
                    "its page at byte {at} declares {} bytes where its column chunk has {} left",
                    page.compressed,
                    end - body
                ));
            }
            at = body + page.compressed;
        }
        Ok(())
    }

    /// The chunks walked share no byte.
    fn disjoint(&mut self) -> Result<(), String> {
        self.ranges.sort_by_key(|r| r.start);
        match self.ranges.windows(2).find(|w| w[1].start < w[0].end) {
            Some(w) => Err(format!(
                "its column chunks at bytes {} and {} overlap",
                w[0].start, w[1].start
            )),
            None => Ok(()),
        }
    }

    /// The header of the page at `at`, read from at most HEADER_LIMIT bytes and never past the
    /// chunk's `end`: a small read first (real headers are tens of bytes), more while it is cut
    /// short.
    fn page(&mut self, at: u64, end: u64) -> Result<Page, String> {
        let mut want = 256;
        loop {
            let len = want.min(end - at);
            self.header.resize(len as usize, 0);
            self.file
                .seek(SeekFrom::Start(at))
                .and_then(|_| self.file.read_exact(&mut self.header))
                .map_err(|e| e.to_string())?;
            let (mut uncompressed, mut compressed) = (None, None);
            let (mut dictionary_values, mut levels, mut values) = (None, [None, None], None);
            let mut header = Compact {
                bytes: &self.header,
                pos: 0,
            };
            let walked = header.walk(page_header, &mut Vec::new(), &mut |path, value| {
                match (path, value) {
                    ([2], Some(value)) => uncompressed = Some(value),
                    ([3], Some(value)) => compressed = Some(value),
                    // DictionaryPageHeader.num_values
                    ([7, 1], Some(value)) => dictionary_values = Some(value),
                    // DataPageHeaderV2's definition and repetition levels' byte lengths
                    ([8, 5], Some(value)) => levels[0] = Some(value),
                    ([8, 6], Some(value)) => levels[1] = Some(value),
                    // DataPageHeader.num_values, DataPageHeaderV2.num_values
                    ([5, 1] | [8, 1], Some(value)) => values = Some(value),
                    _ => {}
                }
                Ok(())
            });
            match (walked, uncompressed, compressed) {
                (Ok(()), Some(uncompressed), Some(compressed)) => {
                    let (Ok(uncompressed), Ok(compressed)) =
                        (u64::try_from(uncompressed), u64::try_from(compressed))
                    else {
                        return Err("declares a negative size".into());
                    };
                    return Ok(Page {
                        header: header.pos as u64,
                        compressed,
                        uncompressed,
                        dictionary_values,
                        levels,
                        values,
                    });
                }
                (Ok(()), ..) => return Err("lacks its page's sizes".into()),
                // Cut short by this read, not by the chunk or the bound: read more.
                (Err(_), ..) if len == want && want < HEADER_LIMIT => want *= 2,
                (Err(why), ..) => return Err(why),
            }
        }
    }
}

/// How polars reads a field it knows, whatever type the file declares for it.
#[derive(Clone, Copy)]
enum Wire {
    /// An i16, i32 or i64: a zigzag varint.
    Int,
    /// An i8: one byte.
    Byte,
    /// A boolean, held in the field's header.
    Bool,
    Binary,
    Struct(Schema),
    /// A list of integers.
    Ints,
    Binaries,
    Structs(Schema),
}

/// The fields of a struct that polars reads, by id.
type Schema = fn(i64) -> Option<Wire>;

/// Told each integer a walk reads, by its path of field ids, and each struct's end (`None`).
type Seen<'s> = dyn FnMut(&[i64], Option<i64>) -> Result<(), String> + 's;

// The footer as polars-parquet 0.55.2 reads it (src/parquet/handwritten_thrift/
// file_metadata_thrift.rs), page headers as polars-parquet-format 0.1.0 does
// (src/parquet_format.rs). A Thrift union's members are all structs.

fn file_metadata(id: i64) -> Option<Wire> {
    Some(match id {
        1 | 3 => Wire::Int,
        2 => Wire::Structs(schema_element),
        4 => Wire::Structs(row_group),
        5 => Wire::Structs(key_value),
        6 => Wire::Binary,
        7 => Wire::Structs(members), // ColumnOrder
        _ => return None,
    })
}

fn schema_element(id: i64) -> Option<Wire> {
    Some(match id {
        1..=3 | 5..=9 => Wire::Int,
        4 => Wire::Binary,
        10 => Wire::Struct(logical_type),
        _ => return None,
    })
}

fn logical_type(id: i64) -> Option<Wire> {
    Some(Wire::Struct(match id {
        5 => decimal,
        7 | 8 => time,
        10 => integer,
        1..=15 => any,
        _ => return None,
    }))
}

fn decimal(id: i64) -> Option<Wire> {
    matches!(id, 1 | 2).then_some(Wire::Int)
}

fn time(id: i64) -> Option<Wire> {
    Some(match id {
        1 => Wire::Bool,
        2 => Wire::Struct(members), // TimeUnit
        _ => return None,
    })
}

fn integer(id: i64) -> Option<Wire> {
    Some(match id {
        1 => Wire::Byte,
        2 => Wire::Bool,
        _ => return None,
    })
}

fn row_group(id: i64) -> Option<Wire> {
    Some(match id {
        1 => Wire::Structs(column_chunk),
        2 | 3 | 5..=7 => Wire::Int,
        4 => Wire::Structs(sorting_column),
        _ => return None,
    })
}

fn sorting_column(id: i64) -> Option<Wire> {
    Some(match id {
        1 => Wire::Int,
        2 | 3 => Wire::Bool,
        _ => return None,
    })
}

fn column_chunk(id: i64) -> Option<Wire> {
    Some(match id {
        1 => Wire::Binary,
        2 | 4..=7 => Wire::Int,
        3 => Wire::Struct(column_metadata),
        _ => return None,
    })
}

fn column_metadata(id: i64) -> Option<Wire> {
    Some(match id {
        1 | 4..=7 | 9..=11 | 14 | 15 => Wire::Int,
        2 => Wire::Ints,
        3 => Wire::Binaries,
        12 => Wire::Struct(statistics),
        _ => return None,
    })
}

fn statistics(id: i64) -> Option<Wire> {
    Some(match id {
        1 | 2 | 5 | 6 => Wire::Binary,
        3 | 4 => Wire::Int,
        7 | 8 => Wire::Bool,
        _ => return None,
    })
}

fn key_value(id: i64) -> Option<Wire> {
    matches!(id, 1 | 2).then_some(Wire::Binary)
}

fn page_header(id: i64) -> Option<Wire> {
    Some(match id {
        1..=4 => Wire::Int,
        5 => Wire::Struct(data_page_header),
        6 => Wire::Struct(any), // IndexPageHeader
        7 => Wire::Struct(dictionary_page_header),
        8 => Wire::Struct(data_page_header_v2),
        _ => return None,
    })
}

fn data_page_header(id: i64) -> Option<Wire> {
    Some(match id {
        1..=4 => Wire::Int,
        5 => Wire::Struct(statistics),
        _ => return None,
    })
}

fn dictionary_page_header(id: i64) -> Option<Wire> {
    Some(match id {
        1 | 2 => Wire::Int,
        3 => Wire::Bool,
        _ => return None,
    })
}

fn data_page_header_v2(id: i64) -> Option<Wire> {
    Some(match id {
        1..=6 => Wire::Int,
        7 => Wire::Bool,
        8 => Wire::Struct(statistics),
        _ => return None,
    })
}

/// A union of structs (ColumnOrder, TimeUnit).
fn members(_: i64) -> Option<Wire> {
    Some(Wire::Struct(any))
}

/// A struct whose fields polars skips.
fn any(_: i64) -> Option<Wire> {
    None
}

/// A walk over Thrift's compact protocol that checks every length against the bytes left.
struct Compact<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Compact<'_> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "declares {n} bytes where {} are left",
                self.remaining()
            ));
        }
        self.pos += n as usize;
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, String> {
        let byte = *self.bytes.get(self.pos).ok_or("ends early")?;
        self.pos += 1;
        Ok(byte)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("has a varint longer than 10 bytes".into())
    }

    /// Thrift's i16, i32 and i64.
    fn zigzag(&mut self) -> Result<i64, String> {
        let value = self.varint()?;
        Ok((value >> 1) as i64 ^ -((value & 1) as i64))
    }

    /// Walks a struct as polars reads it, by `schema`: `seen` is told each integer polars reads,
    /// by its path of field ids, and the struct's end (`None`).
    fn walk(&mut self, schema: Schema, path: &mut Vec<i64>, seen: &mut Seen) -> Result<(), String> {
        if path.len() > MAX_DEPTH {
            return Err(format!("nests deeper than {MAX_DEPTH} levels"));
        }
        let mut id = 0;
        loop {
            let header = self.byte()?;
            if header == 0 {
                return seen(path.as_slice(), None);
            }
            id = match header >> 4 {
                0 => self.zigzag()?,
                delta => id + i64::from(delta),
            };
            // polars holds a field's id in an i16.
            if !(1..=i64::from(i16::MAX)).contains(&id) {
                return Err(format!("has a field numbered {id}"));
            }
            let kind = header & 0x0f;
            path.push(id);
            match schema(id) {
                None => self.skip_value(kind, path.len())?,
                Some(wire) => self.field(wire, kind, path, seen)?,
            }
            path.pop();
        }
    }

    /// A field polars knows: it must have the type polars reads it as.
    fn field(
        &mut self,
        wire: Wire,
        kind: u8,
        path: &mut Vec<i64>,
        seen: &mut Seen,
    ) -> Result<(), String> {
        let depth = path.len();
        match (wire, kind) {
            (Wire::Int, 4..=6) => {
                let value = self.zigzag()?;
                seen(path.as_slice(), Some(value))
            }
            (Wire::Byte, 3) => self.take(1),
            (Wire::Bool, 1 | 2) => Ok(()),
            (Wire::Binary, 8) => self.skip_value(8, depth),
            (Wire::Struct(schema), 12) => self.walk(schema, path, seen),
            (Wire::Ints | Wire::Binaries | Wire::Structs(_), 9 | 10) => {
                let (n, element) = self.list()?;
                for _ in 0..n {
                    match (wire, element) {
                        (Wire::Ints, 4..=6) | (Wire::Binaries, 8) => {
                            self.skip_value(element, depth)?
                        }
                        (Wire::Structs(schema), 12) => self.walk(schema, path, seen)?,
                        _ => {
                            return Err(format!(
                            "lists type {element} in field {path:?}, which polars reads as another"
                        ))
                        }
                    }
                }
                Ok(())
            }
            _ => Err(format!(
                "has type {kind} in field {path:?}, which polars reads as another"
            )),
        }
    }

    fn skip_struct(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nests deeper than {MAX_DEPTH} levels"));
        }
        loop {
            let header = self.byte()?;
            if header == 0 {
                return Ok(());
            }
            if header >> 4 == 0 {
                self.varint()?; // the field id, in full
            }
            self.skip_value(header & 0x0f, depth)?;
        }
    }

    /// Each element takes at least one byte, so a count above the bytes left is a lie.
    fn elements(&mut self, n: u64) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "declares {n} elements where {} bytes are left",
                self.remaining()
            ));
        }
        Ok(())
    }

    /// A list's (or set's) length, backed by bytes, and its elements' type.
    fn list(&mut self) -> Result<(u64, u8), String> {
        let header = self.byte()?;
        let mut n = u64::from(header >> 4);
        if n == 15 {
            n = self.varint()?;
        }
        self.elements(n)?;
        Ok((n, header & 0x0f))
    }

    fn skip_value(&mut self, kind: u8, depth: usize) -> Result<(), String> {
        match kind {
            1 | 2 => Ok(()), // a boolean field: the value is the type
            3 => self.take(1),
            4..=6 => self.varint().map(drop),
            7 => self.take(8),
            8 => {
                let n = self.varint()?;
                self.take(n)
            }
            9 | 10 => {
                let (n, element) = self.list()?;
                for _ in 0..n {
                    match element {
                        // polars skips a list's booleans as taking no byte, polars-parquet-format
                        // as taking one: bytes that one walk reads as elements, the other read
                        // as fields. No footer or page header holds such a list.
                        1 | 2 => return Err("lists booleans".into()),
                        _ => self.skip_value(element, depth + 1)?,
                    }
                }
                Ok(())
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let types = self.byte()?;
                self.elements(n.saturating_mul(2))?;
                for _ in 0..n {
                    self.skip_value(types >> 4, depth + 1)?;
                    self.skip_value(types & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            12 => self.skip_struct(depth + 1),
            13 => self.take(16), // UUID
            _ => Err(format!("has a value of unknown type {kind}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;
    use std::io::Cursor;

    fn check_bytes(bytes: &[u8]) -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("footer-{}.parquet", uuid::Uuid::new_v4()));
        std::fs::write(&path, bytes).unwrap();
        let checked = check(&path);
        std::fs::remove_file(&path).unwrap();
        checked
    }

    fn parquet(metadata: &[u8], declared: u32) -> Vec<u8> {
        [b"PAR1", metadata, &declared.to_le_bytes(), b"PAR1"].concat()
    }

    fn written() -> Vec<u8> {
        let mut frame = df!("id" => [1i64, 2, 3], "name" => ["a", "b", "c"],
                            "flag" => [true, false, true])
        .unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
        bytes
    }

    /// A file that declares fewer rows than its row groups hold had the rest dropped from an
    /// import that succeeded (the reader stops at the file's count).
    #[test]
    fn a_file_declaring_other_rows_than_its_row_groups_is_refused() {
        let mut frame = df!("x" => (0..1000i64).collect::<Vec<_>>()).unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
        let read = |bytes: &[u8]| {
            let mut reader = ParquetReader::new(Cursor::new(bytes.to_vec()));
            rows(reader.get_metadata().unwrap())
        };
        assert_eq!(read(&bytes), Ok(1000));
        // FileMetaData.num_rows (field 3, an i64: 0x16) comes before the row groups': 1000 is
        // the zigzag varint d0 0f; 500 takes as many bytes, so the footer keeps its length.
        let declared = u32::from_le_bytes(bytes[bytes.len() - 8..][..4].try_into().unwrap());
        let footer = bytes.len() - 8 - declared as usize;
        let at = footer
            + bytes[footer..]
                .windows(3)
                .position(|w| w == [0x16, 0xd0, 0x0f])
                .unwrap();
        let lying = with_varint(&bytes, at + 1, 500);
        assert_eq!(check_bytes(&lying), Ok(()));
        assert_eq!(
            read(&lying),
            Err("it declares 500 rows where its row groups hold 1000".into())
        );
        // An import refuses the file (it read 500 rows and succeeded).
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &lying).unwrap();
        let limits = crate::limits::Limits {
            decompressed: 1 << 30,
            in_memory: 1 << 30,
            record: 1 << 20,
            document: 1 << 20,
        };
        let csv = super::super::source::CsvSettings {
            delimiter: b',',
            quote: b'"',
            header: true,
        };
        let opened = super::super::source::open(
            file.path(),
            shared::datasets::Format::Parquet,
            shared::datasets::Compression::None,
            &csv,
            &[],
            &limits,
        );
        let error = opened.err().expect("refused");
        assert!(error.contains("declares 500 rows"), "{error}");
    }

    #[test]
    fn a_real_file_passes() {
        assert_eq!(check_bytes(&written()), Ok(()));
    }

    #[test]
    fn a_file_of_many_pages_passes() {
        let n = 200_000;
        let mut frame = df!(
            "id" => (0..n as i64).collect::<Vec<_>>(),
            "kind" => (0..n).map(|i| ["a", "b", "c"][i % 3]).collect::<Vec<_>>(),
            "note" => (0..n).map(|i| (i % 7 != 0).then(|| format!("row {i}"))).collect::<Vec<_>>(),
        )
        .unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes)
            .with_row_group_size(Some(50_000))
            .with_data_page_size(Some(4096))
            .finish(&mut frame)
            .unwrap();
        assert_eq!(check_bytes(&bytes), Ok(()));
    }

    #[test]
    fn lying_sizes_are_refused() {
        let huge_list = [0x29, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x07];
        let long_string = [0x68, 0xff, 0xff, 0xff, 0xff, 0x07]; // created_by (6)
        let deep: Vec<u8> = std::iter::once(0xfc)
            .chain(std::iter::repeat_n(0x1c, 99))
            .collect();
        // version (1) declared a string, whose bytes polars reads as field 2: a list of
        // 2^31 - 1 schema elements, reserved before one is read.
        let hidden = [0x18, 0x07, 0x19, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00];
        // An unknown field 8, a list of 8 booleans: polars skips them as no bytes and reads
        // the next as field 2, a list of 2^31 - 1 schema elements.
        let booleans = [
            0x89, 0x82, 0x09, 0x04, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00,
        ];
        for (bytes, why) in [
            (parquet(&huge_list, 7), "declares 2147483647 elements"),
            (parquet(&long_string, 6), "declares 2147483647 bytes"),
            (parquet(&deep, 100), "nests deeper"),
            (parquet(&hidden, 10), "has type 8 in field [1]"),
            (parquet(&booleans, 11), "lists booleans"),
            (parquet(&[0; 4], 0xffff_fff0), "more than the file holds"),
            (b"PAR1nope".to_vec(), "too short"),
        ] {
            let error = check_bytes(&bytes).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }

    /// Where the first column chunk's first page header starts, by the file's metadata.
    fn first_page(bytes: &[u8]) -> usize {
        let mut reader = ParquetReader::new(Cursor::new(bytes));
        let column = &reader.get_metadata().unwrap().row_groups[0].parquet_columns()[0];
        column
            .dictionary_page_offset()
            .unwrap_or(column.data_page_offset()) as usize
    }

    fn varint_end(bytes: &[u8], at: usize) -> usize {
        at + bytes[at..].iter().position(|b| b & 0x80 == 0).unwrap() + 1
    }

    /// `bytes` with the varint at `at` replaced by `value`'s zigzag varint, which may be longer:
    /// the bytes after it shift, the first chunk keeps its offset, and the footer is found from
    /// the file's end.
    fn with_varint(bytes: &[u8], at: usize, value: u32) -> Vec<u8> {
        let mut zigzag = 2 * u64::from(value);
        let mut encoded = Vec::new();
        while zigzag >= 0x80 {
            encoded.push(zigzag as u8 | 0x80);
            zigzag >>= 7;
        }
        encoded.push(zigzag as u8);
        [&bytes[..at], &encoded, &bytes[varint_end(bytes, at)..]].concat()
    }

    /// A file whose first dictionary page declares far more values than its bytes hold:
    /// polars reserved room for all of them before reading one.
    fn dictionary_of_more_values() -> Vec<u8> {
        let mut frame = df!("kind" => ["a", "b", "a", "b"]).unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
        let mut reader = ParquetReader::new(Cursor::new(&bytes));
        let column = &reader.get_metadata().unwrap().row_groups[0].parquet_columns()[0];
        let at = column.dictionary_page_offset().expect("a dictionary page") as usize;
        // 0x15 and the type (DICTIONARY_PAGE, 2), the sizes as in `lying_pages_are_refused`,
        // then the dictionary header (field 7, a struct: 0x4c) and its num_values (0x15).
        assert_eq!(
            (bytes[at], bytes[at + 1], bytes[at + 2]),
            (0x15, 0x04, 0x15)
        );
        let after_sizes = varint_end(&bytes, varint_end(&bytes, at + 3) + 1);
        let header = bytes[after_sizes..]
            .iter()
            .position(|&b| b == 0x4c)
            .unwrap()
            + after_sizes;
        assert_eq!(bytes[header + 1], 0x15);
        with_varint(&bytes, header + 2, 1 << 30)
    }

    /// A file of one row whose one cell is a list of `elements` zeros.
    fn one_list(elements: usize) -> Vec<u8> {
        let list = Series::new("".into(), vec![0i64; elements]);
        let mut frame = df!("x" => [list]).unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
        bytes
    }

    /// A list column's page declaring 2^20 values in a few bytes: polars reserved and filled
    /// levels for every one before reading a row (billions, from a file of kilobytes).
    #[test]
    fn a_page_of_more_values_than_its_chunk_is_refused() {
        let bytes = one_list(1);
        assert_eq!(check_bytes(&bytes), Ok(()));
        let mut reader = ParquetReader::new(Cursor::new(&bytes));
        let column = &reader.get_metadata().unwrap().row_groups[0].parquet_columns()[0];
        let at = column.data_page_offset() as usize;
        // The type and two sizes (as in `lying_pages_are_refused`), then the data page
        // header (field 5 or 8, a struct) and its num_values (field 1, 0x15).
        assert_eq!((bytes[at], bytes[at + 2]), (0x15, 0x15));
        let after_sizes = varint_end(&bytes, varint_end(&bytes, at + 3) + 1);
        let header = bytes[after_sizes..]
            .iter()
            .position(|&b| b == 0x2c || b == 0x5c)
            .unwrap()
            + after_sizes;
        assert_eq!(bytes[header + 1], 0x15);
        let error = check_bytes(&with_varint(&bytes, header + 2, 1 << 20)).unwrap_err();
        assert!(error.contains("more values than the chunk's 1"), "{error}");
    }

    /// One row holding a million list elements decodes to 12 MB at least, whatever the few
    /// bytes its run-length pages take.
    #[test]
    fn a_lists_elements_count_toward_what_it_decodes_to() {
        let bytes = one_list(1_000_000);
        let mut reader = ParquetReader::new(Cursor::new(&bytes));
        let decoded = decoded_bytes(reader.get_metadata().unwrap());
        assert!(decoded >= 12_000_000, "{decoded}");
        assert!(bytes.len() < 1_000_000, "{}", bytes.len());
    }

    #[test]
    fn lying_pages_are_refused() {
        let bytes = written();
        let at = first_page(&bytes);
        // polars writes a page header's first fields in short form: 0x15 (field 1, an i32) and
        // the page's type (one byte), then 0x15 and the uncompressed size, 0x15 and the
        // compressed size, each a zigzag varint.
        assert_eq!((bytes[at], bytes[at + 2]), (0x15, 0x15));
        let uncompressed = at + 3;
        let compressed = varint_end(&bytes, uncompressed) + 1;
        assert_eq!(bytes[compressed - 1], 0x15);
        let mut confused = bytes.clone();
        confused[at + 2] = 0x18; // the uncompressed size declared a string
        for (bytes, why) in [
            (
                with_varint(&bytes, uncompressed, i32::MAX as u32),
                "declares 2147483647 bytes uncompressed",
            ),
            (
                with_varint(&bytes, uncompressed, 200 << 20),
                "more than the chunk's",
            ),
            (
                with_varint(&bytes, compressed, 1 << 30),
                "where its column chunk has",
            ),
            (confused, "has type 8 in field [2]"),
            (
                dictionary_of_more_values(),
                "more values than its bytes hold",
            ),
        ] {
            let error = check_bytes(&bytes).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
