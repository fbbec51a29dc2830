//! Configuration layers: TOML documents stored by title (`harmonytask::Admin::config_*`), read
//! by `harmony run --layers a,b` after `base`, and merged key by key, later layers winning.
//!
//! ```toml
//! [engine]                 # the node's settings (flags and HARMONY_* variables win)
//! poll_interval = "5s"
//! claim_batch_max = 50
//! cpu = 4                  # the budget: cpu, ram ("16GiB"), gpu
//!
//! [[task]]                 # task types, as in a tasks file
//! name = "transcode"
//! command = ["ffmpeg", "-i", "{arg.input}", "out.mp4"]
//! max = 2
//!
//! [type.transcode]         # a type's own section: its command gets it as JSON in
//! preset = "slow"          # HARMONY_TYPE_CONFIG
//! ```
//!
//! Merging: tables merge key by key; a `[[task]]` entry replaces the earlier entry of the same
//! `name` whole (a task type is declared in one piece) and otherwise adds a type. Precedence:
//! flags > environment (`HARMONY_POLL_INTERVAL`, …) > layers > defaults.
//!
//! This module only reads text: every layer is checked on its own when it is written
//! ([`check`]), and the merged layers again when a node applies them ([`resolve`]), so a node
//! never applies a half-valid layer. Errors name the layer, the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use harmonytask::{ByteSize, EngineConfig};
use serde::Deserialize;
use toml::{Spanned, Table, Value};

use crate::taskfile::{self, TaskFileError, TaskSpec};

/// The layer every node reads first.
pub const BASE: &str = "base";

/// Longest layer title accepted (the column's width).
pub const TITLE_BYTES_MAX: usize = 300;

/// Largest layer accepted.
pub const LAYER_BYTES_MAX: usize = 1 << 20;

/// The typed keys of `[engine]`, in the order shown.
pub const ENGINE_KEYS: &[&str] = &[
    "cpu",
    "ram",
    "gpu",
    "poll_interval",
    "poll_interval_unhealthy",
    "heartbeat_interval",
    "dead_after",
    "reaper_interval",
    "shutdown_grace",
    "claim_batch_max",
];

/// Largest `claim_batch_max` accepted.
const CLAIM_BATCH_MAX_MAX: i64 = 100_000;

/// The environment variable that sets an `[engine]` key: `HARMONY_POLL_INTERVAL`.
pub fn env_var(key: &str) -> String {
    format!("HARMONY_{}", key.to_ascii_uppercase())
}

/// A layer (or the merged layers) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A value, section or the TOML itself is wrong at a known place.
    #[error("layer {layer:?}{}: {key}{}{problem}", line.map(|l| format!(" line {l}")).unwrap_or_default(), if key.is_empty() { "" } else { ": " })]
    At {
        /// The layer's title.
        layer: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The key, dotted (`engine.poll_interval`); empty when the TOML does not parse.
        key: String,
        /// What is wrong and what would be accepted.
        problem: String,
    },
    /// A `[[task]]` entry is wrong (the message names the layer, line, task and field).
    #[error(transparent)]
    Tasks(#[from] TaskFileError),
    /// A layer named to `--layers` does not exist.
    #[error("layer {0:?} does not exist (see `harmony config list`)")]
    Missing(String),
    /// An environment variable for an `[engine]` key holds a bad value.
    #[error("{var}: {problem}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        problem: String,
    },
}

/// One `[engine]` value, typed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EngineValue {
    /// `cpu`, `gpu`.
    Number(f64),
    /// `ram`, bytes.
    Bytes(u64),
    /// The intervals.
    Duration(Duration),
    /// `claim_batch_max`.
    Count(usize),
}

impl fmt::Display for EngineValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineValue::Number(n) => write!(f, "{n}"),
            EngineValue::Bytes(b) => write!(f, "{}", harmonytask::resources::format_bytes(*b)),
            EngineValue::Duration(d) => write!(f, "{}", humantime::format_duration(*d)),
            EngineValue::Count(n) => write!(f, "{n}"),
        }
    }
}

/// Where a resolved value came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Source {
    /// An environment variable.
    Env(String),
    /// A layer, by title.
    Layer(String),
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Env(s) => write!(f, "env {s}"),
            Source::Layer(s) => write!(f, "layer {s}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// The layers, merged and checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The titles read, in order (missing `base` left out).
    pub titles: Vec<String>,
    /// The merged document.
    pub table: Table,
    /// The layer each leaf (dotted path) came from.
    pub origin: BTreeMap<String, String>,
    /// The `[engine]` values set by layers or the environment, with where from.
    pub engine: BTreeMap<&'static str, (EngineValue, Source)>,
    /// The task types the layers declare (each command type with its `[type.NAME]` section
    /// in `HARMONY_TYPE_CONFIG`).
    pub tasks: Vec<TaskSpec>,
    /// The merged text, which a node compares to see whether anything changed.
    pub text: String,
}

