//! The tasks file (`harmony run --tasks FILE`): task types declared in TOML, either running a
//! command or running a built-in's behaviour under another name.
//!
//! ```toml
//! [[task]]
//! name = "transcode"
//! command = ["ffmpeg", "-i", "{arg.input}", "out-{task_id}.mp4"]
//! cost = { cpu = 2, ram = "4GiB", gpu = 0.5 }
//! # cost.storage = "64GiB" reserves space on a storage path of the node for the task's life
//! # (cost.storage_kind = "seal" or "store", the default); the command finds it in
//! # HARMONY_STORAGE_PATH
//! max = 2
//! max_failures = 3
//! retry_wait = "10s"        # or { initial = "1s", factor = 2.0, max = "1m" }
//! timeout = "5m"
//! env = { KEY = "value" }
//! kill_grace = "30s"        # SIGTERM first when cancelled; SIGKILL after this (default 10s)
//!
//! [[task]]
//! name = "thumbnail"
//! builtin = "bench_sleep"
//! follows = ["transcode"]   # one task per successful transcode, exactly once cluster-wide
//! may_follow = ["transcode"] # ordering hint: finish pipelines before starting new ones
//! # singleton = "10m"       # at most one in the cluster, run every 10 minutes
//! # time_sensitive = true   # goes first; may preempt ordinary work
//! # uninterruptible = true  # never preempted; awaited at shutdown
//! # can_yield = true        # gives way while the node is cordoned
//! ```
//!
//! Tasks created by `follows` and `singleton` carry no arguments, so such a command type may
//! not use `{arg.NAME}`. Every type named in `follows` or `may_follow` must be declared in the
//! same file or be built in, and neither may form a cycle.
//!
//! Parsing is strict (`deny_unknown_fields`) and every error names the file, the line, the task
//! and the field, and says what would be accepted. This module only turns text into
//! [`TaskSpec`]s; `catalog` turns those into registered task types.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use harmony_bench::builtin::BUILTIN_TYPES;
use harmonytask::graph::find_cycle;
use harmonytask::{
    ByteSize, Follow, Limiter, Resource, Resources, RetryWait, StorageKind, StorageNeed,
    TypeDetails, validate_name,
};
use serde::Deserialize;
use toml::Spanned;

use crate::command_task::{KILL_GRACE_DEFAULT, Template};

/// Largest per-node or cluster-wide concurrency limit accepted (anything above is a typo).
const LIMIT_MAX: i64 = 1_000_000;
/// Most task types one file may declare.
const TASKS_MAX: usize = 1000;
/// Largest tasks file read.
const FILE_BYTES_MAX: u64 = 4 << 20;
/// Longest `kill_grace` accepted: a node's shutdown waits this long for such a command.
const KILL_GRACE_MAX: Duration = Duration::from_secs(3600);

/// A tasks file that cannot be used; the message names file, line, task and field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskFileError(pub String);

/// What a declared type runs.
#[derive(Debug, Clone)]
pub enum TaskKind {
    /// A command line: program and arguments, each a template.
    Command(Vec<Template>),
    /// A built-in type's behaviour (one of `harmony_bench::builtin::BUILTIN_TYPES`).
    Builtin(&'static str),
}

/// One declared task type.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// What it runs.
    pub kind: TaskKind,
    /// Name, cost and limits, as the engine will see them.
    pub details: TypeDetails,
    /// Extra environment for commands.
    pub env: BTreeMap<String, String>,
    /// Commands: how long a cancelled attempt's program has between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Line of the `[[task]]` entry, for messages.
    pub line: usize,
}

impl TaskSpec {
    /// The type name.
    pub fn name(&self) -> &str {
        &self.details.name
    }
}

