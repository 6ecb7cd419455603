//! PostgreSQL column types as the importer sees them: checking a text value against a type,
//! inferring the narrowest type of a value, and widening a created column when a later value
//! does not fit what the file's head suggested.

use std::borrow::Cow;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgType {
    Boolean,
    SmallInt,
    Integer,
    BigInt,
    Real,
    Double,
    Numeric,
    Date,
    Timestamp,
    Timestamptz,
    Uuid,
    Json,
    Text,
    /// A type the importer does not check itself (PostgreSQL's COPY does): `varchar(10)`...
    Other(String),
}

impl PgType {
    /// From a name as `format_type()` prints it, or a client's short name.
    pub fn from_sql(name: &str) -> PgType {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "boolean" | "bool" => PgType::Boolean,
            "smallint" | "int2" => PgType::SmallInt,
            "integer" | "int" | "int4" => PgType::Integer,
            "bigint" | "int8" => PgType::BigInt,
            "real" | "float4" => PgType::Real,
            "double precision" | "float8" => PgType::Double,
            "numeric" | "decimal" => PgType::Numeric,
            "date" => PgType::Date,
            "timestamp" | "timestamp without time zone" => PgType::Timestamp,
            "timestamptz" | "timestamp with time zone" => PgType::Timestamptz,
            "uuid" => PgType::Uuid,
            "json" | "jsonb" => PgType::Json,
            "text" => PgType::Text,
            _ => PgType::Other(lower),
        }
    }

    /// A type the file's inspection inferred: one of ours, else text. The inspector is a
    /// process of its own because a hostile file may take it over, and what it says goes
    /// into a `CREATE TABLE` (`text, x int DEFAULT ...`).
    pub fn inferred(name: &str) -> PgType {
        match PgType::from_sql(name) {
            PgType::Other(_) => PgType::Text,
            known => known,
        }
    }

    /// The name used in `CREATE TABLE`.
    pub fn sql(&self) -> &str {
        match self {
            PgType::Boolean => "boolean",
            PgType::SmallInt => "smallint",
            PgType::Integer => "integer",
            PgType::BigInt => "bigint",
            PgType::Real => "real",
            PgType::Double => "double precision",
            PgType::Numeric => "numeric",
            PgType::Date => "date",
            PgType::Timestamp => "timestamp",
            PgType::Timestamptz => "timestamptz",
            PgType::Uuid => "uuid",
            PgType::Json => "jsonb",
            PgType::Text => "text",
            PgType::Other(name) => name,
        }
    }

    /// The value as COPY should receive it, or why it is not of this type.
    pub fn check<'a>(&self, value: &'a str) -> Result<Cow<'a, str>, String> {
        // What PostgreSQL refuses in any column: checked here, the row is rejected alone; in
        // the COPY, the whole import failed, `on_error=skip` or not.
        if value.contains('\0') {
            return Err(format!("a NUL character, which {} cannot hold", self.sql()));
        }
        let trimmed = value.trim();
        let ok = match self {
            PgType::Text | PgType::Other(_) => return Ok(Cow::Borrowed(value)),
            PgType::Boolean => {
                return boolean(trimmed)
                    .map(|b| Cow::Borrowed(if b { "t" } else { "f" }))
                    .ok_or_else(|| self.invalid(value))
            }
            PgType::SmallInt => trimmed.parse::<i16>().is_ok(),
            PgType::Integer => trimmed.parse::<i32>().is_ok(),
            PgType::BigInt => trimmed.parse::<i64>().is_ok(),
            // Past the type's range Rust reads infinity; PostgreSQL refuses the value.
            PgType::Real => finite_or_named(trimmed.parse::<f32>().map(f64::from), trimmed),
            PgType::Double => finite_or_named(trimmed.parse::<f64>(), trimmed),
            PgType::Numeric => numeric(trimmed),
            PgType::Date => date(trimmed),
            // PostgreSQL reads a date alone as its midnight: a date column widened to a
            // timestamp still holds the dates it held.
            PgType::Timestamp => timestamp(trimmed) || date(trimmed),
            PgType::Timestamptz => timestamptz(trimmed) || timestamp(trimmed) || date(trimmed),
            // In PostgreSQL's spelling: it reads no `urn:uuid:` form.
            PgType::Uuid => {
                return uuid::Uuid::parse_str(trimmed)
                    .map(|id| Cow::Owned(id.hyphenated().to_string()))
                    .map_err(|_| self.invalid(value))
            }
            // jsonb holds no \u0000 in a string.
            PgType::Json => {
                serde_json::from_str::<serde::de::IgnoredAny>(value).is_ok() && !escapes_nul(value)
            }
        };
        if ok {
            Ok(Cow::Borrowed(trimmed))
        } else {
            Err(self.invalid(value))
        }
    }

    fn invalid(&self, value: &str) -> String {
        let shown: String = value.chars().take(40).collect();
        format!("invalid {} {shown:?}", self.sql())
    }

    /// The narrowest type that holds `value` (never `SmallInt`/`Integer`/`Real`: created
    /// columns start wide enough for the rest of the file).
    pub fn infer(value: &str) -> PgType {
        let v = value.trim();
        if matches!(v.to_ascii_lowercase().as_str(), "true" | "false") {
            PgType::Boolean
        } else if v.parse::<i64>().is_ok() {
            PgType::BigInt
        } else if v.parse::<f64>().is_ok() && !v.is_empty() {
            PgType::Double
        } else if date(v) {
            PgType::Date
        } else if timestamp(v) {
            PgType::Timestamp
        } else if timestamptz(v) {
            PgType::Timestamptz
        } else {
            PgType::Text
        }
    }

    /// The narrowest type holding values of both types.
    pub fn join(&self, other: &PgType) -> PgType {
        use PgType::*;
        let rank = |t: &PgType| match t {
            SmallInt => Some(0),
            Integer => Some(1),
            BigInt => Some(2),
            Real | Double => Some(3),
            Numeric => Some(4),
            _ => None,
        };
        let time = |t: &PgType| match t {
            Date => Some(0),
            Timestamp => Some(1),
            Timestamptz => Some(2),
            _ => None,
        };
        if self == other {
            return self.clone();
        }
        if let (Some(a), Some(b)) = (rank(self), rank(other)) {
            return match a.max(b) {
                0 => SmallInt,
                1 => Integer,
                2 => BigInt,
                3 if *self == Numeric || *other == Numeric => Numeric,
                3 => Double,
                _ => Numeric,
            };
        }
        if let (Some(a), Some(b)) = (time(self), time(other)) {
            return [Date, Timestamp, Timestamptz][a.max(b)].clone();
        }
        Text
    }

    /// The type a created column of this type widens to for a `value` it does not hold: the
    /// narrowest holding both, else text (`1e400` in a double: no number type holds it as
    /// written). Only a value no column holds (a NUL) stays its row's error.
    pub fn widened_for(&self, value: &str) -> PgType {
        let joined = self.join(&PgType::infer(value));
        if joined.check(value).is_ok() {
            joined
        } else {
            PgType::Text
        }
    }
}

