//! Command task types: each attempt runs a program with `{task_id}` and `{arg.NAME}`
//! substituted into its argv. Exit status 0 is success; anything else is a failed attempt whose
//! error is the end of the program's standard error.
//!
//! Each command runs in a process group of its own, so that what it starts in turn (`sh -c`
//! running a pipeline, a script starting helpers) is stopped with it: every signal goes to the
//! whole group. When the attempt is cancelled (shutdown, preemption, a cordon for a
//! `can_yield` type, loss of ownership) the group gets SIGTERM, so that it can stop cleanly,
//! and SIGKILL once the grace is over or the command has exited. When the attempt's future is
//! dropped (its timeout, or the node exiting) the group is killed at once. When the command
//! exits by itself, anything it left running in its group is killed too: the attempt is over,
//! and a leftover holding the stderr pipe would keep the attempt from ending. (A program that
//! must outlive its attempt has to leave the group, e.g. with `setsid`.)

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::Duration;

use harmonytask::{Done, RunContext, Task, TaskError, TaskId, TypeDetails, async_trait};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// How much of a failed command's standard error is kept as the attempt's error.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// How long a cancelled command has after SIGTERM before it gets SIGKILL, unless its type sets
/// `kill_grace`.
pub const KILL_GRACE_DEFAULT: Duration = Duration::from_secs(10);

/// One piece of an argv template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    TaskId,
    Arg(String),
}