/// Reads and checks a tasks file.
///
/// Only a regular file is read, and never more than `FILE_BYTES_MAX` bytes of it, whatever
/// size it reports: opening a FIFO would block until some writer appears, and a device such as
/// `/dev/zero` never ends.
pub fn load(path: &Path) -> Result<Vec<TaskSpec>, TaskFileError> {
    let shown = path.display().to_string();
    let cannot = |e: std::io::Error| TaskFileError(format!("cannot read tasks file {shown}: {e}"));
    // Checked before opening, because opening a FIFO is what blocks.
    let meta = std::fs::metadata(path).map_err(cannot)?;
    check_regular(&shown, &meta)?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(too_large(&shown, &meta.len().to_string()));
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    // The path may have been replaced between the two looks; what was opened is what counts.
    check_regular(&shown, &file.metadata().map_err(cannot)?)?;
    let bytes = read_bounded(file, FILE_BYTES_MAX)
        .map_err(cannot)?
        .ok_or_else(|| too_large(&shown, &format!("more than {FILE_BYTES_MAX}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        TaskFileError(format!(
            "cannot read tasks file {shown}: it is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    parse(&shown, &text)
}

fn check_regular(shown: &str, meta: &std::fs::Metadata) -> Result<(), TaskFileError> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    };
    Err(TaskFileError(format!(
        "tasks file {shown} is {what}, not a regular file; give the path of a TOML file"
    )))
}

fn too_large(shown: &str, size: &str) -> TaskFileError {
    TaskFileError(format!(
        "tasks file {shown} is {size} bytes; the limit is {FILE_BYTES_MAX}"
    ))
}

/// Reads `r` to its end if that is at most `limit` bytes; `None` when there is more.
fn read_bounded(r: impl std::io::Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "more".
    r.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    task: Vec<Spanned<RawTask>>,
}

/// A config layer as far as its tasks go: the other sections are read by `layers`.
#[derive(Deserialize)]
struct RawLayerTasks {
    #[serde(default)]
    task: Vec<Spanned<RawTask>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: Spanned<String>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
    builtin: Option<Spanned<String>>,
    cost: Option<Spanned<RawCost>>,
    max: Option<Spanned<i64>>,
    max_cluster: Option<Spanned<i64>>,
    max_failures: Option<Spanned<i64>>,
    retry_wait: Option<Spanned<RawRetryWait>>,
    timeout: Option<Spanned<String>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    kill_grace: Option<Spanned<String>>,
    follows: Option<Spanned<Vec<Spanned<String>>>>,
    may_follow: Option<Spanned<Vec<Spanned<String>>>>,
    singleton: Option<Spanned<String>>,
    time_sensitive: Option<Spanned<bool>>,
    uninterruptible: Option<Spanned<bool>>,
    can_yield: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCost {
    cpu: Option<Spanned<f64>>,
    ram: Option<Spanned<RawSize>>,
    gpu: Option<Spanned<f64>>,
    storage: Option<Spanned<RawSize>>,
    storage_kind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a size such as \"4GiB\" or \"512MiB\", or a number of bytes"
)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a duration such as \"10s\", or a table { initial = \"1s\", factor = 2.0, max = \"1m\" }"
)]
enum RawRetryWait {
    Constant(String),
    Exponential(RawExponential),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExponential {
    initial: String,
    factor: f64,
    max: String,
}

/// Only the names and extents of the entries, read leniently to say which task a syntax or
/// type error belongs to.
#[derive(Deserialize)]
struct Outline {
    #[serde(default)]
    task: Vec<Spanned<OutlineTask>>,
}

#[derive(Deserialize)]
struct OutlineTask {
    name: Option<toml::Value>,
}

// ---- parsing ---------------------------------------------------------------------------------

/// Where in the file, for messages.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text
            .get(..end)
            .map_or(1, |s| s.bytes().filter(|b| *b == b'\n').count() + 1)
    }

    /// `FILE line N: task "x": field: message`.
    fn error(
        &self,
        span: Range<usize>,
        task: Option<&str>,
        field: &str,
        msg: impl fmt::Display,
    ) -> TaskFileError {
        let mut s = format!("{} line {}: ", self.file, self.line(span.start));
        if let Some(t) = task {
            s.push_str(&format!("task {t:?}: "));
        }
        if !field.is_empty() {
            s.push_str(field);
            s.push_str(": ");
        }
        s.push_str(&msg.to_string());
        TaskFileError(s)
    }

    /// A message for a serde/TOML error, with the task and the key it points at.
    fn toml_error(&self, e: &toml::de::Error) -> TaskFileError {
        // serde speaks Rust; say what to write instead.
        let message = e
            .message()
            .trim()
            .replace("expected i64", "expected a whole number")
            .replace("expected f64", "expected a number")
            .replace("expected a boolean", "expected true or false")
            .replace("expected a sequence", "expected an array");
        let Some(span) = e.span() else {
            return TaskFileError(format!("{}: {message}", self.file));
        };
        let task = self.task_at(span.start);
        let key = self.key_before(span.start);
        let hint = if message.starts_with("unknown field") {
            " (remove it or fix its spelling)"
        } else if message.starts_with("missing field") {
            " (add it)"
        } else {
            ""
        };
        self.error(
            span,
            task.as_deref(),
            key.as_deref().unwrap_or(""),
            format!("{message}{hint}"),
        )
    }

    /// The name of the `[[task]]` entry containing `offset`, if the file reads that far.
    fn task_at(&self, offset: usize) -> Option<String> {
        let outline: Outline = toml::from_str(self.text).ok()?;
        let entry = outline
            .task
            .iter()
            .filter(|t| t.span().start <= offset)
            .max_by_key(|t| t.span().start)?;
        match &entry.get_ref().name {
            Some(toml::Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The key assigned on the line of `offset`, just before it (`cpu` in `cost = { cpu = -1 }`
    /// when the offset points at `-1`).
    fn key_before(&self, offset: usize) -> Option<String> {
        let before = self.text.get(..offset.min(self.text.len()))?;
        let line = before.rsplit('\n').next()?;
        let lhs = line.trim_end().strip_suffix('=')?.trim_end();
        let key: String = lhs
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        (!key.is_empty()).then_some(key)
    }
}

/// Parses and checks the text of a tasks file; `file` is how messages name it.
pub fn parse(file: &str, text: &str) -> Result<Vec<TaskSpec>, TaskFileError> {
    let src = Source { file, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    specs_of(&src, raw, true)
}

/// Parses and checks the `[[task]]` entries of a config layer, whose other sections are
/// someone else's. With `check_refs` off, `follows` and `may_follow` may name types declared
/// in other layers (a single layer is checked that way; the merged layers with it on).
pub fn parse_layer_tasks(
    file: &str,
    text: &str,
    check_refs: bool,
) -> Result<Vec<TaskSpec>, TaskFileError> {
    let src = Source { file, text };
    let raw: RawLayerTasks = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    specs_of(&src, RawFile { task: raw.task }, check_refs)
}

fn specs_of(
    src: &Source<'_>,
    raw: RawFile,
    check_refs_on: bool,
) -> Result<Vec<TaskSpec>, TaskFileError> {
    let file = src.file;
    if raw.task.len() > TASKS_MAX {
        return Err(TaskFileError(format!(
            "{file}: {} task types declared; the limit is {TASKS_MAX}",
            raw.task.len()
        )));
    }
    let mut specs: Vec<TaskSpec> = Vec::with_capacity(raw.task.len());
    let mut refs: Vec<Refs> = Vec::with_capacity(raw.task.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for entry in raw.task {
        let entry_span = entry.span();
        let (spec, r) = task_spec(src, entry_span.clone(), entry.into_inner())?;
        refs.push(r);
        let name = spec.name().to_owned();
        if BUILTIN_TYPES.contains(&name.as_str()) {
            return Err(src.error(
                entry_span,
                Some(&name),
                "name",
                format!("{name:?} is a built-in type; pick another name (use builtin = {name:?} to run its behaviour under a new name)"),
            ));
        }
        if let Some(first) = seen.insert(name.clone(), spec.line) {
            return Err(src.error(
                entry_span,
                Some(&name),
                "name",
                format!("already declared on line {first}; task type names must be unique"),
            ));
        }
        specs.push(spec);
    }
    if check_refs_on {
        check_refs(src, &specs, &refs)?;
    }
    Ok(specs)
}

/// The type names one entry refers to, with where they are written.
#[derive(Default)]
struct Refs {
    follows: Vec<(String, Range<usize>)>,
    may_follow: Vec<(String, Range<usize>)>,
}

/// Every type named in `follows` / `may_follow` is declared or built in, and neither relation
/// has a cycle (a follow cycle would create tasks forever; a `may_follow` cycle has no order).
fn check_refs(src: &Source<'_>, specs: &[TaskSpec], refs: &[Refs]) -> Result<(), TaskFileError> {
    let declared: Vec<&str> = specs.iter().map(TaskSpec::name).collect();
    for (spec, r) in specs.iter().zip(refs) {
        for (field, list) in [("follows", &r.follows), ("may_follow", &r.may_follow)] {
            for (name, span) in list {
                if !declared.contains(&name.as_str()) && !BUILTIN_TYPES.contains(&name.as_str()) {
                    return Err(src.error(
                        span.clone(),
                        Some(spec.name()),
                        field,
                        format!(
                            "unknown task type {name:?}; declare it in this file or use a built-in ({})",
                            BUILTIN_TYPES.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    for (field, verb, pick) in [
        (
            "follows",
            "follows",
            (|r: &Refs| &r.follows) as fn(&Refs) -> &Vec<_>,
        ),
        ("may_follow", "may follow", |r: &Refs| &r.may_follow),
    ] {
        let edges: Vec<Vec<usize>> = refs
            .iter()
            .map(|r| {
                pick(r)
                    .iter()
                    .filter_map(|(n, _)| declared.iter().position(|d| d == n))
                    .collect()
            })
            .collect();
        if let Some(cycle) = find_cycle(&edges) {
            let (first, second) = (cycle[0], cycle[1]);
            let span = pick(&refs[first])
                .iter()
                .find(|(n, _)| n == declared[second])
                .map_or(0..0, |(_, s)| s.clone());
            let path: Vec<&str> = cycle.iter().map(|&i| declared[i]).collect();
            let msg = if cycle.len() == 2 {
                format!("{} names itself", path[0])
            } else {
                format!("cycle {} (each {verb} the next)", path.join(" -> "))
            };
            let msg = if field == "follows" {
                format!("{msg}; every completion would create another task forever")
            } else {
                msg
            };
            return Err(src.error(span, Some(declared[first]), field, msg));
        }
    }
    Ok(())
}

fn task_spec(
    src: &Source<'_>,
    span: Range<usize>,
    t: RawTask,
) -> Result<(TaskSpec, Refs), TaskFileError> {
    let name_span = t.name.span();
    let name = t.name.into_inner();
    validate_name(&name).map_err(|e| src.error(name_span.clone(), Some(&name), "name", e))?;
    let task = Some(name.as_str());
    let err = |span: Range<usize>, field: &str, msg: String| src.error(span, task, field, msg);

    let kind = match (t.command, t.builtin) {
        (Some(_), Some(b)) => {
            return Err(err(
                b.span(),
                "builtin",
                "give either command or builtin, not both".into(),
            ));
        }
        (None, None) => {
            return Err(err(
                span.clone(),
                "command",
                "missing: give command = [\"program\", \"arg\", …] or builtin = \"bench_sleep\""
                    .into(),
            ));
        }
        (Some(cmd), None) => {
            let cmd_span = cmd.span();
            let parts = cmd.into_inner();
            if parts.is_empty() || parts[0].get_ref().trim().is_empty() {
                return Err(err(
                    cmd_span,
                    "command",
                    "must start with the program to run, e.g. [\"ffmpeg\", \"-i\", \"{arg.input}\"]"
                        .into(),
                ));
            }
            let mut templates = Vec::with_capacity(parts.len());
            for (i, p) in parts.into_iter().enumerate() {
                let s = p.span();
                // The operating system cannot pass a NUL inside an argument: every run would
                // fail to start the program.
                if p.get_ref().contains('\0') {
                    return Err(err(
                        s,
                        "command",
                        format!(
                            "element {i} ({:?}) contains a NUL character, which no program argument can hold; remove it",
                            p.get_ref()
                        ),
                    ));
                }
                templates.push(Template::parse(p.get_ref()).map_err(|e| err(s, "command", e))?);
            }
            TaskKind::Command(templates)
        }
        (None, Some(b)) => {
            let s = b.span();
            let wanted = b.into_inner();
            let Some(found) = BUILTIN_TYPES.iter().find(|n| **n == wanted) else {
                return Err(err(
                    s,
                    "builtin",
                    format!(
                        "unknown built-in {wanted:?}; use one of {}",
                        BUILTIN_TYPES.join(", ")
                    ),
                ));
            };
            TaskKind::Builtin(found)
        }
    };

    let mut details = TypeDetails::new(name.clone());
    if let Some(cost) = t.cost {
        let mut cost = cost.into_inner();
        details.storage = storage_of(src, task, cost.storage.take(), cost.storage_kind.take())?;
        details.cost = cost_of(src, task, cost)?;
    }
    if let Some(max) = t.max {
        let n = limit(src, task, "max", &max, LIMIT_MAX)?;
        if n > 0 {
            details.max = Some(Limiter::new(n as usize));
        }
    }
    if let Some(mc) = t.max_cluster {
        details.max_cluster = limit(src, task, "max_cluster", &mc, LIMIT_MAX)? as usize;
    }
    if let Some(mf) = t.max_failures {
        details.max_failures = limit(src, task, "max_failures", &mf, i64::from(u32::MAX))? as u32;
    }
    if let Some(rw) = t.retry_wait {
        let s = rw.span();
        details.retry_wait = match rw.into_inner() {
            RawRetryWait::Constant(d) => {
                RetryWait::constant(duration(&d).map_err(|e| err(s, "retry_wait", e))?)
            }
            RawRetryWait::Exponential(x) => {
                let initial =
                    duration(&x.initial).map_err(|e| err(s.clone(), "retry_wait.initial", e))?;
                let max = duration(&x.max).map_err(|e| err(s.clone(), "retry_wait.max", e))?;
                if !(x.factor.is_finite() && x.factor >= 1.0) {
                    return Err(err(
                        s,
                        "retry_wait.factor",
                        format!("must be a number ≥ 1, got {}", x.factor),
                    ));
                }
                if max < initial {
                    return Err(err(
                        s,
                        "retry_wait.max",
                        "must not be shorter than retry_wait.initial".into(),
                    ));
                }
                RetryWait::exponential(initial, x.factor, max)
            }
        };
    }
    if let Some(to) = t.timeout {
        let s = to.span();
        let d = duration(to.get_ref()).map_err(|e| err(s.clone(), "timeout", e))?;
        if d.is_zero() {
            return Err(err(
                s,
                "timeout",
                "must be positive; leave it out for no timeout".into(),
            ));
        }
        details.timeout = Some(d);
    }
    let mut env = BTreeMap::new();
    if let Some(e) = t.env {
        let s = e.span();
        for (k, v) in e.into_inner() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(err(
                    s,
                    "env",
                    format!("{k:?} is not a valid environment variable name"),
                ));
            }
            if v.contains('\0') {
                return Err(err(
                    s,
                    "env",
                    format!("the value of {k} contains a NUL character"),
                ));
            }
            env.insert(k, v);
        }
    }
    let mut kill_grace = KILL_GRACE_DEFAULT;
    if let Some(g) = t.kill_grace {
        let s = g.span();
        if let TaskKind::Builtin(_) = kind {
            return Err(err(
                s,
                "kill_grace",
                "only command types run a program to signal; remove it".into(),
            ));
        }
        kill_grace = duration(g.get_ref()).map_err(|e| err(s.clone(), "kill_grace", e))?;
        if kill_grace > KILL_GRACE_MAX {
            return Err(err(
                s,
                "kill_grace",
                format!(
                    "{} is absurdly long (the limit is {}; a node's shutdown waits this long)",
                    humantime::format_duration(kill_grace),
                    humantime::format_duration(KILL_GRACE_MAX)
                ),
            ));
        }
    }
    let mut refs = Refs::default();
    if let Some(list) = t.follows {
        refs.follows = names(src, task, "follows", list)?;
        for (from, _) in &refs.follows {
            details.follows.push(Follow::chain(from.clone()));
        }
    }
    if let Some(list) = t.may_follow {
        refs.may_follow = names(src, task, "may_follow", list)?;
        details.may_follow = refs.may_follow.iter().map(|(n, _)| n.clone()).collect();
    }
    if let Some(every) = t.singleton {
        let s = every.span();
        let d = duration(every.get_ref()).map_err(|e| err(s.clone(), "singleton", e))?;
        if d.is_zero() {
            return Err(err(
                s,
                "singleton",
                "must be a positive interval such as \"1m\" (the shortest time between two runs)"
                    .into(),
            ));
        }
        details = details.singleton(d);
    }
    // Follow-ups and singleton runs are added by the engine, without arguments.
    if let TaskKind::Command(argv) = &kind
        && let Some(arg) = argv.iter().flat_map(Template::arg_names).next()
    {
        let why = if details.iambored.is_some() {
            Some("singleton")
        } else if !details.follows.is_empty() {
            Some("follows")
        } else {
            None
        };
        if let Some(field) = why {
            return Err(err(
                span.clone(),
                field,
                format!(
                    "the command uses {{arg.{arg}}}, but tasks created by {field} have no arguments"
                ),
            ));
        }
    }
    if let Some(b) = t.time_sensitive {
        details.time_sensitive = b.into_inner();
    }
    if let Some(b) = t.uninterruptible {
        details.uninterruptible = b.into_inner();
    }
    if let Some(b) = t.can_yield {
        details.can_yield = b.into_inner();
    }
    // The engine checks again at registration; a failure here would be a gap in the checks
    // above, still reported against this entry.
    details
        .validate()
        .map_err(|e| err(span.clone(), "", e.to_string()))?;
    let spec = TaskSpec {
        kind,
        details,
        env,
        kill_grace,
        line: src.line(span.start),
    };
    Ok((spec, refs))
}

/// A list of task type names (`follows`, `may_follow`): each valid, none twice.
fn names(
    src: &Source<'_>,
    task: Option<&str>,
    field: &str,
    list: Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<(String, Range<usize>)>, TaskFileError> {
    let mut out: Vec<(String, Range<usize>)> = Vec::new();
    for n in list.into_inner() {
        let s = n.span();
        let name = n.into_inner();
        validate_name(&name).map_err(|e| src.error(s.clone(), task, field, e))?;
        if out.iter().any(|(o, _)| *o == name) {
            return Err(src.error(s, task, field, format!("{name:?} is listed twice")));
        }
        out.push((name, s));
    }
    Ok(out)
}

/// The storage one task of an entry reserves: `cost.storage` (a size, more than 0) of
/// `cost.storage_kind` (`seal` or `store`, default `store`).
fn storage_of(
    src: &Source<'_>,
    task: Option<&str>,
    size: Option<Spanned<RawSize>>,
    kind: Option<Spanned<String>>,
) -> Result<Option<StorageNeed>, TaskFileError> {
    let Some(size) = size else {
        if let Some(k) = kind {
            return Err(src.error(
                k.span(),
                task,
                "cost.storage_kind",
                "needs cost.storage (how much to reserve)",
            ));
        }
        return Ok(None);
    };
    let s = size.span();
    let bytes = match size.into_inner() {
        RawSize::Bytes(n) => u64::try_from(n).unwrap_or(0),
        RawSize::Text(t) => {
            t.parse::<ByteSize>()
                .map_err(|e| src.error(s.clone(), task, "cost.storage", e))?
                .0
        }
    };
    if bytes == 0 || bytes > i64::MAX as u64 {
        return Err(src.error(
            s,
            task,
            "cost.storage",
            "must be a size of more than 0 bytes, such as \"64GiB\"",
        ));
    }
    let kind = match kind {
        Some(k) => {
            let span = k.span();
            k.into_inner()
                .parse::<StorageKind>()
                .map_err(|e| src.error(span, task, "cost.storage_kind", e))?
        }
        None => StorageKind::Store,
    };
    Ok(Some(StorageNeed { bytes, kind }))
}

/// The cost of an entry. Its bounds are the engine's (`Resources::validate`); an amount out of
/// range is reported at the key that set it.
fn cost_of(src: &Source<'_>, task: Option<&str>, c: RawCost) -> Result<Resources, TaskFileError> {
    let mut r = Resources::default();
    let mut spans: Vec<(Resource, &'static str, Range<usize>)> = Vec::new();
    if let Some(cpu) = &c.cpu {
        r.cpu = *cpu.get_ref();
        spans.push((Resource::Cpu, "cost.cpu", cpu.span()));
    }
    if let Some(gpu) = &c.gpu {
        r.gpu = *gpu.get_ref();
        spans.push((Resource::Gpu, "cost.gpu", gpu.span()));
    }
    if let Some(ram) = c.ram {
        let s = ram.span();
        r.ram = match ram.into_inner() {
            RawSize::Bytes(n) => u64::try_from(n).map_err(|_| {
                src.error(
                    s.clone(),
                    task,
                    "cost.ram",
                    format!("must be a non-negative size, got {n}"),
                )
            })?,
            RawSize::Text(t) => {
                t.parse::<ByteSize>()
                    .map_err(|e| src.error(s.clone(), task, "cost.ram", e))?
                    .0
            }
        };
        spans.push((Resource::Ram, "cost.ram", s));
    }
    r.validate().map_err(|e| {
        let (field, span) = spans
            .iter()
            .find(|(resource, _, _)| *resource == e.resource)
            .map_or(("cost", 0..0), |(_, field, span)| (*field, span.clone()));
        src.error(span, task, field, e.problem)
    })?;
    Ok(r)
}

fn limit(
    src: &Source<'_>,
    task: Option<&str>,
    field: &str,
    v: &Spanned<i64>,
    max: i64,
) -> Result<i64, TaskFileError> {
    let n = *v.get_ref();
    if n < 0 {
        return Err(src.error(
            v.span(),
            task,
            field,
            format!("must be 0 or a positive whole number, got {n}"),
        ));
    }
    if n > max {
        return Err(src.error(
            v.span(),
            task,
            field,
            format!("{n} is absurdly large (the limit is {max})"),
        ));
    }
    Ok(n)
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\" or \"5m\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("tasks.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn storage_costs() {
        let specs = parse(
            "tasks.toml",
            "[[task]]\nname = \"a\"\ncommand = [\"true\"]\ncost = { storage = \"64GiB\" }\n\n[[task]]\nname = \"b\"\ncommand = [\"true\"]\ncost = { storage = 1024, storage_kind = \"seal\" }\n",
        )
        .unwrap();
        assert_eq!(
            specs[0].details.storage,
            Some(StorageNeed {
                bytes: 64 << 30,
                kind: StorageKind::Store
            })
        );
        assert_eq!(
            specs[1].details.storage,
            Some(StorageNeed {
                bytes: 1024,
                kind: StorageKind::Seal
            })
        );
        let e =
            err("[[task]]\nname = \"a\"\ncommand = [\"true\"]\ncost = { storage = \"0GiB\" }\n");
        assert!(e.contains("line 4") && e.contains("cost.storage"), "{e}");
        let e = err(
            "[[task]]\nname = \"a\"\ncommand = [\"true\"]\ncost = { storage = \"1GiB\", storage_kind = \"tape\" }\n",
        );
        assert!(
            e.contains("cost.storage_kind") && e.contains("seal or store"),
            "{e}"
        );
        let e = err(
            "[[task]]\nname = \"a\"\ncommand = [\"true\"]\ncost = { storage_kind = \"seal\" }\n",
        );
        assert!(e.contains("needs cost.storage"), "{e}");
    }

    #[test]
    fn full_entry() {
        let specs = parse(
            "tasks.toml",
            r#"
[[task]]
name = "transcode"
command = ["ffmpeg", "-i", "{arg.input}", "out-{task_id}.mp4"]
cost = { cpu = 2, ram = "4GiB", gpu = 0.5 }
max = 2
max_cluster = 0
max_failures = 3
retry_wait = { initial = "1s", factor = 2.0, max = "1m" }
timeout = "5m"
env = { KEY = "value" }

[[task]]
name = "sleepy"
builtin = "bench_sleep"
max_cluster = 2
retry_wait = "10s"
"#,
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        let t = &specs[0];
        assert_eq!(t.name(), "transcode");
        assert_eq!(t.line, 2);
        assert_eq!(t.details.cost, Resources::new(2.0, 4 << 30, 0.5));
        assert_eq!(t.details.max.as_ref().map(Limiter::max), Some(2));
        assert_eq!(t.details.max_failures, 3);
        assert_eq!(t.details.timeout, Some(Duration::from_secs(300)));
        assert_eq!(t.details.retry_wait.wait(3), Duration::from_secs(4));
        assert_eq!(t.env.get("KEY").map(String::as_str), Some("value"));
        assert!(matches!(&t.kind, TaskKind::Command(c) if c.len() == 4));
        let s = &specs[1];
        assert_eq!(t.kill_grace, KILL_GRACE_DEFAULT);
        assert!(matches!(s.kind, TaskKind::Builtin("bench_sleep")));
        assert_eq!(s.details.max_cluster, 2);
        assert_eq!(s.details.retry_wait.wait(1), Duration::from_secs(10));
        assert!(parse("empty.toml", "").unwrap().is_empty());
    }

    #[test]
    fn errors_name_file_line_task_and_field() {
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\n\ncost = { cpu = -1 }\n");
        assert_eq!(
            e,
            "tasks.toml line 5: task \"x\": cost.cpu: must be a non-negative number, got -1"
        );
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\ncost = { gpu = 1e12 }\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"x\": cost.gpu: "),
            "{e}"
        );
        assert!(e.contains("absurdly large"), "{e}");
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\ncost = { ram = \"12XB\" }\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"x\": cost.ram: "),
            "{e}"
        );
        assert!(e.contains("\"XB\""), "{e}");
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\nmax = -3\n");
        assert!(e.starts_with("tasks.toml line 4: task \"x\": max: "), "{e}");
    }

    #[test]
    fn serde_errors_name_the_field_and_task() {
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\ncolour = \"red\"\n");
        assert!(e.starts_with("tasks.toml line 4: task \"x\": "), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\nmax = \"two\"\n");
        assert!(e.starts_with("tasks.toml line 4: task \"x\": max: "), "{e}");
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"]\nretry_wait = 5\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"x\": retry_wait: "),
            "{e}"
        );
        assert!(e.contains("a duration such as"), "{e}");
        let e = err("[[task]]\ncommand = [\"true\"]\n");
        assert!(e.starts_with("tasks.toml line 1: "), "{e}");
        assert!(e.contains("missing field `name`"), "{e}");
        let e = err("[[task]]\nname = \"x\"\ncommand = [\"true\"\n");
        assert!(e.starts_with("tasks.toml line 3: "), "{e}");
    }

    #[test]
    fn coordination_fields() {
        let specs = parse(
            "tasks.toml",
            r#"
[[task]]
name = "s1"
builtin = "bench_noop"
time_sensitive = true

[[task]]
name = "s2"
builtin = "bench_sleep"
follows = ["s1"]
may_follow = ["s1"]
uninterruptible = true

[[task]]
name = "s3"
command = ["echo", "{task_id}"]
follows = ["s2", "bench_noop"]
can_yield = true

[[task]]
name = "tick"
builtin = "bench_noop"
singleton = "1s"
"#,
        )
        .unwrap();
        let d = |i: usize| &specs[i].details;
        assert!(d(0).time_sensitive && d(0).follows.is_empty());
        let from =
            |i: usize| -> Vec<String> { d(i).follows.iter().map(|f| f.from.clone()).collect() };
        assert_eq!(from(1), ["s1"]);
        assert_eq!(d(1).may_follow, ["s1"]);
        assert!(d(1).uninterruptible && !d(1).can_yield);
        assert_eq!(from(2), ["s2", "bench_noop"]);
        assert!(d(2).can_yield);
        let bored = d(3).iambored.as_ref().expect("singleton");
        assert_eq!(bored.singleton_interval(), Some(Duration::from_secs(1)));
        assert!(d(2).iambored.is_none());
    }

    #[test]
    fn coordination_errors() {
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nfollows = [\"nope\"]\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": follows: unknown task type \"nope\""),
            "{e}"
        );
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nmay_follow = [\"x;y\"]\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": may_follow: "),
            "{e}"
        );
        assert!(e.contains("';'"), "{e}");
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nfollows = \"b\"\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": follows: "),
            "{e}"
        );
        assert!(e.contains("expected an array"), "{e}");
        let e = err(
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nfollows = [\"bench_noop\", \"bench_noop\"]\n",
        );
        assert!(e.contains("follows: \"bench_noop\" is listed twice"), "{e}");
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nfollows = [\"a\"]\n");
        assert!(
            e.starts_with(
                "tasks.toml line 4: task \"a\": follows: a names itself; every completion"
            ),
            "{e}"
        );
        let e = err(
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nfollows = [\"b\"]\n[[task]]\nname = \"b\"\nbuiltin = \"bench_noop\"\nfollows = [\"c\"]\n[[task]]\nname = \"c\"\nbuiltin = \"bench_noop\"\nfollows = [\"a\"]\n",
        );
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": follows: cycle a -> b -> c -> a"),
            "{e}"
        );
        let e = err(
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nmay_follow = [\"b\"]\n[[task]]\nname = \"b\"\nbuiltin = \"bench_noop\"\nmay_follow = [\"a\"]\n",
        );
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": may_follow: cycle a -> b -> a"),
            "{e}"
        );
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nsingleton = \"soon\"\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": singleton: "),
            "{e}"
        );
        assert!(e.contains("not a duration"), "{e}");
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nsingleton = \"0s\"\n");
        assert!(e.contains("singleton: must be a positive interval"), "{e}");
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\ncan_yield = \"yes\"\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": can_yield: "),
            "{e}"
        );
        assert!(e.contains("expected true or false"), "{e}");
        let e =
            err("[[task]]\nname = \"a\"\ncommand = [\"echo\", \"{arg.x}\"]\nsingleton = \"1m\"\n");
        assert!(
            e.contains("task \"a\": singleton: the command uses {arg.x}, but tasks created by singleton have no arguments"),
            "{e}"
        );
        let e = err(
            "[[task]]\nname = \"a\"\ncommand = [\"echo\", \"{arg.x}\"]\nfollows = [\"bench_noop\"]\n",
        );
        assert!(e.contains("follows: the command uses {arg.x}"), "{e}");
    }

    #[test]
    fn kill_grace() {
        let specs = parse(
            "tasks.toml",
            "[[task]]\nname = \"a\"\ncommand = [\"true\"]\nkill_grace = \"1500ms\"\n[[task]]\nname = \"b\"\ncommand = [\"true\"]\nkill_grace = \"0s\"\n",
        )
        .unwrap();
        assert_eq!(specs[0].kill_grace, Duration::from_millis(1500));
        assert_eq!(specs[1].kill_grace, Duration::ZERO);
        let e = err("[[task]]\nname = \"a\"\ncommand = [\"true\"]\nkill_grace = \"soon\"\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": kill_grace: "),
            "{e}"
        );
        assert!(e.contains("not a duration"), "{e}");
        let e = err("[[task]]\nname = \"a\"\ncommand = [\"true\"]\nkill_grace = \"2h\"\n");
        assert!(e.contains("kill_grace: 2h is absurdly long"), "{e}");
        let e = err("[[task]]\nname = \"a\"\ncommand = [\"true\"]\nkill_grace = 10\n");
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": kill_grace: "),
            "{e}"
        );
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_sleep\"\nkill_grace = \"1s\"\n");
        assert!(
            e.contains("task \"a\": kill_grace: only command types run a program"),
            "{e}"
        );
    }

    #[test]
    fn nul_characters_in_commands_are_refused() {
        let e = err("[[task]]\nname = \"a\"\ncommand = [\"echo\", \"x\\u0000y\"]\n");
        assert!(
            e.starts_with("tasks.toml line 3: task \"a\": command: element 1"),
            "{e}"
        );
        assert!(e.contains("NUL"), "{e}");
        let e = err("[[task]]\nname = \"a\"\ncommand = [\"ec\\u0000ho\"]\n");
        assert!(e.contains("element 0") && e.contains("NUL"), "{e}");
    }

    #[test]
    fn reading_stops_at_the_limit() {
        // An endless source (what /dev/zero is) ends in a refusal, not in exhausted memory.
        assert_eq!(read_bounded(std::io::repeat(b'a'), 10).unwrap(), None);
        assert_eq!(
            read_bounded(&b"0123456789"[..], 10).unwrap().as_deref(),
            Some(&b"0123456789"[..])
        );
        assert_eq!(read_bounded(&b"0123456789x"[..], 10).unwrap(), None);
        assert_eq!(read_bounded(&b""[..], 10).unwrap(), Some(Vec::new()));
    }

    #[test]
    fn names_are_checked() {
        let e = err("[[task]]\nname = \"much_too_long_a_name\"\ncommand = [\"true\"]\n");
        assert!(e.starts_with("tasks.toml line 2: "), "{e}");
        assert!(e.contains("name: ") && e.contains("the limit is 16"), "{e}");
        let e = err("[[task]]\nname = \"x');DROP--\"\ncommand = [\"true\"]\n");
        assert!(e.contains("name: ") && e.contains("use only"), "{e}");
        let e = err(
            "[[task]]\nname = \"a\"\ncommand = [\"true\"]\n[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\n",
        );
        assert!(
            e.starts_with("tasks.toml line 4: task \"a\": name: already declared on line 1"),
            "{e}"
        );
        let e = err("[[task]]\nname = \"bench_noop\"\nbuiltin = \"bench_noop\"\n");
        assert!(e.contains("is a built-in type"), "{e}");
        let e = err("[[task]]\nname = \"a\"\nbuiltin = \"bench_nope\"\n");
        assert!(e.contains("builtin: unknown built-in"), "{e}");
        let e = err("[[task]]\nname = \"a\"\n");
        assert!(e.contains("command: missing"), "{e}");
        let e = err("[[task]]\nname = \"a\"\ncommand = [\"echo\", \"{args.x}\"]\n");
        assert!(
            e.starts_with("tasks.toml line 3: task \"a\": command: "),
            "{e}"
        );
    }

    /// Valid files the fuzz test below starts from.
    const FUZZ_SEEDS: &[&str] = &[
        "[[task]]\nname = \"transcode\"\ncommand = [\"ffmpeg\", \"-i\", \"{arg.input}\", \"out-{task_id}.mp4\"]\ncost = { cpu = 2, ram = \"4GiB\", gpu = 0.5 }\nmax = 2\nmax_cluster = 8\nmax_failures = 3\nretry_wait = { initial = \"1s\", factor = 2.0, max = \"1m\" }\ntimeout = \"5m\"\nenv = { KEY = \"value\" }\nkill_grace = \"30s\"\n",
        "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nsingleton = \"10m\"\n\n[[task]]\nname = \"b\"\ncommand = [\"true\"]\nfollows = [\"a\"]\nmay_follow = [\"a\"]\ntime_sensitive = true\n",
        "[[task]]\nname = \"c:d_1\"\ncommand = [\"sh\", \"-c\", \"\"\"\necho {{x}}\n\"\"\"]\ncan_yield = true\nuninterruptible = false\nretry_wait = \"0s\"\n",
    ];

    /// Pieces the mutations splice in: TOML syntax, values of the wrong type or out of range,
    /// placeholders, control and multi-byte characters.
    const FUZZ_PIECES: &[&str] = &[
        "\"",
        "'",
        "[",
        "]",
        "{",
        "}",
        "=",
        ",",
        "\n",
        "[[task]]\n",
        "\"\"\"",
        "'''",
        "\\",
        "\\u0000",
        "\0",
        "\u{FFFD}",
        "é",
        "🦀",
        "\t",
        "#",
        ".",
        "-1",
        "1e999",
        "nan",
        "inf",
        "-0.0",
        "99999999999999999999",
        "18446744073709551616",
        "\"1e308\"",
        "\"-4GiB\"",
        "\"12XB\"",
        "\"9999999TiB\"",
        "\"1ns\"",
        "\"999999h\"",
        "{arg.}",
        "{task_id",
        "{{",
        "true",
        "[]",
        "{}",
        "name = \"x\"",
        "command = []",
        "builtin = \"nope\"",
        "follows = [\"b\", \"b\"]",
        "cost = { cpu = 1e9 }",
        "max = -1",
        "retry_wait = { factor = -2.0 }",
        "x');DROP--",
    ];

    fn fuzz_mutate(rng: &mut fastrand::Rng, base: &str) -> String {
        let mut text: Vec<char> = base.chars().collect();
        for _ in 0..rng.usize(1..=4) {
            let at = rng.usize(..=text.len());
            match rng.u8(..5) {
                // Delete a range.
                0 => {
                    let end = (at + rng.usize(..=20)).min(text.len());
                    text.drain(at..end);
                }
                // Splice in a piece.
                1 | 2 => {
                    let piece = FUZZ_PIECES[rng.usize(..FUZZ_PIECES.len())];
                    text.splice(at..at, piece.chars());
                }
                // Random characters, ASCII or not.
                3 => {
                    let n = rng.usize(1..8);
                    let chars: Vec<char> = (0..n)
                        .map(|_| {
                            if rng.bool() {
                                char::from(rng.u8(0..128))
                            } else {
                                rng.char(..)
                            }
                        })
                        .collect();
                    text.splice(at..at, chars);
                }
                // Repeat a slice (duplicate keys and entries, long values).
                _ => {
                    let end = (at + rng.usize(..=40)).min(text.len());
                    let slice: Vec<char> = text[at..end].to_vec();
                    let times = if rng.u8(..10) == 0 { 2000 } else { 2 };
                    for _ in 0..times {
                        text.splice(at..at, slice.iter().copied());
                    }
                }
            }
        }
        text.into_iter().collect()
    }

    /// Thousands of malformed tasks files, generated from a fixed seed: each parses, or is
    /// refused with one line naming the file. None panics. A failing case prints its index and
    /// its text, and the same seed reproduces it.
    #[test]
    fn fuzzed_tasks_files_get_a_clean_error() {
        const CASES: usize = 3000;
        let mut rng = fastrand::Rng::with_seed(0x1457_a5c5);
        let (mut ok, mut refused) = (0, 0);
        for case in 0..CASES {
            let base = FUZZ_SEEDS[rng.usize(..FUZZ_SEEDS.len())];
            let text = fuzz_mutate(&mut rng, base);
            let parsed = std::panic::catch_unwind(|| parse("fuzz.toml", &text));
            match parsed {
                Err(_) => panic!("case {case} panicked; the file was:\n{text}"),
                Ok(Ok(_)) => ok += 1,
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.starts_with("fuzz.toml") && !msg.contains('\n'),
                        "case {case}: not one line naming the file: {msg:?}; the file was:\n{text}"
                    );
                    refused += 1;
                }
            }
        }
        // The generator must reach both sides, or it tests nothing.
        assert!(refused > CASES / 2 && ok > 0, "ok {ok}, refused {refused}");
    }
}