impl Resolved {
    /// No layers: every value from its default.
    pub fn empty() -> Self {
        Resolved {
            titles: Vec::new(),
            table: Table::new(),
            origin: BTreeMap::new(),
            engine: BTreeMap::new(),
            tasks: Vec::new(),
            text: String::new(),
        }
    }
}

// ---- one layer -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayer {
    engine: Option<Spanned<Table>>,
    #[serde(default)]
    task: Vec<Spanned<Table>>,
    #[serde(rename = "type", default)]
    types: BTreeMap<String, Spanned<Table>>,
}

/// Where in a layer's text, for messages.
struct Place<'a> {
    layer: &'a str,
    text: &'a str,
}

impl Place<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text
            .get(..end)
            .map_or(1, |s| s.bytes().filter(|b| *b == b'\n').count() + 1)
    }

    fn at(&self, span: Option<Range<usize>>, key: &str, problem: impl fmt::Display) -> LayerError {
        LayerError::At {
            layer: self.layer.to_owned(),
            line: span.map(|s| self.line(s.start)),
            key: key.to_owned(),
            problem: problem.to_string(),
        }
    }

    /// The key a TOML error points at: the header on its line (`[engine]`), or the key
    /// assigned there, prefixed with the table the line is in.
    fn key_at(&self, offset: usize) -> String {
        let start = self.text[..offset.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("").trim();
        let header = |l: &str| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        if line.starts_with('[') {
            return header(line);
        }
        let key = line.split('=').next().unwrap_or("").trim().to_owned();
        let table = self.text[..start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(header);
        match table {
            Some(t) if !t.is_empty() && !key.is_empty() => format!("{t}.{key}"),
            _ => key,
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> LayerError {
        let span = e.span();
        let key = span
            .clone()
            .map(|s| self.key_at(s.start))
            .unwrap_or_default();
        let mut problem = e.message().trim().to_owned();
        if problem.starts_with("unknown field") {
            problem.push_str(" (a layer has the sections [engine], [[task]] and [type.NAME])");
        }
        self.at(span, &key, problem)
    }
}

/// Checks one layer on its own, as `harmony config set` does before writing it: the TOML
/// parses, only known sections are used, every `[engine]` value is valid, and every
/// `[[task]]` entry is (types it follows may live in other layers).
pub fn check(title: &str, text: &str) -> Result<(), LayerError> {
    check_title(title)?;
    let place = Place { layer: title, text };
    if text.len() > LAYER_BYTES_MAX {
        return Err(place.at(
            None,
            "",
            format!("{} bytes; the limit is {LAYER_BYTES_MAX}", text.len()),
        ));
    }
    let raw: RawLayer = toml::from_str(text).map_err(|e| place.toml_error(&e))?;
    if let Some(engine) = &raw.engine {
        let span = engine.span();
        let values = engine_values(engine.get_ref(), |key, problem| {
            let at = key_span(text, span.clone(), key);
            place.at(Some(at), &format!("engine.{key}"), problem)
        })?;
        let mut config = EngineConfig::default();
        apply_engine(&mut config, &values);
        if let Err(e) = config.validate() {
            let at = key_span(text, span.clone(), e.field);
            return Err(place.at(Some(at), &format!("engine.{}", e.field), e.problem));
        }
    }
    for (name, section) in &raw.types {
        if let Err(e) = harmonytask::validate_name(name) {
            return Err(place.at(Some(section.span()), &format!("type.{name}"), e));
        }
    }
    let _ = raw.task;
    taskfile::parse_layer_tasks(&format!("layer {title:?}"), text, false)?;
    Ok(())
}

/// A layer title: 1 to 300 characters of `[A-Za-z0-9_.-]`.
pub fn check_title(title: &str) -> Result<(), LayerError> {
    let ok = !title.is_empty()
        && title.len() <= TITLE_BYTES_MAX
        && title
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(LayerError::At {
            layer: title.to_owned(),
            line: None,
            key: String::new(),
            problem: format!(
                "a layer title is 1 to {TITLE_BYTES_MAX} characters of letters, digits, '_', '-' and '.'"
            ),
        })
    }
}

/// The span of the line `key = …` in the table whose span starts at `table` (up to the next
/// header), or the table's own span.
fn key_span(text: &str, table: Range<usize>, key: &str) -> Range<usize> {
    let body = text.get(table.start..).unwrap_or("");
    let mut offset = 0;
    for (i, line) in body.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_start();
        if i > 0 && trimmed.starts_with('[') {
            break;
        }
        let lhs = line.split('=').next().unwrap_or("").trim();
        if line.contains('=') && lhs == key {
            return table.start + offset..table.start + offset + line.len();
        }
        offset += line.len();
    }
    table
}

/// The typed values of an `[engine]` table; `error(key, problem)` builds the error.
fn engine_values<E>(
    table: &Table,
    error: impl Fn(&str, String) -> E,
) -> Result<BTreeMap<&'static str, EngineValue>, E> {
    let mut out = BTreeMap::new();
    for (k, v) in table {
        let Some(key) = ENGINE_KEYS.iter().copied().find(|e| e == k) else {
            return Err(error(
                k,
                format!("unknown key; [engine] takes {}", ENGINE_KEYS.join(", ")),
            ));
        };
        out.insert(key, engine_value(key, v).map_err(|p| error(key, p))?);
    }
    Ok(out)
}

