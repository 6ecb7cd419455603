//! Text out of documents: plain text and Markdown as they are, HTML without its tags, and
//! records (JSON, NDJSON, CSV, TSV) with one document per record.

use contracts::ingest::{MAX_ID_LEN, MAX_METADATA_BYTES};
use serde::{
    de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor},
    Deserialize,
};
use serde_json::{value::RawValue, Map, Value};
use std::{borrow::Cow, fmt};

pub use contracts::ingest::DocFormat;

/// One document found in a source.
#[derive(Clone, Debug, PartialEq)]
pub struct Extracted {
    /// `None`: the source's own id (a single-document source).
    pub id: Option<String>,
    pub text: String,
    /// The record's other scalar fields.
    pub fields: Map<String, Value>,
}

/// Where records keep their text and id, and how much text one may hold.
pub struct RecordFields<'a> {
    pub text: &'a str,
    pub id: Option<&'a str>,
    /// `CONVEYOR_MAX_RECORD_BYTES`: CSV and NDJSON are read a record at a time under it, a JSON
    /// array whole, so its records' texts are held to it here.
    pub max_text: usize,
}

/// The documents in `bytes`. Records get the id in `fields.id`, else their 1-based number. At
/// most `max_records` of them: a record costs memory beyond its bytes (its map, its document),
/// so a file of tiny records is refused as it is read, before it takes that memory.
pub fn extract(
    bytes: &[u8],
    format: DocFormat,
    fields: &RecordFields<'_>,
    max_records: usize,
) -> Result<Vec<Extracted>, String> {
    let utf8 = || std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"));
    let too_many = || {
        format!(
            "holds more than {max_records} records, the most this job may still hold in memory \
             (CONVEYOR_MAX_IN_MEMORY_BYTES)"
        )
    };
    let counted = |number: usize| {
        if number > max_records {
            Err(too_many())
        } else {
            Ok(())
        }
    };
    Ok(match format {
        DocFormat::Text | DocFormat::Markdown | DocFormat::Html | DocFormat::Pdf => {
            vec![Extracted {
                id: None,
                text: document_text(bytes, format)?,
                fields: Map::new(),
            }]
        }
        DocFormat::Json => {
            let mut json = serde_json::Deserializer::from_slice(bytes);
            let records = Records {
                max: max_records,
                fields,
            }
            .deserialize(&mut json)
            .and_then(|records| json.end().map(|()| records))
            .map_err(
                |e| match e.is_data() && e.to_string().starts_with(TOO_MANY) {
                    true => too_many(),
                    false => format!("invalid JSON: {e}"),
                },
            )?;
            records
                .into_iter()
                .enumerate()
                .map(|(i, record)| from_record(record, i + 1, fields))
                .collect::<Result<_, _>>()?
        }
        DocFormat::Ndjson => utf8()?
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .enumerate()
            .map(|(n, (i, line))| {
                counted(n + 1)?;
                let mut json = serde_json::Deserializer::from_str(line);
                let record = RecordSeed(fields)
                    .deserialize(&mut json)
                    .and_then(|record| json.end().map(|()| record))
                    .map_err(|e| format!("line {}: invalid JSON: {e}", i + 1))?;
                from_record(record, i + 1, fields)
            })
            .collect::<Result<_, _>>()?,
        DocFormat::Csv | DocFormat::Tsv => {
            let delimiter = if format == DocFormat::Tsv {
                b'\t'
            } else {
                b','
            };
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(delimiter)
                .from_reader(bytes);
            let headers = reader.headers().map_err(|e| e.to_string())?.clone();
            let mut out = Vec::new();
            for (i, row) in reader.records().enumerate() {
                counted(i + 1)?;
                let row = row.map_err(|e| format!("row {}: {e}", i + 1))?;
                let record = headers
                    .iter()
                    .zip(row.iter())
                    .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
                    .collect();
                out.push(from_record(Record::of(record), i + 1, fields)?);
            }
            out
        }
    })
}

/// How [`Records`] says it stopped at its bound (told apart from a syntax error).
const TOO_MANY: &str = "too many records";

/// A JSON file's records: one object, or an array of at most `max` objects, counted as each
/// is parsed.
struct Records<'a> {
    max: usize,
    fields: &'a RecordFields<'a>,
}

impl<'de> DeserializeSeed<'de> for Records<'_> {
    type Value = Vec<Record>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Records<'_> {
    type Value = Vec<Record>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or an array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut records = Vec::new();
        while let Some(record) = seq.next_element_seed(RecordSeed(self.fields))? {
            if records.len() == self.max {
                return Err(de::Error::custom(TOO_MANY));
            }
            records.push(record);
        }
        Ok(records)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(vec![RecordSeed(self.fields).visit_map(map)?])
    }
}