/// An argv element with placeholders: `{task_id}`, `{arg.NAME}`; `{{` and `}}` are literal
/// braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses one argv element; the error says which placeholder is wrong.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        inner.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "{s:?}: unclosed placeholder {{{inner}; write {{{{ for a literal brace"
                        ));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    if inner == "task_id" {
                        parts.push(Part::TaskId);
                    } else if let Some(name) = inner.strip_prefix("arg.")
                        && valid_arg_name(name)
                    {
                        parts.push(Part::Arg(name.to_owned()));
                    } else {
                        return Err(format!(
                            "{s:?}: unknown placeholder {{{inner}}}; use {{task_id}} or {{arg.NAME}} (NAME of A-Z, a-z, 0-9, _, -, .), and {{{{ for a literal brace"
                        ));
                    }
                }
                '}' => {
                    return Err(format!("{s:?}: stray }}; write }}}} for a literal brace"));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() || parts.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    /// The names of the `{arg.NAME}` placeholders, in order.
    pub fn arg_names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Arg(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Substitutes the placeholders; an argument the task lacks is an error naming it.
    pub fn render(&self, task: TaskId, args: &HashMap<String, String>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::TaskId => out.push_str(&task.to_string()),
                Part::Arg(name) => match args.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        let mut have: Vec<&str> = args.keys().map(String::as_str).collect();
                        have.sort_unstable();
                        let have = if have.is_empty() {
                            "none".to_owned()
                        } else {
                            have.join(", ")
                        };
                        return Err(format!(
                            "the command needs argument {name:?} ({{arg.{name}}}), but task {task} has none by that name (its arguments: {have}); add tasks with --arg {name}=VALUE"
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

/// Whether `name` may follow `arg.` in a placeholder (the same rule as `--arg` keys).
pub fn valid_arg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A task type that runs a command.
pub struct CommandTask {
    details: TypeDetails,
    argv: Vec<Template>,
    env: BTreeMap<String, String>,
    kill_grace: Duration,
}

impl CommandTask {
    /// A command type with these details, argv templates (program first, non-empty) and extra
    /// environment; a cancelled command gets [`KILL_GRACE_DEFAULT`] between SIGTERM and
    /// SIGKILL.
    pub fn new(details: TypeDetails, argv: Vec<Template>, env: BTreeMap<String, String>) -> Self {
        CommandTask {
            details,
            argv,
            env,
            kill_grace: KILL_GRACE_DEFAULT,
        }
    }

    /// Sets the time between SIGTERM and SIGKILL when an attempt is cancelled.
    pub fn with_kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }
}

#[async_trait]
impl Task for CommandTask {
    fn type_details(&self) -> TypeDetails {
        self.details.clone()
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        // A database error keeps its kind, so that a blink of the database releases the task
        // instead of costing it an attempt.
        let args = ctx.args().await.map_err(|e| match &e {
            harmonytask::Error::Db(db) => {
                TaskError::database(format_args!("reading the arguments of task {task}"), db)
            }
            _ => TaskError::new(format!("reading the arguments of task {task}: {e}")),
        })?;
        let argv = self
            .argv
            .iter()
            .map(|t| t.render(task, &args))
            .collect::<Result<Vec<String>, String>>()
            .map_err(TaskError::new)?;
        let (program, rest) = argv
            .split_first()
            .ok_or_else(|| TaskError::new("the command is empty"))?;
        // The storage path reserved for this task (its type declares `cost.storage`).
        let storage = if self.details.storage.is_some() {
            ctx.storage_path().await.map_err(|e| match &e {
                harmonytask::Error::Db(db) => {
                    TaskError::database(format_args!("reading the storage path of task {task}"), db)
                }
                _ => TaskError::new(format!("reading the storage path of task {task}: {e}")),
            })?
        } else {
            None
        };
        let mut cmd = Command::new(program);
        if let Some(path) = storage {
            cmd.env("HARMONY_STORAGE_PATH", path);
        }
        cmd.args(rest)
            .envs(&self.env)
            .env("HARMONY_TASK_ID", task.to_string())
            .env("HARMONY_TASK_TYPE", ctx.task_name())
            .env("HARMONY_TASK_RETRIES", ctx.retries().to_string())
            .stdin(Stdio::null())
            // Output goes where the node's goes, so operators see it in the node's log.
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            // Its own group (pgid = its pid), so that one signal reaches all it started.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| TaskError::new(format!("cannot start {program:?}: {e}")))?;
        // Armed before anything can drop this future: a timeout or the node exiting kills the
        // group, not only the child (`kill_on_drop`).
        let group = GroupGuard::new(&child);
        let stderr = child.stderr.take();
        let tail = tokio::spawn(async move {
            match stderr {
                Some(s) => read_tail(s, STDERR_TAIL_BYTES).await,
                None => String::new(),
            }
        });
        let status = tokio::select! {
            status = child.wait() => status,
            () = ctx.cancelled().cancelled() => {
                // The engine records the cancellation reason; this text only reaches the log.
                let how = stop(&mut child, &group, task, program, self.kill_grace).await;
                return Err(TaskError::new(format!("cancelled; {how}")));
            }
        }
        .map_err(|e| TaskError::new(format!("waiting for {program:?}: {e}")))?;
        // The command is done; what it left behind in its group is not part of any attempt.
        group.kill(Signal::SIGKILL);
        let tail = tail.await.unwrap_or_default();
        if status.success() {
            if !tail.trim().is_empty() {
                tracing::debug!(task = %task, stderr = %tail.trim(), "command wrote to stderr");
            }
            return Ok(Done(true));
        }
        let how = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => {
                use std::os::unix::process::ExitStatusExt;
                status.signal().map_or("abnormal exit".to_owned(), |s| {
                    format!("killed by signal {s}")
                })
            }
        };
        let tail = tail.trim();
        Err(TaskError::new(if tail.is_empty() {
            format!("{how} (no stderr output)")
        } else {
            format!("{how}: {tail}")
        }))
    }
}

/// The process group of one attempt's command; dropping it SIGKILLs the group.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn new(child: &Child) -> Self {
        // The group's id is the child's pid (`process_group(0)`). It stays that group's while
        // any member lives, even after the child itself was reaped: the kernel does not hand
        // out a pid that is still some group's id, so signalling it cannot hit a stranger.
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        GroupGuard { pgid }
    }

    /// Signals every process of the group. ESRCH (nobody left) is the usual outcome once the
    /// command and its children have exited, and not worth a word.
    fn kill(&self, signal: Signal) -> bool {
        match self.pgid {
            Some(pgid) => match killpg(pgid, signal) {
                Ok(()) => true,
                Err(nix::errno::Errno::ESRCH) => false,
                Err(e) => {
                    tracing::warn!(pgid = %pgid, %signal, error = %e, "cannot signal a command's process group");
                    false
                }
            },
            None => false,
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill(Signal::SIGKILL);
    }
}

/// Stops the process group of a cancelled attempt: SIGTERM to the group, up to `grace` for
/// the command to exit, then SIGKILL to the group (to whatever of it is left, once the command
/// has exited by itself); the command is reaped either way. Says how it ended.
async fn stop(
    child: &mut Child,
    group: &GroupGuard,
    task: TaskId,
    program: &str,
    grace: Duration,
) -> String {
    if group.kill(Signal::SIGTERM) {
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(_)) => {
                tracing::info!(task = %task, program, "cancelled command stopped after SIGTERM");
                group.kill(Signal::SIGKILL);
                return format!("stopped {program:?} with SIGTERM");
            }
            Ok(Err(e)) => {
                tracing::warn!(task = %task, program, error = %e, "waiting for a cancelled command failed; sending SIGKILL");
            }
            Err(_) => tracing::info!(
                task = %task,
                program,
                kill_grace = ?grace,
                "cancelled command ignored SIGTERM for its kill grace; sending SIGKILL"
            ),
        }
    } else {
        tracing::warn!(task = %task, program, "could not send SIGTERM; sending SIGKILL");
    }
    group.kill(Signal::SIGKILL);
    let _ = child.kill().await;
    format!("killed {program:?} with SIGKILL after a grace of {grace:?}")
}

