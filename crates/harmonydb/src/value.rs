//! Values crossing the Rust/SQL boundary, in a form both dialects share.
//!
//! Parameters are converted to owned [`Value`]s before a statement is sent (SQLite runs on its
//! own threads, so they must be owned anyway), and result rows come back as [`Row`]s of
//! `Value`s read by column name. Each backend maps `Value` onto its driver's types:
//!
//! | `Value` | Postgres | SQLite |
//! |---|---|---|
//! | `Int` | INT2/INT4/INT8 (checked) | INTEGER |
//! | `Float` | FLOAT4/FLOAT8 | REAL |
//! | `Bool` | BOOLEAN | 0 / 1 |
//! | `Timestamp` | TIMESTAMPTZ | TEXT `YYYY-MM-DD HH:MM:SS.fff` (UTC) |
//! | `IntArray` / `TextArray` / `BoolArray` / `TimestampArray` | `INT8[]` / `TEXT[]` / `BOOL[]` / `TIMESTAMPTZ[]` | JSON array text (read with `json_each`) |
//! | `BatchColumn` (NULL elements allowed) | `INT8[]` / `TEXT[]` / `BOOL[]` / `TIMESTAMPTZ[]` | JSON array text |

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike, Utc};

use crate::batch::BatchColumn;
use crate::error::{Error, ErrorKind, Result};

/// The one text format of SQLite timestamps (DESIGN §3): UTC, space separator, milliseconds.
pub const SQLITE_TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";

/// A point in time with millisecond precision, the precision both dialects store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// Converts a `SystemTime`, truncating to milliseconds.
    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// The `SystemTime` at this instant.
    pub fn to_system(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_millis(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_millis(self.0.unsigned_abs())
        }
    }

    /// As a chrono UTC date-time.
    pub fn to_chrono(self) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// From a chrono UTC date-time, truncating to milliseconds.
    pub fn from_chrono(t: DateTime<Utc>) -> Self {
        Timestamp(t.timestamp_millis())
    }

    /// How long after `earlier` this is; zero when it is not after it.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// The SQLite text form: `YYYY-MM-DD HH:MM:SS.fff`, UTC.
    pub fn to_sqlite_text(self) -> String {
        let mut out = String::with_capacity(23);
        self.write_sqlite_text(&mut out);
        out
    }

    /// Appends the SQLite text form to `out` (for batches, which write many into one buffer).
    pub(crate) fn write_sqlite_text(self, out: &mut String) {
        // The digits written directly: a strftime pattern is re-parsed on every call, and
        // even `write!` costs several times more, while a timestamp is formatted for every
        // timestamp parameter and several times for every history row the engine writes.
        let t = self.to_chrono().naive_utc();
        let year = t.year();
        if !(0..=9999).contains(&year) {
            let _ = write!(out, "{}", t.format(SQLITE_TIMESTAMP_FORMAT));
            return;
        }
        let millis = t.and_utc().timestamp_subsec_millis().min(999);
        for (value, width, then) in [
            (year as u32, 4, Some('-')),
            (t.month(), 2, Some('-')),
            (t.day(), 2, Some(' ')),
            (t.hour(), 2, Some(':')),
            (t.minute(), 2, Some(':')),
            (t.second(), 2, Some('.')),
            (millis, 3, None),
        ] {
            let mut digits = [b'0'; 4];
            let mut rest = value;
            for slot in digits[..width].iter_mut().rev() {
                *slot = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            out.extend(digits[..width].iter().map(|d| char::from(*d)));
            out.extend(then);
        }
    }

    /// Parses the SQLite text form. Also accepts the `T` separator, a missing fraction and a
    /// trailing `Z`, so rows written by hand with SQLite's own `datetime()` still read.
    pub fn parse_sqlite_text(s: &str) -> Result<Self> {
        if let Some(t) = Self::parse_exact_sqlite_text(s) {
            return Ok(t);
        }
        let trimmed = s.trim_end_matches('Z').replacen('T', " ", 1);
        let parsed = NaiveDateTime::parse_from_str(&trimmed, "%Y-%m-%d %H:%M:%S%.f")
            .map_err(|e| Error::new(ErrorKind::Decode, format!("bad timestamp {s:?}: {e}")))?;
        Ok(Timestamp(parsed.and_utc().timestamp_millis()))
    }

    /// The exact form `YYYY-MM-DD HH:MM:SS.fff` that [`Timestamp::to_sqlite_text`] writes,
    /// read without a format pattern; `None` for anything else.
    fn parse_exact_sqlite_text(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 23
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b' '
            || b[13] != b':'
            || b[16] != b':'
            || b[19] != b'.'
        {
            return None;
        }
        let num = |from: usize, to: usize| -> Option<u32> {
            b[from..to].iter().try_fold(0u32, |n, c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        let date = NaiveDate::from_ymd_opt(num(0, 4)? as i32, num(5, 7)?, num(8, 10)?)?;
        let time =
            date.and_hms_milli_opt(num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?)?;
        Some(Timestamp(time.and_utc().timestamp_millis()))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    /// Saturating addition.
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;
    /// Saturating subtraction.
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_sqlite_text())
    }
}

impl serde::Serialize for Timestamp {
    /// RFC 3339 in UTC with milliseconds: `2026-11-20T23:17:00.123Z`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(
            &self
                .to_chrono()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| Timestamp::from_chrono(t.with_timezone(&Utc)))
            .or_else(|_| Timestamp::parse_sqlite_text(&s))
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_sqlite_text())
    }
}