/// A record as ingest keeps it: its text and id as written, and its other fields that are
/// neither null nor nested; the rest is skipped as it is read (a record of a 1 GiB array of
/// zeros took 32 GiB as a `Value`), and fields past a document's metadata bound are counted,
/// not kept.
struct Record {
    fields: Map<String, Value>,
    /// The other fields' bytes as JSON, when they were counted as read.
    metadata_bytes: Option<usize>,
}

impl Record {
    fn of(fields: Map<String, Value>) -> Self {
        Self {
            fields,
            metadata_bytes: None,
        }
    }
}

/// Reads one object as a [`Record`].
struct RecordSeed<'a>(&'a RecordFields<'a>);

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = Record;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        // As `{}` and a comma between two fields.
        let mut metadata_bytes = 2;
        while let Some(key) = map.next_key::<String>()? {
            if key == self.0.text || Some(key.as_str()) == self.0.id {
                // A string's text; a number's or a boolean's as serde_json writes it (an id
                // read again must be the same: `1.50` is `1.5`); an array's or an object's JSON
                // as written, not built.
                let raw: &RawValue = map.next_value()?;
                let value = match raw.get() {
                    "null" => Value::Null,
                    text if text.starts_with(['[', '{']) => Value::String(text.to_owned()),
                    text => match serde_json::from_str(text).map_err(de::Error::custom)? {
                        Value::String(text) => Value::String(text),
                        scalar => Value::String(scalar.to_string()),
                    },
                };
                fields.insert(key, value);
                continue;
            }
            let Some(value) = map.next_value::<Scalar>()?.0 else {
                continue;
            };
            let json = |v: &Value| serde_json::to_string(v).map_or(0, |j| j.len());
            let comma = usize::from(metadata_bytes > 2);
            metadata_bytes += comma + json(&Value::String(key.clone())) + 1 + json(&value);
            if metadata_bytes <= MAX_METADATA_BYTES {
                fields.insert(key, value);
            }
        }
        Ok(Record {
            fields,
            metadata_bytes: Some(metadata_bytes),
        })
    }
}

/// A field's value when it is a string, a number or a boolean; `None` for a null or a nested
/// value, which is skipped without being built.
struct Scalar(Option<Value>);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar(Some(Value::Bool(v))))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(Some(v.into())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(Some(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar(serde_json::Number::from_f64(v).map(Value::Number)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(Some(Value::String(v.to_owned()))))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
        Ok(Scalar(Some(Value::String(v))))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Scalar(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Scalar(None))
    }
}

/// The text of a single-document format (text, Markdown, HTML, PDF).
pub fn document_text(bytes: &[u8], format: DocFormat) -> Result<String, String> {
    let utf8 = || std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"));
    match format {
        DocFormat::Text | DocFormat::Markdown => Ok(utf8()?.to_owned()),
        DocFormat::Html => Ok(html_to_text(utf8()?)),
        DocFormat::Pdf => pdf_to_text(bytes),
        records => Err(format!(
            "{} holds records, not one document",
            records.name()
        )),
    }
}

fn from_record(
    record: Record,
    number: usize,
    names: &RecordFields<'_>,
) -> Result<Extracted, String> {
    let Record {
        fields: mut record,
        metadata_bytes,
    } = record;
    let text = match record.remove(names.text) {
        Some(Value::String(text)) => text,
        Some(Value::Null) | None => {
            return Err(format!("record {number} has no {:?} field", names.text))
        }
        Some(other) => other.to_string(),
    };
    if text.len() > names.max_text {
        return Err(format!(
            "record {number}'s {:?} is {} bytes, more than the {} a record may hold \
             (CONVEYOR_MAX_RECORD_BYTES)",
            names.text,
            text.len(),
            names.max_text
        ));
    }
    let id = match names.id {
        Some(field) => match record.remove(field) {
            Some(Value::String(id)) => id,
            Some(Value::Null) | None => {
                return Err(format!("record {number} has no {field:?} field"))
            }
            Some(other) => other.to_string(),
        },
        None => number.to_string(),
    };
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "record {number}'s id is {} bytes; at most {MAX_ID_LEN}",
            id.len()
        ));
    }
    record.retain(|_, v| !(v.is_object() || v.is_array() || v.is_null()));
    // The record's other fields are its document's metadata, copied into each of its chunks:
    // held to what a source's metadata may be.
    let metadata = metadata_bytes
        .unwrap_or_else(|| serde_json::to_string(&record).map_or(0, |json| json.len()));
    if metadata > MAX_METADATA_BYTES {
        return Err(format!(
            "record {number}'s other fields take {metadata} bytes as JSON, more than the \
             {MAX_METADATA_BYTES} a document's metadata may"
        ));
    }
    Ok(Extracted {
        id: Some(id),
        text,
        fields: record,
    })
}

