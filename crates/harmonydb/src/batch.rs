//! Batches of rows bound as parameters: the storage behind [`batch_sql!`](crate::batch_sql).
//!
//! A statement that writes or matches many rows at once reads them from a row source bound as
//! parameters, and the two dialects bind that source differently: SQLite gets **one** text
//! parameter holding a JSON array of row arrays (`[[1,"a"],[2,null]]`, read with
//! `json_each`), Postgres gets **one array per column** (read with `unnest`). [`BatchRows`]
//! holds the rows already in the form its dialect binds, so pushing a row costs no allocation
//! of its own (the buffers grow geometrically), and binding copies whole buffers, never rows.
//!
//! What this module must not know: any statement. The SQL text is written by the macro at
//! compile time; this module only stores and binds values.

use std::fmt::Write as _;

use crate::Dialect;
use crate::value::{Params, Timestamp, ToValue, Value};

/// The SQL type of one column of a batch, as `batch_sql!` declares it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchType {
    /// `bigint`: `i64`.
    Int,
    /// `text`: `&str`.
    Text,
    /// `boolean`: `bool` (0 / 1 on SQLite).
    Bool,
    /// `timestamptz`: [`Timestamp`] (the SQLite text form on SQLite).
    Timestamp,
}

impl BatchType {
    fn name(self) -> &'static str {
        match self {
            BatchType::Int => "bigint",
            BatchType::Text => "text",
            BatchType::Bool => "boolean",
            BatchType::Timestamp => "timestamptz",
        }
    }
}

/// One column of a batch, bound on Postgres as one array whose elements may be NULL
/// (`BIGINT[]`, `TEXT[]`, `BOOLEAN[]`, `TIMESTAMPTZ[]`); on SQLite, should one be bound there,
/// as a JSON array. Built only by [`BatchRows`], so its elements are always consistent.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchColumn(pub(crate) Elements);

/// The elements of a [`BatchColumn`]; `None` is SQL NULL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Elements {
    /// `BIGINT[]`.
    Int(Vec<Option<i64>>),
    /// `TEXT[]`: the elements back to back in `text`; `ends[i]` is where element `i` ends
    /// (it starts where the previous non-NULL element ended), `None` for NULL. One buffer
    /// instead of one `String` per row.
    Text {
        text: String,
        ends: Vec<Option<usize>>,
    },
    /// `BOOLEAN[]`.
    Bool(Vec<Option<bool>>),
    /// `TIMESTAMPTZ[]`.
    Timestamp(Vec<Option<Timestamp>>),
}

impl BatchColumn {
    fn with_capacity(ty: BatchType, rows: usize) -> Self {
        BatchColumn(match ty {
            BatchType::Int => Elements::Int(Vec::with_capacity(rows)),
            BatchType::Text => Elements::Text {
                text: String::with_capacity(rows * 16),
                ends: Vec::with_capacity(rows),
            },
            BatchType::Bool => Elements::Bool(Vec::with_capacity(rows)),
            BatchType::Timestamp => Elements::Timestamp(Vec::with_capacity(rows)),
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.0 {
            Elements::Int(v) => v.len(),
            Elements::Text { ends, .. } => ends.len(),
            Elements::Bool(v) => v.len(),
            Elements::Timestamp(v) => v.len(),
        }
    }

    /// Whether the column has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text elements, in order; `None` for NULL. Empty for a column of another type.
    pub fn texts(&self) -> impl Iterator<Item = Option<&str>> {
        let (text, ends) = match &self.0 {
            Elements::Text { text, ends } => (text.as_str(), ends.as_slice()),
            _ => ("", &[][..]),
        };
        let mut start = 0;
        ends.iter().map(move |end| {
            end.map(|end| {
                let s = &text[start..end];
                start = end;
                s
            })
        })
    }

    /// The column as a JSON array, in the element forms of a SQLite batch.
    pub(crate) fn to_json(&self) -> String {
        fn array<T>(out: &mut String, items: impl Iterator<Item = T>, write: fn(&mut String, T)) {
            out.push('[');
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, item);
            }
            out.push(']');
        }
        let mut out = String::with_capacity(2 + self.len() * 8);
        match &self.0 {
            Elements::Int(v) => array(&mut out, v.iter().copied(), json::int),
            Elements::Text { .. } => array(&mut out, self.texts(), json::text),
            Elements::Bool(v) => array(&mut out, v.iter().copied(), json::bool),
            Elements::Timestamp(v) => array(&mut out, v.iter().copied(), json::timestamp),
        }
        out
    }
}