/// An owned SQL value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit integer (narrowed, with a range check, for INT2/INT4 Postgres parameters).
    Int(i64),
    /// A double.
    Float(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A timestamp.
    Timestamp(Timestamp),
    /// An array of integers.
    IntArray(Vec<i64>),
    /// An array of text.
    TextArray(Vec<String>),
    /// An array of booleans.
    BoolArray(Vec<bool>),
    /// An array of timestamps.
    TimestampArray(Vec<Timestamp>),
    /// One column of a batch of rows: an array whose elements may be NULL (see
    /// [`batch_sql!`](crate::batch_sql)).
    BatchColumn(BatchColumn),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Timestamp(_) => "timestamp",
            Value::IntArray(_) => "integer array",
            Value::TextArray(_) => "text array",
            Value::BoolArray(_) => "boolean array",
            Value::TimestampArray(_) => "timestamp array",
            Value::BatchColumn(_) => "batch column",
        }
    }
}

/// Converts a Rust value into a bind parameter.
pub trait ToValue: Sync {
    /// The owned SQL value.
    fn to_value(&self) -> Value;
}

macro_rules! to_value_int {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
to_value_int!(i8, i16, i32, i64, u8, u16, u32);

impl ToValue for u64 {
    fn to_value(&self) -> Value {
        // Values above i64::MAX cannot be stored in either dialect; saturate rather than wrap
        // so that a bad input is an out-of-range value, never a negative one.
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ToValue for usize {
    fn to_value(&self) -> Value {
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Float(*self)
    }
}

impl ToValue for f32 {
    fn to_value(&self) -> Value {
        Value::Float(f64::from(*self))
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Bytes(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Bytes(self.clone())
    }
}

impl ToValue for Timestamp {
    fn to_value(&self) -> Value {
        Value::Timestamp(*self)
    }
}

impl ToValue for DateTime<Utc> {
    fn to_value(&self) -> Value {
        Value::Timestamp(Timestamp::from_chrono(*self))
    }
}

impl ToValue for [i64] {
    fn to_value(&self) -> Value {
        Value::IntArray(self.to_vec())
    }
}

impl ToValue for Vec<i64> {
    fn to_value(&self) -> Value {
        Value::IntArray(self.clone())
    }
}

impl ToValue for [String] {
    fn to_value(&self) -> Value {
        Value::TextArray(self.to_vec())
    }
}

impl ToValue for Vec<String> {
    fn to_value(&self) -> Value {
        Value::TextArray(self.clone())
    }
}

impl ToValue for [bool] {
    fn to_value(&self) -> Value {
        Value::BoolArray(self.to_vec())
    }
}

impl ToValue for Vec<bool> {
    fn to_value(&self) -> Value {
        Value::BoolArray(self.clone())
    }
}

impl ToValue for [Timestamp] {
    fn to_value(&self) -> Value {
        Value::TimestampArray(self.to_vec())
    }
}

impl ToValue for Vec<Timestamp> {
    fn to_value(&self) -> Value {
        Value::TimestampArray(self.clone())
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}

/// Bind parameters, in `$1…$n` order.
pub type Params<'a> = &'a [&'a dyn ToValue];

pub(crate) fn to_values(params: Params<'_>) -> Vec<Value> {
    params.iter().map(|p| p.to_value()).collect()
}

/// Converts one SQL value into a Rust value.
pub trait FromValue: Sized {
    /// Converts `value`; `column` names it in errors.
    fn from_value(value: &Value, column: &str) -> Result<Self>;
}

fn mismatch<T>(value: &Value, column: &str, want: &str) -> Result<T> {
    Err(Error::new(
        ErrorKind::Decode,
        format!(
            "column {column:?}: cannot read {} as {want}",
            value.type_name()
        ),
    ))
}

impl FromValue for i64 {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(i64::from(*b)),
            _ => mismatch(value, column, "an integer"),
        }
    }
}

macro_rules! from_value_narrow {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value, column: &str) -> Result<Self> {
                let i = i64::from_value(value, column)?;
                <$t>::try_from(i).map_err(|_| {
                    Error::new(
                        ErrorKind::Decode,
                        format!("column {column:?}: {i} does not fit in {}", stringify!($t)),
                    )
                })
            }
        }
    )*};
}
from_value_narrow!(i32, i16, u8, u16, u32, u64, usize);