/// The text of an HTML document: tags dropped (block elements become line breaks), scripts,
/// styles and comments skipped, character references decoded.
pub fn html_to_text(html: &str) -> String {
    const BLOCKS: &[&str] = &[
        "p",
        "div",
        "br",
        "li",
        "ul",
        "ol",
        "tr",
        "table",
        "section",
        "article",
        "header",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "hr",
        "title",
    ];
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    // Line breaks in the source are spaces; only block elements break lines.
    let push_text = |out: &mut String, text: &str| {
        out.push_str(&decode_entities(text).replace(['\n', '\r'], " "))
    };
    while let Some(open) = rest.find('<') {
        push_text(&mut out, &rest[..open]);
        rest = &rest[open..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        let Some(close) = rest.find('>') else {
            rest = "";
            break;
        };
        let tag = rest[1..close].trim_start_matches('/').trim();
        let name = tag
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        rest = &rest[close + 1..];
        if matches!(name.as_str(), "script" | "style") && !rest.is_empty() {
            let closing = format!("</{name}");
            rest = find_ignore_case(rest, &closing)
                .and_then(|at| rest[at..].find('>').map(|end| &rest[at + end + 1..]))
                .unwrap_or("");
        } else if BLOCKS.contains(&name.as_str()) {
            out.push('\n');
        } else if matches!(name.as_str(), "td" | "th" | "img" | "input" | "option") {
            out.push(' ');
        }
    }
    push_text(&mut out, rest);
    // Runs of blank space left by the markup collapse; paragraph breaks stay.
    let lines: Vec<String> = out
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let mut text = String::new();
    let mut blank = false;
    for line in lines {
        if line.is_empty() {
            blank = !text.is_empty();
        } else {
            if !text.is_empty() {
                text.push_str(if blank { "\n\n" } else { "\n" });
            }
            text.push_str(&line);
            blank = false;
        }
    }
    text
}

/// Where `needle` (ASCII) first occurs in `haystack`, ignoring ASCII case. It scans only up to
/// the match, which the caller then skips: stripping stays linear however many scripts.
fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    let needle = needle.as_bytes();
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|window| window.eq_ignore_ascii_case(needle))
}

/// Every character reference the HTML standard names, and numeric ones (html-escape). Two
/// names stand for more bytes than they take (`&nGt;`, `&nLt;`: a character and a combining
/// overlay); a run of text that would grow stays as written, so the text is never longer than
/// the page.
fn decode_entities(text: &str) -> Cow<'_, str> {
    let decoded = html_escape::decode_html_entities(text);
    if decoded.len() > text.len() {
        Cow::Borrowed(text)
    } else {
        decoded
    }
}