fn boolean(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn numeric(v: &str) -> bool {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.eq_ignore_ascii_case("nan") {
        return true;
    }
    let (mantissa, exponent) = match digits.find(['e', 'E']) {
        Some(at) => (&digits[..at], Some(&digits[at + 1..])),
        None => (digits, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = !(int.is_empty() && frac.is_empty()) && all_digits(int) && all_digits(frac);
    let exponent = match exponent {
        None => 0,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            match e.parse::<i64>() {
                Ok(e) if !digits.is_empty() && all_digits(digits) => e,
                _ => return false,
            }
        }
    };
    // What PostgreSQL's numeric holds: 131,072 digits before the point, 16,383 after
    // (`1e200000` is refused there, and failed the whole COPY). Digits before the first
    // significant one count for nothing (`0.001e131074` is 1e131071).
    let leading = int
        .bytes()
        .chain(frac.bytes())
        .take_while(|&b| b == b'0')
        .count();
    let before = match leading == int.len() + frac.len() {
        true => 0,
        false => (int.len() as i64 - leading as i64).saturating_add(exponent),
    };
    let after = (frac.len() as i64).saturating_sub(exponent);
    mantissa_ok && before <= 131_072 && after <= 16_383
}

/// PostgreSQL reads no year 0 nor a signed year (it writes years before 1 as BC).
fn in_common_era(date: chrono::NaiveDate) -> bool {
    chrono::Datelike::year(&date) >= 1
}

fn date(v: &str) -> bool {
    v.len() == 10 && chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").is_ok_and(in_common_era)
}

const NAIVE_FORMATS: &[&str] = &[
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
];

fn timestamp(v: &str) -> bool {
    NAIVE_FORMATS.iter().any(|f| {
        chrono::NaiveDateTime::parse_from_str(v, f).is_ok_and(|at| in_common_era(at.date()))
    })
}

fn timestamptz(v: &str) -> bool {
    // PostgreSQL reads offsets up to 15:59:59 either way (chrono's up to 23:59).
    let storable = |at: chrono::DateTime<chrono::FixedOffset>| {
        in_common_era(at.date_naive()) && at.offset().local_minus_utc().abs() < 16 * 3600
    };
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(v) {
        return storable(at);
    }
    // PostgreSQL's own output (`2024-01-02 03:04:05.123+00`) and its variants.
    ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"]
        .iter()
        .any(|f| chrono::DateTime::parse_from_str(v, f).is_ok_and(storable))
        || v.strip_suffix(['Z', 'z']).is_some_and(timestamp)
}

/// Whether JSON text holds the escape `\u0000` (a `\` before it escapes that backslash
/// instead: `"\\u0000"` is the text backslash-u0000, which jsonb holds).
fn escapes_nul(json: &str) -> bool {
    json.match_indices("\\u0000").any(|(at, _)| {
        let backslashes = json[..at].bytes().rev().take_while(|&b| b == b'\\').count();
        backslashes % 2 == 0
    })
}

/// Appends `value` to a COPY text-format buffer, escaped.
pub fn push_copy_text(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

/// A float that is finite, or an infinity or NaN written as such (`1e400` reads as infinity),
/// and not a non-zero number read as zero (`1e-400`: PostgreSQL refuses its underflow).
fn finite_or_named(parsed: Result<f64, std::num::ParseFloatError>, text: &str) -> bool {
    match parsed {
        Ok(0.0) => {
            let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
            !mantissa.chars().any(|c| c.is_ascii_digit() && c != '0')
        }
        Ok(f) if f.is_finite() => true,
        Ok(_) => {
            let word = text.trim_start_matches(['+', '-']).to_ascii_lowercase();
            matches!(word.as_str(), "inf" | "infinity" | "nan")
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values PostgreSQL refuses are refused here, so that `on_error=skip` rejects their row
    /// instead of the COPY failing the whole import.
    #[test]
    fn values_postgres_refuses_are_refused() {
        assert!(PgType::Text.check("a\0b").is_err());
        assert!(PgType::BigInt.check("1\0").is_err());
        assert!(PgType::Double.check("1e400").is_err());
        assert!(PgType::Double.check("-Infinity").is_ok());
        assert!(PgType::Double.check("NaN").is_ok());
        assert!(PgType::Double.check("1.5e300").is_ok());
        assert!(PgType::Real.check("1e39").is_err());
        assert!(PgType::Real.check("3.4e38").is_ok());
        assert!(PgType::Double.check("1e-400").is_err());
        assert!(PgType::Real.check("1e-50").is_err());
        assert!(PgType::Double.check("-0.0e5").is_ok());
        assert!(PgType::Real.check("0").is_ok());
        assert!(PgType::Json.check(r#"{"a": "\u0000"}"#).is_err());
        assert!(PgType::Json.check(r#"{"a": "b"}"#).is_ok());
        // The text backslash-u0000 is no NUL.
        assert!(PgType::Json.check(r#"{"a": "\\u0000"}"#).is_ok());
        assert!(PgType::Json.check(r#"{"a": "\\\u0000"}"#).is_err());
        assert!(PgType::Date.check("0000-01-01").is_err());
        assert!(PgType::Timestamp.check("0000-12-31 10:00:00").is_err());
        assert!(PgType::Timestamptz.check("0000-12-31T10:00:00Z").is_err());
        assert!(PgType::Timestamptz.check("0000-12-31 10:00:00+02").is_err());
        assert_eq!(PgType::infer("0000-01-01"), PgType::Text);
        // Numeric's bounds and timestamptz's offsets, as PostgreSQL 18 reads them (checked
        // with psql): past them the value failed the whole COPY.
        for (value, storable) in [
            ("1e131071", true),
            ("1e131072", false),
            ("1e200000", false),
            ("1e-16383", true),
            ("1e-16384", false),
            ("0.5e-16383", false),
            ("1e99999999999999999999", false),
            ("1e9223372036854775807", false),
            ("1e-9223372036854775808", false),
            ("0e200000", true),
            ("0.001e131074", true),
        ] {
            assert_eq!(PgType::Numeric.check(value).is_ok(), storable, "{value}");
        }
        for (value, storable) in [
            ("2024-01-01T00:00:00+15:59", true),
            ("2024-01-01T00:00:00-15:59", true),
            ("2024-01-01T00:00:00+16:00", false),
            ("2024-01-01 00:00:00+2000", false),
        ] {
            assert_eq!(
                PgType::Timestamptz.check(value).is_ok(),
                storable,
                "{value}"
            );
        }
        assert_eq!(PgType::infer("2024-01-01T00:00:00+20:00"), PgType::Text);
        // PostgreSQL reads no urn form; every spelling goes in its own.
        let id = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for spelling in [
            format!("urn:uuid:{id}"),
            format!("{{{id}}}"),
            id.replace('-', "").to_uppercase(),
        ] {
            assert_eq!(PgType::Uuid.check(&spelling).unwrap(), id, "{spelling}");
        }
    }

    #[test]
    fn checks_values_against_types() {
        assert_eq!(PgType::BigInt.check(" 42 ").unwrap(), "42");
        assert!(PgType::Integer.check("3000000000").is_err());
        assert!(PgType::BigInt.check("4.5").is_err());
        assert_eq!(PgType::Boolean.check("Yes").unwrap(), "t");
        assert!(PgType::Numeric.check("-12.50e3").is_ok());
        assert!(PgType::Numeric.check("12.5.1").is_err());
        assert!(PgType::Numeric.check(".").is_err());
        assert!(PgType::Date.check("2024-02-30").is_err());
        assert!(PgType::Timestamptz
            .check("2024-01-02 03:04:05.25+02")
            .is_ok());
        assert!(PgType::Timestamptz.check("2024-01-02T03:04:05Z").is_ok());
        assert!(PgType::Timestamp.check("2024-01-02 03:04:05").is_ok());
        assert!(PgType::Uuid.check("nope").is_err());
        assert!(PgType::Json.check("{\"a\": [1]}").is_ok());
        assert_eq!(
            PgType::BigInt.check("12x").unwrap_err(),
            "invalid bigint \"12x\""
        );
    }

    /// A created column widens to a type that holds the value, is at least as wide, and
    /// still holds what the column held: every pass judges a row alike.
    #[test]
    fn widening_holds_the_value_and_what_the_column_held() {
        use PgType::*;
        let created = [
            Boolean,
            SmallInt,
            Integer,
            BigInt,
            Real,
            Double,
            Numeric,
            Date,
            Timestamp,
            Timestamptz,
            Text,
        ];
        let values = [
            "1",
            "3000000000",
            "1.5",
            "1e39",
            "1e400",
            "-1e-400",
            "inf",
            "NaN",
            "true",
            "yes",
            "2024-01-02",
            "2024-01-02 10:00:00",
            "2024-01-02T10:00:00+01:00",
            "0000-01-01",
            "02134",
            "abc",
        ];
        for ty in &created {
            for v in values.iter().filter(|v| ty.check(v).is_err()) {
                let wider = ty.widened_for(v);
                assert!(
                    wider.check(v).is_ok(),
                    "{ty:?} widened for {v:?} to {wider:?}"
                );
                assert_eq!(wider.join(ty), wider, "{ty:?} -> {wider:?} is no widening");
                for held in values.iter().filter(|h| ty.check(h).is_ok()) {
                    assert!(
                        wider.check(held).is_ok(),
                        "{ty:?} -> {wider:?} drops {held:?}"
                    );
                }
            }
        }
        assert_eq!(Double.widened_for("1e400"), Text);
        assert_eq!(Date.widened_for("2024-01-02 10:00:00"), Timestamp);
    }

    #[test]
    fn infers_and_widens() {
        assert_eq!(PgType::infer("12"), PgType::BigInt);
        assert_eq!(PgType::infer("1.5"), PgType::Double);
        assert_eq!(PgType::infer("2024-01-02"), PgType::Date);
        assert_eq!(PgType::infer("2024-01-02 10:00:00"), PgType::Timestamp);
        assert_eq!(
            PgType::infer("2024-01-02T10:00:00+01:00"),
            PgType::Timestamptz
        );
        assert_eq!(PgType::infer("hello"), PgType::Text);
        assert_eq!(PgType::BigInt.join(&PgType::Double), PgType::Double);
        assert_eq!(PgType::Date.join(&PgType::Timestamp), PgType::Timestamp);
        assert_eq!(PgType::BigInt.join(&PgType::Date), PgType::Text);
        assert_eq!(PgType::Numeric.join(&PgType::Double), PgType::Numeric);
    }

    #[test]
    fn escapes_copy_text() {
        let mut out = Vec::new();
        push_copy_text(&mut out, "a\tb\\c\nd");
        assert_eq!(out, b"a\\tb\\\\c\\nd");
    }
}