impl FromValue for f64 {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            _ => mismatch(value, column, "a float"),
        }
    }
}

impl FromValue for bool {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Bool(b) => Ok(*b),
            Value::Int(i) => Ok(*i != 0),
            _ => mismatch(value, column, "a boolean"),
        }
    }
}

impl FromValue for String {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Text(s) => Ok(s.clone()),
            Value::Timestamp(t) => Ok(t.to_sqlite_text()),
            _ => mismatch(value, column, "text"),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Bytes(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            _ => mismatch(value, column, "bytes"),
        }
    }
}

impl FromValue for Timestamp {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Timestamp(t) => Ok(*t),
            Value::Text(s) => {
                Timestamp::parse_sqlite_text(s).map_err(|e| e.context(format!("column {column:?}")))
            }
            _ => mismatch(value, column, "a timestamp"),
        }
    }
}

impl FromValue for DateTime<Utc> {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        Timestamp::from_value(value, column).map(Timestamp::to_chrono)
    }
}

impl FromValue for Vec<i64> {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::IntArray(v) => Ok(v.clone()),
            Value::Text(s) => serde_json::from_str(s)
                .map_err(|e| Error::new(ErrorKind::Decode, format!("column {column:?}: {e}"))),
            _ => mismatch(value, column, "an integer array"),
        }
    }
}

impl FromValue for Vec<String> {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::TextArray(v) => Ok(v.clone()),
            Value::Text(s) => serde_json::from_str(s)
                .map_err(|e| Error::new(ErrorKind::Decode, format!("column {column:?}: {e}"))),
            _ => mismatch(value, column, "a text array"),
        }
    }
}

impl FromValue for Value {
    fn from_value(value: &Value, _column: &str) -> Result<Self> {
        Ok(value.clone())
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value, column: &str) -> Result<Self> {
        match value {
            Value::Null => Ok(None),
            v => T::from_value(v, column).map(Some),
        }
    }
}

/// The column names of a result set, shared by all its rows.
pub type Columns = Arc<[Box<str>]>;

/// One result row: values addressed by column name (or position).
#[derive(Debug, Clone)]
pub struct Row {
    columns: Columns,
    values: Vec<Value>,
}

impl Row {
    pub(crate) fn new(columns: Columns, values: Vec<Value>) -> Self {
        Row { columns, values }
    }

    /// The value of column `name`, converted to `T`. A missing column or a NULL read into a
    /// non-`Option` is an [`ErrorKind::Decode`] error naming the column.
    pub fn get<T: FromValue>(&self, name: &str) -> Result<T> {
        let idx = self
            .columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "no column {name:?} in result (columns: {})",
                        self.columns.join(", ")
                    ),
                )
            })?;
        self.get_idx(idx)
    }

    /// The value at position `idx`, converted to `T`.
    pub fn get_idx<T: FromValue>(&self, idx: usize) -> Result<T> {
        let column = self.columns.get(idx).map_or("?", |c| c);
        let value = self.values.get(idx).ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "no column at position {idx} (row has {})",
                    self.values.len()
                ),
            )
        })?;
        if matches!(value, Value::Null) {
            // `Option<T>` handles NULL itself; for any other `T` this is a clear error rather
            // than a confusing type mismatch.
            return T::from_value(value, column).map_err(|_| {
                Error::new(
                    ErrorKind::Decode,
                    format!("column {column:?} is NULL; read it as an Option"),
                )
            });
        }
        T::from_value(value, column)
    }

    /// The column names.
    pub fn columns(&self) -> &[Box<str>] {
        &self.columns
    }

    /// The raw values, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Builds a value from a whole row, reading columns by name. Derive it with
/// `#[derive(harmonydb::FromRow)]`; implement it by hand with [`Row::get`].
pub trait FromRow: Sized {
    /// Converts one row.
    fn from_row(row: &Row) -> Result<Self>;
}

impl FromRow for Row {
    fn from_row(row: &Row) -> Result<Self> {
        Ok(row.clone())
    }
}