/// The text of a PDF's pages, page after page. The parser is not ours and may panic on a
/// malformed file: that is a bad document, not a crashed worker.
fn pdf_to_text(bytes: &[u8]) -> Result<String, String> {
    match std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes)) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(format!("unreadable PDF: {e}")),
        Err(_) => Err("unreadable PDF: the parser gave up on this file".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TEXT: RecordFields<'static> = RecordFields {
        text: "text",
        id: None,
        max_text: usize::MAX,
    };

    #[test]
    fn a_pdf_gives_the_text_of_every_page() {
        // Two pages of compressed content streams, written by a few lines of Python.
        let pdf = include_bytes!("../../fixtures/ingest/manual.pdf");
        let docs = extract(pdf, DocFormat::from_name("manual.pdf").unwrap(), &TEXT, 1).unwrap();
        let text = docs[0]
            .text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(text.contains("Carburetor maintenance manual"), "{text}");
        assert!(text.contains("the pilot jet is often clogged"), "{text}");
        let broken = extract(&pdf[..400], DocFormat::Pdf, &TEXT, 1).unwrap_err();
        assert!(broken.starts_with("unreadable PDF"), "{broken}");
    }

    #[test]
    fn html_keeps_the_words_and_drops_the_markup() {
        let html = "<html><head><title>Guide</title><style>p { color: red }</style>\
            <script>var x = '<p>';</script></head><body><!-- note -->\
            <h1>Reset&nbsp;a password</h1><p>Open <b>Settings</b> &amp; choose\n   <i>Security</i>.</p>\
            <p>Caf&eacute; &#233; &#x41;</p></body></html>";
        let text = html_to_text(html);
        assert_eq!(
            text,
            "Guide\n\nReset a password\n\nOpen Settings & choose Security.\n\nCafé é A"
        );
    }

    #[test]
    fn every_reference_the_standard_names_decodes_and_the_text_never_grows() {
        let html = "<p>&hellip; &mdash; &euro;&#x1F600; &Eacute;cole &notanentity; &amp b &#0;</p>";
        assert_eq!(
            html_to_text(html),
            "\u{2026} \u{2014} \u{20AC}\u{1F600} \u{C9}cole &notanentity; &amp b &#0;"
        );
        // `&nGt;` stands for 6 bytes in 5: a run of text that would grow stays as written.
        assert_eq!(html_to_text("<p>&nGt;</p><p>&lt;</p>"), "&nGt;\n\n<");
        assert_eq!(html_to_text("&nGt; &amp;"), "\u{226B}\u{20D2} &");
        assert_eq!(
            html_to_text("&nLt; &eacute;&eacute;"),
            "\u{226A}\u{20D2} \u{E9}\u{E9}"
        );
    }

    /// Each `<script>` once lowercased the rest of the document, and each `&` searched the rest
    /// for a `;`: on these 2 MB that was minutes of work; now it is one pass.
    #[test]
    fn html_with_thousands_of_scripts_and_ampersands_strips_in_one_pass() {
        let block = "<p>a &amp b</p><SCRIPT type=x>if (a < b) {}</ScRiPt>";
        let html = format!("{}{}", block.repeat(40_000), "&".repeat(200_000));
        assert!(html.len() > 2_000_000);
        let text = html_to_text(&html);
        assert_eq!(text.matches("a &amp b").count(), 40_000);
        assert!(!text.contains("if (a"));
        assert!(text.ends_with(&"&".repeat(200_000)));
        // A script never closed hides the rest, as browsers do.
        assert_eq!(html_to_text("<p>kept</p><script>var x = '</p>"), "kept");
    }

    /// A JSON array is read whole (no framing holds its records to the record cap): a record
    /// of a gigabyte of text passed; so did an id too long for the index and fields copied
    /// into each of the record's chunks without bound.
    /// A record's nested values were built whole before being dropped: 8 MiB of `0,` in one
    /// array took 32 bytes a zero as `Value`s (a 1 GiB file, 32 GiB). Skipped as they are read,
    /// a record holds what it keeps; NDJSON's lines alike.
    #[test]
    fn nested_values_are_skipped_as_they_are_read() {
        let zeros = vec!["0"; 4 << 20].join(",");
        let json =
            format!(r#"[{{"text": "kept", "n": 7, "x": [{zeros}], "o": {{"y": [{zeros}]}}}}]"#);
        let fields = RecordFields {
            text: "text",
            id: None,
            max_text: 1000,
        };
        for (bytes, format) in [
            (json.as_bytes(), DocFormat::Json),
            (&json.as_bytes()[1..json.len() - 1], DocFormat::Ndjson),
        ] {
            let (found, held) =
                crate::allocated::peak(|| extract(bytes, format, &fields, 10).unwrap());
            assert_eq!(found[0].text, "kept");
            assert_eq!(
                found[0].fields,
                json!({"n": 7}).as_object().unwrap().clone()
            );
            assert!(
                held < 1 << 20,
                "{format:?} held {held} bytes for 16 MiB of JSON"
            );
        }
    }

    /// An id that is not a string reads as serde_json writes its value, as it did when
    /// records were built whole: a file ingested again keeps its documents' ids.
    #[test]
    fn ids_that_are_not_strings_read_as_before() {
        let fields = RecordFields {
            text: "text",
            id: Some("id"),
            max_text: 1000,
        };
        let bytes =
            br#"[{"id": 1.50, "text": "a"}, {"id": 1E3, "text": 7}, {"id": true, "text": "c"}]"#;
        let ids: Vec<(Option<String>, String)> = extract(bytes, DocFormat::Json, &fields, 10)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.text))
            .collect();
        let expected = [("1.5", "a"), ("1000.0", "7"), ("true", "c")];
        let expected: Vec<(Option<String>, String)> = expected
            .iter()
            .map(|(id, text)| (Some(id.to_string()), text.to_string()))
            .collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn each_record_is_held_to_the_record_cap_an_id_length_and_a_metadata_size() {
        let fields = RecordFields {
            text: "text",
            id: Some("id"),
            max_text: 1000,
        };
        let refused = |record: serde_json::Value| {
            let bytes = serde_json::to_vec(&json!([{"id": "ok", "text": "fine"}, record])).unwrap();
            extract(&bytes, DocFormat::Json, &fields, 10).unwrap_err()
        };
        let why = refused(json!({"id": "a", "text": "x".repeat(1001)}));
        assert!(
            why.starts_with("record 2's \"text\" is 1001 bytes"),
            "{why}"
        );
        let why = refused(json!({"id": "i".repeat(257), "text": "t"}));
        assert!(
            why.starts_with("record 2's id is 257 bytes; at most 256"),
            "{why}"
        );
        let why = refused(json!({"id": "b", "text": "t", "note": "n".repeat(5000)}));
        assert!(why.contains("other fields take 5011 bytes"), "{why}");
        let bytes = serde_json::to_vec(&json!([{"id": "c", "text": "x".repeat(1000), "n": 1}]));
        assert_eq!(
            extract(&bytes.unwrap(), DocFormat::Json, &fields, 10)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn records_become_documents_with_their_fields() {
        let ndjson = b"{\"id\": \"a\", \"text\": \"first\", \"lang\": \"en\", \"n\": 1}\n\n\
                       {\"id\": \"b\", \"text\": \"second\", \"tags\": [1]}\n";
        let fields = RecordFields {
            text: "text",
            id: Some("id"),
            max_text: usize::MAX,
        };
        let docs = extract(ndjson, DocFormat::Ndjson, &fields, 2).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].id.as_deref(), Some("a"));
        assert_eq!(docs[0].text, "first");
        assert_eq!(
            Value::Object(docs[0].fields.clone()),
            json!({"lang": "en", "n": 1})
        );
        assert!(docs[1].fields.is_empty());

        let csv = b"title,body\nOne,\"hello, world\"\nTwo,bye\n";
        let fields = RecordFields {
            text: "body",
            id: None,
            max_text: usize::MAX,
        };
        let docs = extract(csv, DocFormat::Csv, &fields, 2).unwrap();
        assert_eq!(docs[0].text, "hello, world");
        assert_eq!(docs[1].id.as_deref(), Some("2"));
        assert_eq!(docs[1].fields["title"], "Two");

        let error = extract(b"[{\"body\": 1}]", DocFormat::Json, &TEXT, 1).unwrap_err();
        assert!(error.contains("no \"text\" field"), "{error}");
        assert!(extract(b"\xff\xfe", DocFormat::Text, &TEXT, 1).is_err());
        assert_eq!(
            DocFormat::from_name("notes.MD.gz"),
            Some(DocFormat::Markdown)
        );
        assert_eq!(DocFormat::from_name("data.parquet"), None);
    }

    /// Records past the bound are refused as they are read, in every record format; at the
    /// bound they are read.
    #[test]
    fn records_past_the_bound_are_refused() {
        let ndjson = "{\"text\": \"a\"}\n".repeat(3);
        let json = format!("[{}]", ["{\"text\": \"a\"}"; 3].join(","));
        let csv = format!("text\n{}", "a\n".repeat(3));
        for (bytes, format) in [
            (ndjson.as_bytes(), DocFormat::Ndjson),
            (json.as_bytes(), DocFormat::Json),
            (csv.as_bytes(), DocFormat::Csv),
        ] {
            assert_eq!(extract(bytes, format, &TEXT, 3).unwrap().len(), 3);
            let error = extract(bytes, format, &TEXT, 2).unwrap_err();
            assert_eq!(
                error,
                "holds more than 2 records, the most this job may still hold in memory \
                 (CONVEYOR_MAX_IN_MEMORY_BYTES)",
                "{format:?}"
            );
        }
        // One object is one record; other errors keep their own words.
        assert_eq!(
            extract(b"{\"text\": \"a\"}", DocFormat::Json, &TEXT, 1)
                .unwrap()
                .len(),
            1
        );
        let error = extract(b"[{\"text\": 1}, oops]", DocFormat::Json, &TEXT, 9).unwrap_err();
        assert!(error.starts_with("invalid JSON: expected value"), "{error}");
        let error = extract(b"\"text\"", DocFormat::Json, &TEXT, 9).unwrap_err();
        assert!(
            error.contains("expected an object or an array of objects"),
            "{error}"
        );
    }
}