impl ToValue for BatchColumn {
    fn to_value(&self) -> Value {
        Value::BatchColumn(self.clone())
    }
}

/// How a batch's rows are held: as the dialect binds them.
#[derive(Debug, Clone)]
enum Store {
    /// SQLite: the JSON array of row arrays, always closed (`[]`, `[[1,"a"]]`), so that it
    /// can be bound as it is; a new row reopens it.
    Json(String),
    /// Postgres: one array per column.
    Columns(Vec<BatchColumn>),
}

/// The rows of one batch, held in the form its dialect binds. Built and bound through the
/// type [`batch_sql!`](crate::batch_sql) declares, which knows the columns; this type only
/// stores them.
#[derive(Debug, Clone)]
pub struct BatchRows {
    dialect: Dialect,
    types: &'static [BatchType],
    rows: usize,
    store: Store,
}

impl BatchRows {
    /// An empty batch of rows with columns `types` for `dialect`, with room for `rows` rows.
    #[doc(hidden)]
    pub fn new(dialect: Dialect, types: &'static [BatchType], rows: usize) -> Self {
        let store = match dialect {
            Dialect::Sqlite => {
                // A guess at the row width, to spare most of the buffer's regrowth.
                let mut json = String::with_capacity(2 + rows * (3 + types.len() * 12));
                json.push_str("[]");
                Store::Json(json)
            }
            Dialect::Postgres => Store::Columns(
                types
                    .iter()
                    .map(|ty| BatchColumn::with_capacity(*ty, rows))
                    .collect(),
            ),
        };
        BatchRows {
            dialect,
            types,
            rows: 0,
            store,
        }
    }

    /// The dialect the rows are held for.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Starts a row; its cells are written in column order, then [`RowWriter::end`].
    #[doc(hidden)]
    pub fn row(&mut self) -> RowWriter<'_> {
        if let Store::Json(json) = &mut self.store {
            json.pop(); // the closing `]`
            if self.rows > 0 {
                json.push(',');
            }
            json.push('[');
        }
        RowWriter {
            rows: self,
            column: 0,
        }
    }

    /// The parameters of a statement: `lead`, which binds `$1…$first-1`, then the batch from
    /// `$first` on (one JSON text on SQLite, one array per column on Postgres).
    #[doc(hidden)]
    pub fn params<'a>(&'a self, lead: Params<'a>, first: usize) -> Vec<&'a dyn ToValue> {
        debug_assert_eq!(
            lead.len() + 1,
            first,
            "the batch binds from ${first}: give exactly the parameters before it"
        );
        let mut out: Vec<&'a dyn ToValue> = Vec::with_capacity(lead.len() + self.types.len());
        out.extend_from_slice(lead);
        match &self.store {
            Store::Json(json) => out.push(json),
            Store::Columns(columns) => out.extend(columns.iter().map(|c| c as &dyn ToValue)),
        }
        out
    }
}

/// Writes the cells of one row of a [`BatchRows`], in column order.
#[doc(hidden)]
#[derive(Debug)]
pub struct RowWriter<'a> {
    rows: &'a mut BatchRows,
    column: usize,
}

