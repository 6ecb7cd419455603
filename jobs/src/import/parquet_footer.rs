//! A Parquet file's footer checked before polars reads it: polars trusts the sizes the file
//! declares (it reads a footer of the declared length, and reserves a list's declared length
//! before reading its elements), so a few hostile bytes could make the process reserve
//! hundreds of GB and abort. Here the footer must fit a bound and every count in it must be
//! backed by bytes, walked without allocating.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

/// The largest footer (file metadata) read; real files' footers are kilobytes to a few MB.
pub const FOOTER_LIMIT: u64 = 16 << 20;

/// Thrift structs nest a few levels in Parquet metadata; a deeper file is hostile.
const MAX_DEPTH: usize = 32;

/// Whether the footer of the Parquet file at `path` is safe to hand to polars; why not.
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
    Compact {
        bytes: &metadata,
        pos: 0,
    }
    .skip_struct(0)
    .map_err(|why| format!("its metadata {why}"))
}

/// What the file's data takes once decoded, by its metadata: each row group's declared size,
/// and at least 8 bytes a value, since a column of repeats or nulls encodes to nothing.
pub fn decoded_bytes(metadata: &polars::prelude::FileMetadata) -> u64 {
    let columns = metadata.schema().columns().len() as u64;
    metadata
        .row_groups
        .iter()
        .map(|g| {
            let values = (g.num_rows() as u64).saturating_mul(columns);
            (g.total_byte_size() as u64).max(values.saturating_mul(8))
        })
        .fold(0, u64::saturating_add)
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
                let header = self.byte()?;
                let mut n = u64::from(header >> 4);
                if n == 15 {
                    n = self.varint()?;
                }
                self.elements(n)?;
                let element = header & 0x0f;
                for _ in 0..n {
                    match element {
                        1 | 2 => self.take(1)?, // booleans in a list take a byte each
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

    #[test]
    fn a_real_file_passes() {
        let mut frame = df!("id" => [1i64, 2, 3], "name" => ["a", "b", "c"],
                            "flag" => [true, false, true])
        .unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
        assert_eq!(check_bytes(&bytes), Ok(()));
    }

    #[test]
    fn lying_sizes_are_refused() {
        let huge_list = [0x29, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x07];
        let long_string = [0x28, 0xff, 0xff, 0xff, 0xff, 0x07];
        let deep: Vec<u8> = std::iter::repeat_n(0x1c, 100).collect();
        for (bytes, why) in [
            (parquet(&huge_list, 7), "declares 2147483647 elements"),
            (parquet(&long_string, 6), "declares 2147483647 bytes"),
            (parquet(&deep, 100), "nests deeper"),
            (parquet(&[0; 4], 0xffff_fff0), "more than the file holds"),
            (b"PAR1nope".to_vec(), "too short"),
        ] {
            let error = check_bytes(&bytes).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