/// Reads the single column of a one-column result (see `Executor::scalar`).
#[derive(Debug)]
pub struct Scalar<T>(pub T);

impl<T: FromValue> FromRow for Scalar<T> {
    fn from_row(row: &Row) -> Result<Self> {
        if row.len() != 1 {
            return Err(Error::new(
                ErrorKind::Decode,
                format!("expected one column, got {}", row.len()),
            ));
        }
        row.get_idx(0).map(Scalar)
    }
}

macro_rules! from_row_tuple {
    ($($t:ident $i:tt),+) => {
        impl<$($t: FromValue),+> FromRow for ($($t,)+) {
            fn from_row(row: &Row) -> Result<Self> {
                Ok(($(row.get_idx::<$t>($i)?,)+))
            }
        }
    };
}
from_row_tuple!(A 0);
from_row_tuple!(A 0, B 1);
from_row_tuple!(A 0, B 1, C 2);
from_row_tuple!(A 0, B 1, C 2, D 3);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4, F 5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_text_round_trip() {
        let t = Timestamp::from_millis(1_700_000_000_123);
        let s = t.to_sqlite_text();
        assert_eq!(s, "2023-11-14 22:13:20.123");
        assert_eq!(Timestamp::parse_sqlite_text(&s).unwrap(), t);
        // SQLite's own datetime('now') format has no fraction.
        assert_eq!(
            Timestamp::parse_sqlite_text("2023-11-14 22:13:20").unwrap(),
            Timestamp::from_millis(1_700_000_000_000)
        );
        assert_eq!(
            Timestamp::parse_sqlite_text("2023-11-14T22:13:20.123Z").unwrap(),
            t
        );
    }

    #[test]
    fn sqlite_text_matches_the_documented_format() {
        // Epoch, a leap day, the last millisecond of a year, and now-ish: the direct
        // formatter and parser agree with the strftime pattern of DESIGN §3.
        for ms in [
            0,
            951_782_400_001,
            1_704_067_199_999,
            1_700_000_000_123,
            4_102_444_800_000,
        ] {
            let t = Timestamp::from_millis(ms);
            let s = t.to_sqlite_text();
            assert_eq!(s, t.to_chrono().format(SQLITE_TIMESTAMP_FORMAT).to_string());
            assert_eq!(Timestamp::parse_sqlite_text(&s).unwrap(), t);
        }
        // Every millisecond of a day and years far apart, the ones outside 0000-9999 too,
        // format as the pattern does.
        for ms in (0..86_400_000i64).step_by(86_400_000 / 5_000 + 7).chain([
            -62_167_219_200_001,
            -1,
            253_402_300_799_999,
            253_402_300_800_000,
        ]) {
            let t = Timestamp::from_millis(ms);
            assert_eq!(
                t.to_sqlite_text(),
                t.to_chrono().format(SQLITE_TIMESTAMP_FORMAT).to_string(),
                "{ms}"
            );
        }
        // Near misses of the exact form fall back to the general parser or are refused.
        assert!(Timestamp::parse_sqlite_text("2023-13-14 22:13:20.123").is_err());
        assert!(Timestamp::parse_sqlite_text("2023-11-14 22:13:2x.123").is_err());
        assert_eq!(
            Timestamp::parse_sqlite_text("2023-11-14 22:13:20.12").unwrap(),
            Timestamp::from_millis(1_700_000_000_120)
        );
    }

    #[test]
    fn text_form_sorts_like_time() {
        let a = Timestamp::from_millis(999);
        let b = Timestamp::from_millis(1_000);
        assert!(a.to_sqlite_text() < b.to_sqlite_text());
    }

    #[test]
    fn row_get_by_name_and_errors() {
        let cols: Columns = vec!["id".into(), "name".into(), "gone".into()].into();
        let row = Row::new(
            cols,
            vec![Value::Int(7), Value::Text("x".into()), Value::Null],
        );
        assert_eq!(row.get::<i64>("ID").unwrap(), 7);
        assert_eq!(row.get::<String>("name").unwrap(), "x");
        assert_eq!(row.get::<Option<i64>>("gone").unwrap(), None);
        let e = row.get::<i64>("gone").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert!(e.to_string().contains("NULL"), "{e}");
        let e = row.get::<i64>("nope").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(row.get::<i32>("name").is_err());
    }

    #[test]
    fn narrowing_is_checked() {
        let e = i32::from_value(&Value::Int(i64::MAX), "c").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert_eq!(u8::from_value(&Value::Int(255), "c").unwrap(), 255);
    }
}