impl RowWriter<'_> {
    /// Moves to the next column, which must be of type `ty`; on SQLite writes the separator.
    /// Returns the JSON buffer on SQLite, the column on Postgres.
    fn next(&mut self, ty: BatchType) -> Cell<'_> {
        let column = self.column;
        let declared = self.rows.types.get(column).copied();
        // The declaring macro writes the cells from the column list, so a mismatch is a bug
        // in it, not in a caller: fail loudly rather than bind misaligned rows.
        assert!(
            declared == Some(ty),
            "batch column {column} is {}, written as {}",
            declared.map_or("missing", BatchType::name),
            ty.name()
        );
        self.column += 1;
        match &mut self.rows.store {
            Store::Json(json) => {
                if column > 0 {
                    json.push(',');
                }
                Cell::Json(json)
            }
            Store::Columns(columns) => Cell::Column(&mut columns[column].0),
        }
    }

    /// A `bigint` cell.
    pub fn int(&mut self, v: Option<i64>) {
        match self.next(BatchType::Int) {
            Cell::Json(json) => json::int(json, v),
            Cell::Column(Elements::Int(c)) => c.push(v),
            Cell::Column(_) => unreachable!("checked by next"),
        }
    }

    /// A `text` cell.
    pub fn text(&mut self, v: Option<&str>) {
        match self.next(BatchType::Text) {
            Cell::Json(json) => json::text(json, v),
            Cell::Column(Elements::Text { text, ends }) => ends.push(v.map(|s| {
                text.push_str(s);
                text.len()
            })),
            Cell::Column(_) => unreachable!("checked by next"),
        }
    }

    /// A `boolean` cell.
    pub fn bool(&mut self, v: Option<bool>) {
        match self.next(BatchType::Bool) {
            Cell::Json(json) => json::bool(json, v),
            Cell::Column(Elements::Bool(c)) => c.push(v),
            Cell::Column(_) => unreachable!("checked by next"),
        }
    }

    /// A `timestamptz` cell.
    pub fn timestamp(&mut self, v: Option<Timestamp>) {
        match self.next(BatchType::Timestamp) {
            Cell::Json(json) => json::timestamp(json, v),
            Cell::Column(Elements::Timestamp(c)) => c.push(v),
            Cell::Column(_) => unreachable!("checked by next"),
        }
    }

    /// Ends the row, which must have had every column.
    pub fn end(self) {
        assert_eq!(
            self.column,
            self.rows.types.len(),
            "a batch row needs every column"
        );
        if let Store::Json(json) = &mut self.rows.store {
            json.push_str("]]");
        }
        self.rows.rows += 1;
    }
}