/// One `[engine]` value. Environment values arrive as strings and are read the same way.
pub fn engine_value(key: &str, v: &Value) -> Result<EngineValue, String> {
    match key {
        "cpu" | "gpu" => match v {
            Value::Integer(n) => Ok(EngineValue::Number(*n as f64)),
            Value::Float(f) => Ok(EngineValue::Number(*f)),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map(EngineValue::Number)
                .map_err(|_| format!("expected a number, got {s:?}")),
            other => Err(format!("expected a number, got {}", other.type_str())),
        },
        "ram" => match v {
            Value::Integer(n) => u64::try_from(*n)
                .map(EngineValue::Bytes)
                .map_err(|_| format!("must be a non-negative size, got {n}")),
            Value::String(s) => s
                .parse::<ByteSize>()
                .map(|b| EngineValue::Bytes(b.0))
                .map_err(|e| e.to_string()),
            other => Err(format!(
                "expected a size such as \"16GiB\", got {}",
                other.type_str()
            )),
        },
        "claim_batch_max" => {
            let n = match v {
                Value::Integer(n) => *n,
                Value::String(s) => s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("expected a whole number, got {s:?}"))?,
                other => return Err(format!("expected a whole number, got {}", other.type_str())),
            };
            if !(1..=CLAIM_BATCH_MAX_MAX).contains(&n) {
                return Err(format!("must be 1 to {CLAIM_BATCH_MAX_MAX}, got {n}"));
            }
            Ok(EngineValue::Count(n as usize))
        }
        _ => match v {
            Value::String(s) => humantime::parse_duration(s.trim())
                .map(EngineValue::Duration)
                .map_err(|e| format!("{e}; write a duration such as 500ms, 30s or 5m")),
            other => Err(format!(
                "expected a duration such as \"30s\", got {}",
                other.type_str()
            )),
        },
    }
}

/// Sets the engine fields the values name (the budget is left to [`budget_parts`]).
pub fn apply_engine(config: &mut EngineConfig, values: &BTreeMap<&'static str, EngineValue>) {
    for (key, v) in values {
        match (*key, *v) {
            ("poll_interval", EngineValue::Duration(d)) => config.poll_interval = d,
            ("poll_interval_unhealthy", EngineValue::Duration(d)) => {
                config.poll_interval_unhealthy = d;
            }
            ("heartbeat_interval", EngineValue::Duration(d)) => config.heartbeat_interval = d,
            ("dead_after", EngineValue::Duration(d)) => config.dead_after = d,
            ("reaper_interval", EngineValue::Duration(d)) => config.reaper_interval = d,
            ("shutdown_grace", EngineValue::Duration(d)) => config.shutdown_grace = d,
            ("claim_batch_max", EngineValue::Count(n)) => config.claim_batch_max = n,
            _ => {}
        }
    }
}

/// The budget parts the values set: (cpu, ram bytes, gpu).
pub fn budget_parts(
    values: &BTreeMap<&'static str, EngineValue>,
) -> (Option<f64>, Option<u64>, Option<f64>) {
    let num = |k| match values.get(k) {
        Some(EngineValue::Number(n)) => Some(*n),
        _ => None,
    };
    let ram = match values.get("ram") {
        Some(EngineValue::Bytes(b)) => Some(*b),
        _ => None,
    };
    (num("cpu"), ram, num("gpu"))
}

