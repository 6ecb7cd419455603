//! The table the synthesizers work on, and its round trip through polars: numbers (integers,
//! floats, dates and times as their physical value) or labels (text, booleans), `None` for
//! a missing value. Each column keeps its polars type so the output has the input's types.

use polars::{io::mmap::MmapBytesReader, prelude::*};
use rand::{rngs::StdRng, seq::SliceRandom};
use std::{collections::HashMap, io::Cursor, path::Path};

use shared::datasets::{Compression, Format};

use crate::{
    import::source::open_decompressed,
    limits::{read_capped, Cap, CapExceeded},
};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Values {
    Numbers(Vec<Option<f64>>),
    Labels(Vec<Option<String>>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::Numbers(v) => v.len(),
            Values::Labels(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the longest label (none for numbers): what a row that draws it copies.
    pub fn longest_label(&self) -> u64 {
        match self {
            Values::Numbers(_) => 0,
            Values::Labels(v) => v
                .iter()
                .flatten()
                .map(|l| l.len() as u64)
                .max()
                .unwrap_or(0),
        }
    }

    pub fn missing(&self) -> usize {
        match self {
            Values::Numbers(v) => v.iter().filter(|x| x.is_none()).count(),
            Values::Labels(v) => v.iter().filter(|x| x.is_none()).count(),
        }
    }

    /// Each row's level index, and the levels (missing included) from most to least
    /// frequent, ties in order of first appearance: the dictionary a categorical learns.
    pub fn dictionary(&self) -> (Vec<usize>, Values) {
        let keys: Vec<Option<String>> = match self {
            Values::Numbers(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
            Values::Labels(v) => v.clone(),
        };
        let mut first: HashMap<&Option<String>, (usize, usize)> = HashMap::new();
        for (row, key) in keys.iter().enumerate() {
            first.entry(key).or_insert((row, 0)).1 += 1;
        }
        let mut order: Vec<(usize, usize)> = first.values().copied().collect();
        order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let representatives: Vec<usize> = order.iter().map(|(row, _)| *row).collect();
        let index: HashMap<&Option<String>, usize> = representatives
            .iter()
            .enumerate()
            .map(|(level, &row)| (&keys[row], level))
            .collect();
        let codes = keys.iter().map(|key| index[key]).collect();
        (codes, self.take(&representatives))
    }

    pub fn take(&self, rows: &[usize]) -> Values {
        match self {
            Values::Numbers(v) => Values::Numbers(rows.iter().map(|&i| v[i]).collect()),
            Values::Labels(v) => Values::Labels(rows.iter().map(|&i| v[i].clone()).collect()),
        }
    }

    /// Adds `more` (of the same kind) at the end.
    pub fn append(&mut self, more: Values) {
        match (self, more) {
            (Values::Numbers(v), Values::Numbers(more)) => v.extend(more),
            (Values::Labels(v), Values::Labels(more)) => v.extend(more),
            _ => unreachable!("one column's values are of one kind"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub dtype: DataType,
    pub values: Values,
}

impl Column {
    pub fn numbers(name: &str, dtype: DataType, values: Vec<Option<f64>>) -> Self {
        Self {
            name: name.to_owned(),
            dtype,
            values: Values::Numbers(values),
        }
    }

    pub fn labels(name: &str, values: Vec<Option<String>>) -> Self {
        Self {
            name: name.to_owned(),
            dtype: DataType::String,
            values: Values::Labels(values),
        }
    }

    /// Whole numbers only (integers, dates, times): generated values are rounded.
    pub fn is_integral(&self) -> bool {
        self.dtype.is_integer() || self.dtype.is_temporal()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Table {
    pub columns: Vec<Column>,
}

impl Table {
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, |c| c.values.len())
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn take(&self, rows: &[usize]) -> Table {
        Table {
            columns: self
                .columns
                .iter()
                .map(|c| Column {
                    values: c.values.take(rows),
                    ..c.clone()
                })
                .collect(),
        }
    }

    /// A seeded split into (train, holdout) with `holdout_fraction` of the rows held out
    /// (at least one row on each side when there are two or more).
    pub fn split(&self, holdout_fraction: f64, rng: &mut StdRng) -> (Table, Table) {
        let n = self.rows();
        let mut rows: Vec<usize> = (0..n).collect();
        rows.shuffle(rng);
        let holdout = if n >= 2 {
            ((n as f64 * holdout_fraction).round() as usize).clamp(1, n - 1)
        } else {
            0
        };
        let (held, kept) = rows.split_at(holdout);
        let (mut kept, mut held) = (kept.to_vec(), held.to_vec());
        kept.sort_unstable();
        held.sort_unstable();
        (self.take(&kept), self.take(&held))
    }
}

/// Reads a dataset file of the given format into a table, holding at most `cap`'s bytes of
/// decompressed text (or, for Parquet, what its metadata says its data takes).
pub fn read(
    path: &Path,
    format: Format,
    compression: Compression,
    cap: Cap,
) -> PolarsResult<Table> {
    let frame = match format {
        Format::Document => {
            return Err(PolarsError::ComputeError("a document, not a table".into()))
        }
        Format::Parquet => {
            // A dataset's file as any other tenant file: checked before polars reads it.
            crate::import::parquet_footer::check(path).map_err(|why| {
                PolarsError::ComputeError(format!("not a readable Parquet file: {why}").into())
            })?;
            let mut reader = ParquetReader::new(std::fs::File::open(path)?);
            let decoded = crate::import::parquet_footer::decoded_bytes(reader.get_metadata()?);
            // The whole frame at once, 16 bytes a cell at least (a text's view).
            let rows = crate::import::parquet_footer::rows(reader.get_metadata()?)
                .map_err(|why| PolarsError::ComputeError(why.into()))?;
            let cells = (rows as u64).saturating_mul(reader.schema()?.len() as u64);
            if decoded.max(cells.saturating_mul(NUMBER_BYTES)) > cap.bytes {
                return Err(PolarsError::ComputeError(cap.exceeded().to_string().into()));
            }
            reader.finish()?
        }
        _ => {
            let bytes = open_decompressed(path, compression)
                .and_then(|reader| read_capped(reader, cap))
                .map_err(|e| match CapExceeded::in_io(&e) {
                    Some(cap) => PolarsError::ComputeError(cap.to_string().into()),
                    None => e.into(),
                })?;
            if cells(&bytes, format)?.saturating_mul(NUMBER_BYTES) > cap.bytes {
                return Err(PolarsError::ComputeError(cap.exceeded().to_string().into()));
            }
            read_text(Cursor::new(bytes), format)?
        }
    };
    from_frame(&frame, cap)
}

/// How many cells polars makes of the text, at most: each takes it 16 bytes or so whatever its
/// text (an empty cell is a null's view), so a MB of `,` lines was GBs of frame before
/// [`from_frame`] counted it. An upper bound, not polars' own reading (a quote the csv crate
/// and polars read apart, or a blank line, which polars makes a row of nulls, would undercount
/// it): CSV and TSV rows are line ends, quoted or not, and columns the larger of the first
/// line's separators and the first record's fields. NDJSON: its lines, each with every leaf
/// field polars infers from the first 100 (a nested object's fields each a cell); a list field
/// is refused, since each element is a value of its own and synthesis learns none of them.
fn cells(text: &[u8], format: Format) -> PolarsResult<u64> {
    let rows = text.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    if format == Format::Ndjson {
        fn leaves(name: &str, dtype: &DataType) -> PolarsResult<u64> {
            match dtype {
                DataType::Struct(fields) => fields
                    .iter()
                    .map(|f| leaves(f.name(), f.dtype()))
                    .sum::<PolarsResult<u64>>()
                    .map(|n| n.max(1)),
                DataType::List(_) => Err(PolarsError::ComputeError(
                    format!("the field {name:?} holds lists; synthesis learns numbers and labels")
                        .into(),
                )),
                _ => Ok(1),
            }
        }
        let mut cursor = Cursor::new(text);
        let schema =
            polars::io::ndjson::infer_schema(&mut cursor, std::num::NonZeroUsize::new(100))?;
        let columns = schema
            .iter()
            .map(|(name, dtype)| leaves(name, dtype))
            .sum::<PolarsResult<u64>>()?;
        return Ok(rows.saturating_mul(columns.max(1)));
    }
    let separator = if format == Format::Tsv { b'\t' } else { b',' };
    let first_line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let in_first_line = first_line.iter().filter(|&&b| b == separator).count() as u64 + 1;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(separator)
        // A header is read from its first MiB: an unterminated quote is the rest of the file.
        .from_reader(&text[..text.len().min(1 << 20)]);
    let mut header = csv::ByteRecord::new();
    let in_first_record = match reader.read_byte_record(&mut header) {
        Ok(true) => header.len() as u64,
        _ => 0,
    };
    Ok(rows.saturating_mul(in_first_line.max(in_first_record)))
}

fn read_text<R: MmapBytesReader>(reader: R, format: Format) -> PolarsResult<DataFrame> {
    match format {
        Format::Ndjson => JsonReader::new(reader)
            .with_json_format(JsonFormat::JsonLines)
            .finish(),
        _ => {
            let separator = if format == Format::Tsv { b'\t' } else { b',' };
            CsvReadOptions::default()
                .with_has_header(true)
                .with_infer_schema_length(Some(10_000))
                .with_parse_options(
                    CsvParseOptions::default()
                        .with_separator(separator)
                        .with_try_parse_dates(true),
                )
                .into_reader_with_file_handle(reader)
                .finish()
        }
    }
}

/// What a table holds for a number (an `Option<f64>`), and for a label beside its text (an
/// `Option<String>`).
const NUMBER_BYTES: u64 = 16;
const LABEL_BYTES: u64 = 24;

/// Every column as numbers or labels; types polars has no number for are read as text. What the
/// table holds is counted against `cap` before each column is copied: polars shares one text
/// among the rows of a dictionary-encoded Parquet column, and a label is a copy a row (a 512 KiB
/// value in a million rows of a file of a few KB was 512 GiB), as a short cell of text is 24
/// bytes more than its text.
pub fn from_frame(frame: &DataFrame, cap: Cap) -> PolarsResult<Table> {
    let mut columns = Vec::with_capacity(frame.width());
    let mut held = 0u64;
    let mut hold = |bytes: u64| {
        held = held.saturating_add(bytes);
        match held > cap.bytes {
            true => Err(PolarsError::ComputeError(cap.exceeded().to_string().into())),
            false => Ok(()),
        }
    };
    for column in frame.columns() {
        let series = column.as_materialized_series();
        let name = series.name().as_str();
        let dtype = series.dtype().clone();
        let rows = series.len() as u64;
        columns.push(if dtype.is_decimal() {
            hold(rows * NUMBER_BYTES)?;
            // Learnt and written as a double (its physical form is the unscaled integer).
            let values = series.cast(&DataType::Float64)?;
            let values = values.f64()?.iter();
            Column::numbers(name, DataType::Float64, values.collect())
        } else if dtype.is_primitive_numeric() || dtype.is_temporal() {
            hold(rows * NUMBER_BYTES)?;
            let physical = series.to_physical_repr().cast(&DataType::Float64)?;
            // NaN and ±inf are no amounts to learn: missing, as an empty cell is (a NaN never
            // equals itself, and a model of infinities cannot be saved).
            let values = physical.f64()?.iter();
            Column::numbers(
                name,
                dtype,
                values.map(|v| v.filter(|v| v.is_finite())).collect(),
            )
        } else if dtype == DataType::Boolean {
            hold(rows * (LABEL_BYTES + 5))?;
            let values = series.bool()?.iter();
            Column {
                dtype,
                ..Column::labels(name, values.map(|v| v.map(|b| b.to_string())).collect())
            }
        } else {
            let text = series.cast(&DataType::String)?;
            let texts = text.str()?.iter().map(|v| v.map_or(0, |v| v.len() as u64));
            hold(rows * LABEL_BYTES + texts.sum::<u64>())?;
            let values = text.str()?.iter();
            Column::labels(name, values.map(|v| v.map(str::to_owned)).collect())
        });
    }
    Ok(Table { columns })
}

/// The table as a polars frame with each column's original type.
pub fn to_frame(table: &Table) -> PolarsResult<DataFrame> {
    let mut columns = Vec::with_capacity(table.columns.len());
    for column in &table.columns {
        let name = PlSmallStr::from(column.name.as_str());
        let series = match &column.values {
            Values::Numbers(values) => {
                let floats = Series::new(name, values);
                match &column.dtype {
                    DataType::Float64 => floats,
                    dtype if dtype.is_temporal() => {
                        let physical = dtype.to_physical();
                        floats.cast(&physical)?.cast(dtype)?
                    }
                    dtype => floats.cast(dtype)?,
                }
            }
            Values::Labels(values) => {
                let text = Series::new(name, values);
                if column.dtype == DataType::Boolean {
                    text.str()?
                        .iter()
                        .map(|v| v.map(|s| s == "true"))
                        .collect::<BooleanChunked>()
                        .into_series()
                        .with_name(column.name.as_str().into())
                } else if column.dtype.is_integer() {
                    // Identifiers too large for a float to count (see `fresh_identifiers`).
                    text.strict_cast(&column.dtype)?
                } else {
                    text
                }
            }
        };
        columns.push(series.into_column());
    }
    DataFrame::new(table.rows(), columns)
}

/// Writes the table as CSV or Parquet.
pub fn write(table: &Table, path: &Path, parquet: bool) -> PolarsResult<()> {
    let mut frame = to_frame(table)?;
    let file = std::fs::File::create(path)?;
    if parquet {
        ParquetWriter::new(file).finish(&mut frame)?;
    } else {
        CsvWriter::new(file)
            .include_header(true)
            .finish(&mut frame)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cells counted before polars parses: rows by line ends, columns by the header or by the
    /// leaf fields polars infers for NDJSON (a nested object's fields each a cell of every row).
    #[test]
    fn cells_are_counted_from_the_text() {
        // Every line end a row: polars makes a blank line a row of nulls.
        assert_eq!(cells(b"a,b\n,\n,\n", Format::Csv).unwrap(), 8);
        assert_eq!(cells(b"a,b,c\n\n\n\n", Format::Csv).unwrap(), 15);
        assert_eq!(cells(b"a\tb\tc\n1\t2\t3", Format::Tsv).unwrap(), 6);
        // A quoted line end in the header hides fields from its first line: the record's
        // fields count.
        let header = b"\"x\n\",a,b,c\n1,2,3,4";
        assert_eq!(cells(header, Format::Csv).unwrap(), 12);
        let ndjson = b"{\"a\": {\"x\": 1, \"y\": 2}, \"b\": 1}\n{}\n";
        assert_eq!(cells(ndjson, Format::Ndjson).unwrap(), 9);
        let lists = cells(b"{\"tags\": [0, 0, 0]}\n", Format::Ndjson).unwrap_err();
        assert!(
            lists.to_string().contains("\"tags\" holds lists"),
            "{lists}"
        );
    }
    use rand::SeedableRng;

    const CAP: Cap = Cap::new(1 << 20, "CONVEYOR_MAX_IN_MEMORY_BYTES", "the dataset");

    /// A decimal column (what pandas and database exports write for money) is learnt as the
    /// amounts it holds: its physical form is the unscaled integer.
    #[test]
    fn decimals_are_learnt_as_their_amounts() {
        let price = Series::new("price".into(), [Some(1.25), Some(-2.5), None])
            .cast(&DataType::Decimal(10, 2))
            .unwrap();
        let frame = DataFrame::new(3, vec![price.into()]).unwrap();
        let table = from_frame(&frame, CAP).unwrap();
        let column = table.column("price").unwrap();
        assert_eq!(column.dtype, DataType::Float64);
        let Values::Numbers(values) = &column.values else {
            panic!("learnt as labels");
        };
        assert_eq!(values, &[Some(1.25), Some(-2.5), None]);
    }

    #[test]
    fn a_file_inflating_past_the_cap_is_refused_at_the_cap() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("bomb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bomb.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::best(),
        );
        gz.write_all(b"a,b\n").unwrap();
        for _ in 0..64 {
            gz.write_all(&[b'1'; 64 << 10]).unwrap();
        }
        gz.finish().unwrap();
        let error = read(&path, Format::Csv, Compression::Gzip, CAP).unwrap_err();
        assert!(
            error.to_string().contains(
                "the dataset is larger than the 1 MiB cap (CONVEYOR_MAX_IN_MEMORY_BYTES)"
            ),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A Parquet column of one 1 KiB text in 4,096 rows, dictionary-encoded: its metadata
    /// declares a few KiB, polars holds the text once, and the table held it once a row
    /// (4 MiB past a 1 MiB cap; a 512 KiB value in a million rows was 512 GiB).
    #[test]
    fn a_text_repeated_through_a_dictionary_is_counted_once_a_row() {
        let dir = std::env::temp_dir().join(format!("dictionary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("repeated.parquet");
        let text = "t".repeat(1 << 10);
        let label = Column::labels("label", vec![Some(text); 4096]);
        write(
            &Table {
                columns: vec![label],
            },
            &path,
            true,
        )
        .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < 64 << 10);
        let Err(error) = read(&path, Format::Parquet, Compression::None, CAP) else {
            panic!("4 MiB of labels read under a 1 MiB cap");
        };
        assert!(
            error.to_string().contains("larger than the 1 MiB cap"),
            "{error}"
        );
        let roomy = CAP.with_bytes(8 << 20);
        let table = read(&path, Format::Parquet, Compression::None, roomy).unwrap();
        assert_eq!(table.rows(), 4096);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn sample_csv() -> &'static str {
        "id,age,score,city,member,joined,seen\n\
         a1,31,0.5,Oslo,true,2020-01-02,2021-03-04 05:06:07\n\
         a2,,1.25,Rome,false,2021-06-30,2022-01-01 00:00:00\n\
         a3,45,,,true,,2023-12-31 23:59:59\n"
    }

    #[test]
    fn csv_round_trips_through_the_table_with_its_types() {
        let dir = std::env::temp_dir().join(format!("synth-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.csv");
        std::fs::write(&input, sample_csv()).unwrap();
        let table = read(&input, Format::Csv, Compression::None, CAP).unwrap();
        assert_eq!(table.rows(), 3);
        let age = table.column("age").unwrap();
        assert!(age.dtype.is_integer());
        assert_eq!(
            age.values,
            Values::Numbers(vec![Some(31.0), None, Some(45.0)])
        );
        assert_eq!(table.column("joined").unwrap().dtype, DataType::Date);
        assert!(matches!(
            table.column("seen").unwrap().dtype,
            DataType::Datetime(_, _)
        ));
        assert_eq!(table.column("member").unwrap().dtype, DataType::Boolean);
        assert_eq!(
            table.column("city").unwrap().values,
            Values::Labels(vec![Some("Oslo".into()), Some("Rome".into()), None])
        );

        for parquet in [false, true] {
            let output = dir.join(if parquet { "out.parquet" } else { "out.csv" });
            write(&table, &output, parquet).unwrap();
            let format = if parquet {
                Format::Parquet
            } else {
                Format::Csv
            };
            let back = read(&output, format, Compression::None, CAP).unwrap();
            for (a, b) in table.columns.iter().zip(&back.columns) {
                assert_eq!(a.name, b.name);
                assert_eq!(a.dtype, b.dtype, "{}", a.name);
                assert_eq!(a.values, b.values, "{}", a.name);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dictionary_orders_levels_by_frequency() {
        let values = Values::Labels(
            ["b", "a", "a", "c", "b", "a"]
                .iter()
                .map(|s| Some(s.to_string()))
                .chain([None])
                .collect(),
        );
        let (codes, levels) = values.dictionary();
        assert_eq!(codes, [1, 0, 0, 2, 1, 0, 3]);
        assert_eq!(
            levels,
            Values::Labels(vec![
                Some("a".into()),
                Some("b".into()),
                Some("c".into()),
                None
            ])
        );
        let (codes, levels) = Values::Numbers(vec![Some(2.0), None, Some(2.0)]).dictionary();
        assert_eq!(codes, [0, 1, 0]);
        assert_eq!(levels, Values::Numbers(vec![Some(2.0), None]));
    }

    #[test]
    fn split_is_seeded_and_keeps_every_row_once() {
        let table = Table {
            columns: vec![Column::numbers(
                "x",
                DataType::Float64,
                (0..100).map(|i| Some(i as f64)).collect(),
            )],
        };
        let (train, holdout) = table.split(0.2, &mut StdRng::seed_from_u64(1));
        assert_eq!((train.rows(), holdout.rows()), (80, 20));
        let (again, _) = table.split(0.2, &mut StdRng::seed_from_u64(1));
        assert_eq!(train.columns[0].values, again.columns[0].values);
        let Values::Numbers(mut all) = train.columns[0].values.clone() else {
            unreachable!()
        };
        let Values::Numbers(held) = &holdout.columns[0].values else {
            unreachable!()
        };
        all.extend(held);
        all.sort_by(|a, b| a.unwrap().total_cmp(&b.unwrap()));
        assert_eq!(all, (0..100).map(|i| Some(i as f64)).collect::<Vec<_>>());
    }
}