/// Reads `r` to the end, keeping only the last `max` bytes (cut at a character boundary).
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(mut r: R, max: usize) -> String {
    let mut kept: Vec<u8> = Vec::with_capacity(max * 2);
    let mut buf = [0u8; 4096];
    let mut truncated = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > max {
                    kept.drain(..kept.len() - max);
                    truncated = true;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&kept);
    // A cut in the middle of a character shows as U+FFFD at the start; drop it.
    let text = text.trim_start_matches('\u{FFFD}');
    if truncated {
        format!("…{text}")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn templates_substitute() {
        let t = Template::parse("out-{task_id}-{arg.input}.mp4").unwrap();
        assert_eq!(
            t.render(TaskId(7), &args(&[("input", "a b")])).unwrap(),
            "out-7-a b.mp4"
        );
        let lit = Template::parse("{{x}}").unwrap();
        assert_eq!(lit.render(TaskId(1), &args(&[])).unwrap(), "{x}");
        assert_eq!(
            Template::parse("")
                .unwrap()
                .render(TaskId(1), &args(&[]))
                .unwrap(),
            ""
        );
        // Values are passed as one argv element each, never through a shell.
        let sql = "x'); DROP TABLE harmony_task;--";
        let t = Template::parse("{arg.v}").unwrap();
        assert_eq!(t.render(TaskId(1), &args(&[("v", sql)])).unwrap(), sql);
    }

    #[test]
    fn template_errors() {
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown placeholder {nope}")
        );
        assert!(Template::parse("{arg.}").is_err());
        assert!(
            Template::parse("{task_id")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(Template::parse("a}b").unwrap_err().contains("stray"));
        let t = Template::parse("{arg.input}").unwrap();
        let e = t.render(TaskId(3), &args(&[("other", "1")])).unwrap_err();
        assert!(
            e.contains("\"input\"") && e.contains("other") && e.contains("--arg input="),
            "{e}"
        );
    }

    #[tokio::test]
    async fn tail_keeps_the_end() {
        let data = "a".repeat(5000) + "END";
        let tail = read_tail(data.as_bytes(), 100).await;
        assert!(tail.ends_with("END") && tail.starts_with('…'));
        assert_eq!(tail.chars().count(), 101);
        assert_eq!(read_tail("short".as_bytes(), 100).await, "short");
    }
}