// ---- merging ---------------------------------------------------------------------------------

/// Merges layers in order (each `(title, text)` already [`check`]ed when written): later ones
/// win key by key. Returns the document and the layer of every leaf.
pub fn merge(layers: &[(String, Table)]) -> (Table, BTreeMap<String, String>) {
    let mut out = Table::new();
    let mut origin = BTreeMap::new();
    for (title, table) in layers {
        merge_into(&mut out, table, "", title, &mut origin);
    }
    (out, origin)
}

fn merge_into(
    dst: &mut Table,
    src: &Table,
    prefix: &str,
    title: &str,
    origin: &mut BTreeMap<String, String>,
) {
    for (k, v) in src {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if prefix.is_empty() && k == "task" {
            if let Value::Array(entries) = v {
                merge_tasks(dst, entries, title, origin);
            }
            continue;
        }
        match (dst.get_mut(k), v) {
            (Some(Value::Table(d)), Value::Table(s)) => merge_into(d, s, &path, title, origin),
            _ => {
                forget(origin, &path);
                record_leaves(origin, &path, v, title);
                dst.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A `[[task]]` entry replaces the earlier one of its name whole, or adds a type.
fn merge_tasks(
    dst: &mut Table,
    entries: &[Value],
    title: &str,
    origin: &mut BTreeMap<String, String>,
) {
    let list = dst
        .entry("task")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(list) = list else { return };
    for e in entries {
        let name = e
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let path = format!("task.{name}");
        forget(origin, &path);
        if let Value::Table(t) = e {
            for (k, v) in t {
                record_leaves(origin, &format!("{path}.{k}"), v, title);
            }
        }
        match list
            .iter_mut()
            .find(|o| o.get("name").and_then(Value::as_str) == Some(name.as_str()))
        {
            Some(old) => *old = e.clone(),
            None => list.push(e.clone()),
        }
    }
}

fn forget(origin: &mut BTreeMap<String, String>, path: &str) {
    let below = format!("{path}.");
    origin.retain(|k, _| k != path && !k.starts_with(&below));
}

fn record_leaves(origin: &mut BTreeMap<String, String>, path: &str, v: &Value, title: &str) {
    match v {
        Value::Table(t) => {
            for (k, v) in t {
                record_leaves(origin, &format!("{path}.{k}"), v, title);
            }
        }
        _ => {
            origin.insert(path.to_owned(), title.to_owned());
        }
    }
}

// ---- resolving -------------------------------------------------------------------------------

/// Merges the layers read (`(title, text)`, in `--layers` order after `base`) and checks the
/// result as a whole; `env` reads an environment variable. Nothing is applied unless all of
/// it is valid.
pub fn resolve(
    layers: &[(String, String)],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Resolved, LayerError> {
    let mut tables = Vec::with_capacity(layers.len());
    for (title, text) in layers {
        let place = Place { layer: title, text };
        let t: Table = toml::from_str(text).map_err(|e| place.toml_error(&e))?;
        tables.push((title.clone(), t));
    }
    let (table, origin) = merge(&tables);
    let titles: Vec<String> = layers.iter().map(|(t, _)| t.clone()).collect();
    let shown = titles.join(",");
    let merged_err = |key: &str, problem: String| LayerError::At {
        layer: shown.clone(),
        line: None,
        key: format!("engine.{key}"),
        problem,
    };
    let mut engine: BTreeMap<&'static str, (EngineValue, Source)> = BTreeMap::new();
    if let Some(Value::Table(e)) = table.get("engine") {
        for (key, v) in engine_values(e, merged_err)? {
            let from = origin
                .get(&format!("engine.{key}"))
                .cloned()
                .unwrap_or_default();
            engine.insert(key, (v, Source::Layer(from)));
        }
    }
    for key in ENGINE_KEYS {
        let var = env_var(key);
        if let Some(s) = env(&var) {
            let v = engine_value(key, &Value::String(s)).map_err(|problem| LayerError::Env {
                var: var.clone(),
                problem,
            })?;
            engine.insert(key, (v, Source::Env(var)));
        }
    }
    let text = toml::to_string(&table).map_err(|e| LayerError::At {
        layer: shown.clone(),
        line: None,
        key: String::new(),
        problem: e.to_string(),
    })?;
    let mut tasks = taskfile::parse_layer_tasks(&format!("layers {shown} (merged)"), &text, true)?;
    if let Some(Value::Table(types)) = table.get("type") {
        for spec in &mut tasks {
            if let Some(section) = types.get(spec.name())
                && matches!(spec.kind, taskfile::TaskKind::Command(_))
            {
                let json = serde_json::to_string(section).unwrap_or_default();
                spec.env.insert("HARMONY_TYPE_CONFIG".into(), json);
            }
        }
    }
    Ok(Resolved {
        titles,
        table,
        origin,
        engine,
        tasks,
        text,
    })
}

/// The titles a node reads for `--layers`: `base` first (when it exists; `base_exists`), then
/// the ones named, each once.
pub fn titles(named: &[String], base_exists: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if base_exists {
        out.push(BASE.to_owned());
    }
    for n in named {
        let n = n.trim();
        if !n.is_empty() && !out.iter().any(|o| o == n) {
            out.push(n.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(title: &str, text: &str) -> (String, String) {
        (title.to_owned(), text.to_owned())
    }

    #[test]
    fn later_layers_win_key_by_key() {
        let base = layer(
            "base",
            "[engine]\npoll_interval = \"30s\"\nclaim_batch_max = 10\n[type.t]\na = 1\nb = 2\n",
        );
        let a = layer(
            "a",
            "[engine]\npoll_interval = \"5s\"\n[type.t]\nb = 3\n[[task]]\nname = \"t\"\nbuiltin = \"bench_noop\"\nmax = 1\n",
        );
        let b = layer(
            "b",
            "[[task]]\nname = \"t\"\nbuiltin = \"bench_noop\"\nmax = 4\n",
        );
        let r = resolve(&[base, a, b], |_| None).unwrap();
        assert_eq!(
            r.engine["poll_interval"],
            (
                EngineValue::Duration(Duration::from_secs(5)),
                Source::Layer("a".into())
            )
        );
        assert_eq!(
            r.engine["claim_batch_max"],
            (EngineValue::Count(10), Source::Layer("base".into()))
        );
        assert_eq!(r.origin["type.t.a"], "base");
        assert_eq!(r.origin["type.t.b"], "a");
        assert_eq!(r.origin["task.t.max"], "b");
        assert_eq!(r.tasks.len(), 1);
        assert_eq!(r.tasks[0].details.max.as_ref().map(|l| l.max()), Some(4));
    }

    #[test]
    fn environment_beats_layers() {
        let a = layer("a", "[engine]\npoll_interval = \"5s\"\n");
        let r = resolve(&[a], |v| {
            (v == "HARMONY_POLL_INTERVAL").then(|| "2s".to_owned())
        })
        .unwrap();
        assert_eq!(
            r.engine["poll_interval"],
            (
                EngineValue::Duration(Duration::from_secs(2)),
                Source::Env("HARMONY_POLL_INTERVAL".into())
            )
        );
        let bad = resolve(&[], |v| (v == "HARMONY_CPU").then(|| "many".to_owned()));
        assert!(bad.unwrap_err().to_string().starts_with("HARMONY_CPU:"));
    }

    #[test]
    fn bad_layers_name_line_and_key() {
        let e = check(
            "a",
            "[engine]\npoll_interval = \"5s\"\nheartbeat_interval = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("layer \"a\" line 3: engine.heartbeat_interval:"),
            "{e}"
        );
        let e = check("a", "[engine]\n\ndead_after = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("layer \"a\" line 3: engine.dead_after:"),
            "{e}"
        );
        let e = check("a", "[engine]\npoll = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("layer \"a\" line 2: engine.poll:"), "{e}");
        let e = check("a", "[enigne]\nx = 1\n").unwrap_err().to_string();
        assert!(e.starts_with("layer \"a\" line 1: enigne:"), "{e}");
        let e = check("a", "x = = 1\n").unwrap_err().to_string();
        assert!(e.starts_with("layer \"a\" line 1:"), "{e}");
        let e = check(
            "a",
            "[[task]]\nname = \"t\"\nbuiltin = \"bench_noop\"\nmax = -1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4") && e.contains("max"), "{e}");
        assert!(check("bad title", "").is_err());
        assert!(check("a", "[engine]\nclaim_batch_max = 5\n").is_ok());
    }

    #[test]
    fn base_comes_first_once() {
        let t = titles(&["a".into(), "base".into(), "b".into(), "a".into()], true);
        assert_eq!(t, ["base", "a", "b"]);
        assert_eq!(titles(&["a".into()], false), ["a"]);
    }
}