enum Cell<'a> {
    Json(&'a mut String),
    Column(&'a mut Elements),
}

/// JSON writers for the cells of a SQLite batch, straight into the one buffer: no value tree
/// and no string per cell. `->>` reads each back as SQLite would store the value bound
/// directly: an integer, text (the timestamp text form), 0 / 1 for booleans, NULL.
mod json {
    use super::*;

    pub(super) fn int(out: &mut String, v: Option<i64>) {
        match v {
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => out.push_str("null"),
        }
    }

    pub(super) fn bool(out: &mut String, v: Option<bool>) {
        out.push_str(match v {
            Some(true) => "1",
            Some(false) => "0",
            None => "null",
        });
    }

    pub(super) fn timestamp(out: &mut String, v: Option<Timestamp>) {
        match v {
            Some(t) => {
                out.push('"');
                t.write_sqlite_text(out);
                out.push('"');
            }
            None => out.push_str("null"),
        }
    }

    /// A JSON string written as `serde_json` writes it: `"` and `\` escaped, control
    /// characters as `\n`, `\r`, `\t`, `\b`, `\f` or `\u00xx`; everything else, non-ASCII included, as it is (JSON text is UTF-8).
    pub(super) fn text(out: &mut String, v: Option<&str>) {
        let Some(s) = v else {
            out.push_str("null");
            return;
        };
        out.push('"');
        let mut run = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            // Every byte escaped is ASCII, so `i` is a character boundary.
            out.push_str(&s[run..i]);
            if escaped.is_empty() {
                let _ = write!(out, "\\u{b:04x}");
            } else {
                out.push_str(escaped);
            }
            run = i + 1;
        }
        out.push_str(&s[run..]);
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: &[BatchType] = &[
        BatchType::Int,
        BatchType::Text,
        BatchType::Bool,
        BatchType::Timestamp,
    ];

    fn push(rows: &mut BatchRows, i: Option<i64>, s: Option<&str>, b: Option<bool>) {
        let mut row = rows.row();
        row.int(i);
        row.text(s);
        row.bool(b);
        row.timestamp(i.map(Timestamp::from_millis));
        row.end();
    }

    #[test]
    fn sqlite_rows_are_one_json_array() {
        let mut rows = BatchRows::new(Dialect::Sqlite, TYPES, 2);
        let params = rows.params(&[], 1);
        assert_eq!(params.len(), 1);
        assert_eq!(params[0].to_value(), Value::Text("[]".into()));
        push(&mut rows, Some(7), Some("a\"b"), Some(true));
        push(&mut rows, None, None, None);
        assert_eq!(rows.len(), 2);
        let params = rows.params(&[&"host"], 2);
        assert_eq!(params.len(), 2);
        assert_eq!(params[0].to_value(), Value::Text("host".into()));
        assert_eq!(
            params[1].to_value(),
            Value::Text(r#"[[7,"a\"b",1,"1970-01-01 00:00:00.007"],[null,null,null,null]]"#.into())
        );
    }

    #[test]
    fn postgres_rows_are_one_array_per_column() {
        let mut rows = BatchRows::new(Dialect::Postgres, TYPES, 2);
        push(&mut rows, Some(7), Some("héllo"), Some(false));
        push(&mut rows, None, None, None);
        push(&mut rows, Some(-1), Some(""), Some(true));
        let params: Vec<Value> = rows.params(&[], 1).iter().map(|p| p.to_value()).collect();
        let Value::BatchColumn(texts) = &params[1] else {
            panic!("{params:?}")
        };
        assert_eq!(
            texts.texts().collect::<Vec<_>>(),
            vec![Some("héllo"), None, Some("")]
        );
        assert_eq!(
            params,
            vec![
                Value::BatchColumn(BatchColumn(Elements::Int(vec![Some(7), None, Some(-1)]))),
                texts.to_value(),
                Value::BatchColumn(BatchColumn(Elements::Bool(vec![
                    Some(false),
                    None,
                    Some(true)
                ]))),
                Value::BatchColumn(BatchColumn(Elements::Timestamp(vec![
                    Some(Timestamp::from_millis(7)),
                    None,
                    Some(Timestamp::from_millis(-1)),
                ]))),
            ]
        );
        assert_eq!(texts.to_json(), r#"["héllo",null,""]"#);
    }

    #[test]
    fn json_text_matches_serde_json() {
        let nasty = [
            "",
            "plain",
            "quote \" and 'single'",
            "back\\slash",
            "new\nline\r\ttab",
            "\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f}",
            "ünïcødé ✓ 🦀",
            "'); DROP TABLE harmony_task; --",
        ];
        for s in nasty {
            let mut out = String::new();
            json::text(&mut out, Some(s));
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, s, "{out}");
            assert_eq!(out, serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    #[should_panic(expected = "batch column 0 is bigint, written as text")]
    fn a_cell_of_the_wrong_type_is_refused() {
        let mut rows = BatchRows::new(Dialect::Postgres, TYPES, 1);
        rows.row().text(Some("x"));
    }

    #[test]
    #[should_panic(expected = "a batch row needs every column")]
    fn a_short_row_is_refused() {
        let mut rows = BatchRows::new(Dialect::Sqlite, TYPES, 1);
        let mut row = rows.row();
        row.int(Some(1));
        row.end();
    }
}
