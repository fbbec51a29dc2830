//! `harmony config list|get|set|edit|history|diff|rm|resolved`: configuration layers. Every
//! write is checked first (`layers::check`), so an invalid layer never reaches the database.

use std::io::Read;

use harmonytask::Admin;
use serde::Serialize;

use crate::cli::ConfigCommand;
use crate::commands::{EXIT_OK, UsageError, open_existing};
use crate::layers::{self, ENGINE_KEYS, LAYER_BYTES_MAX, LayerError, Source};
use crate::output::{self, Table};

/// Runs one `config` subcommand.
pub async fn run(db_url: &str, json: bool, cmd: ConfigCommand) -> anyhow::Result<u8> {
    // Titles are checked before the database is opened.
    let title = match &cmd {
        ConfigCommand::Get { name }
        | ConfigCommand::Set { name, .. }
        | ConfigCommand::Edit { name }
        | ConfigCommand::History { name }
        | ConfigCommand::Diff { name, .. }
        | ConfigCommand::Rm { name } => Some(name.clone()),
        ConfigCommand::List | ConfigCommand::Resolved { .. } => None,
    };
    if let Some(t) = &title {
        layers::check_title(t).map_err(usage)?;
    }
    // A layer given on stdin or in a file is read and checked before anything else.
    let staged = match &cmd {
        ConfigCommand::Set { name, file } => {
            let text = read_layer(file)?;
            layers::check(name, &text).map_err(usage)?;
            Some(text)
        }
        _ => None,
    };
    let admin = Admin::new(open_existing(db_url).await?);
    match cmd {
        ConfigCommand::List => {
            let rows = admin.config_list().await?;
            if json {
                output::json(&rows)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&["TITLE", "BYTES", "CHANGED"]);
            for r in &rows {
                t.row(vec![
                    r.title.clone(),
                    r.bytes.to_string(),
                    r.timestamp.to_sqlite_text(),
                ]);
            }
            if t.is_empty() {
                outln!("no config layers (write one with `harmony config set NAME FILE`)");
            } else {
                t.print();
            }
        }
        ConfigCommand::Get { name } => {
            let layer = existing(&admin, &name).await?;
            if json {
                output::json(&layer)?;
            } else {
                out!("{}", layer.config);
                if !layer.config.ends_with('\n') {
                    outln!();
                }
            }
        }
        ConfigCommand::Set { name, .. } => {
            let text = staged.unwrap_or_default();
            let changed = admin.config_set(&name, &text).await?;
            report_written(&admin, &name, changed, json).await?;
        }
        ConfigCommand::Edit { name } => {
            let old = admin
                .config_get(&name)
                .await?
                .map(|l| l.config)
                .unwrap_or_default();
            let text = edit(&name, &old).await?;
            let changed = admin.config_set(&name, &text).await?;
            report_written(&admin, &name, changed, json).await?;
        }
        ConfigCommand::History { name } => {
            let versions = admin.config_history(&name).await?;
            if json {
                output::json(&versions)?;
                return Ok(EXIT_OK);
            }
            if versions.is_empty() {
                return Err(UsageError(format!("layer {name:?} has no history")).into());
            }
            let current = admin.config_get(&name).await?.map(|l| l.config);
            let mut t = Table::new(&["VERSION", "CHANGED", "BYTES", ""]);
            let last = versions.len() - 1;
            for (i, v) in versions.iter().enumerate() {
                let note = match (&current, i == last) {
                    (Some(c), true) if *c == v.config => "current",
                    (None, true) => "removed since",
                    _ => "",
                };
                t.row(vec![
                    v.version.to_string(),
                    v.changed_at.to_sqlite_text(),
                    v.config.len().to_string(),
                    note.to_owned(),
                ]);
            }
            t.print();
        }
        ConfigCommand::Diff { name, version } => {
            let versions = admin.config_history(&name).await?;
            let current = admin
                .config_get(&name)
                .await?
                .map(|l| l.config)
                .unwrap_or_default();
            let (label, old) = match version {
                Some(v) => {
                    let Some(found) = versions.iter().find(|x| x.version == v) else {
                        return Err(UsageError(format!(
                            "layer {name:?} has no version {v} (see `harmony config history {name}`)"
                        ))
                        .into());
                    };
                    (format!("version {v}"), found.config.clone())
                }
                None if versions.len() >= 2 => {
                    let v = &versions[versions.len() - 2];
                    (format!("version {}", v.version), v.config.clone())
                }
                None => ("nothing".to_owned(), String::new()),
            };
            let lines = diff_lines(&old, &current);
            if json {
                output::json(&DiffOut {
                    from: &label,
                    lines: &lines,
                })?;
                return Ok(EXIT_OK);
            }
            outln!("--- {name} {label}");
            outln!("+++ {name} current");
            for l in &lines {
                outln!("{l}");
            }
        }
        ConfigCommand::Rm { name } => {
            if !admin.config_remove(&name).await? {
                return Err(UsageError(format!("layer {name:?} does not exist")).into());
            }
            if json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                outln!("layer {name} removed (its history stays)");
            }
        }
        ConfigCommand::Resolved { layers: named } => {
            for n in &named {
                layers::check_title(n).map_err(usage)?;
            }
            let resolved = read_resolved(&admin, &named).await.map_err(usage)?;
            let rows = resolved_rows(&resolved);
            if json {
                output::json(&serde_json::json!({
                    "layers": resolved.titles,
                    "values": rows,
                }))?;
                return Ok(EXIT_OK);
            }
            outln!("layers: {}", resolved.titles.join(", "));
            let mut t = Table::new(&["KEY", "VALUE", "FROM"]);
            for r in &rows {
                t.row(vec![r.key.clone(), r.value.clone(), r.source.to_string()]);
            }
            t.print();
        }
    }
    Ok(EXIT_OK)
}

/// Reads `base` (when it exists) and the layers named, and resolves them with this process's
/// environment. A named layer that does not exist is an error.
pub async fn read_resolved(
    admin: &Admin,
    named: &[String],
) -> Result<layers::Resolved, LayerError> {
    let titles = layers::titles(named, true);
    let found = admin
        .config_get_many(&titles)
        .await
        .map_err(|e| LayerError::At {
            layer: titles.join(","),
            line: None,
            key: String::new(),
            problem: format!("reading the layers: {e}"),
        })?;
    let mut texts = Vec::with_capacity(titles.len());
    for t in &titles {
        match found.iter().find(|l| &l.title == t) {
            Some(l) => texts.push((t.clone(), l.config.clone())),
            None if t == layers::BASE => {}
            None => return Err(LayerError::Missing(t.clone())),
        }
    }
    layers::resolve(&texts, |v| std::env::var(v).ok())
}

/// One line of `config resolved`.
#[derive(Serialize)]
struct ResolvedRow {
    key: String,
    value: String,
    source: Source,
}

fn resolved_rows(r: &layers::Resolved) -> Vec<ResolvedRow> {
    let mut rows = Vec::new();
    for key in ENGINE_KEYS {
        let (value, source) = match r.engine.get(key) {
            Some((v, s)) => (v.to_string(), s.clone()),
            None => (default_shown(key), Source::Default),
        };
        rows.push(ResolvedRow {
            key: format!("engine.{key}"),
            value,
            source,
        });
    }
    for (path, layer) in &r.origin {
        if path.starts_with("engine.") {
            continue;
        }
        let value = lookup(&r.table, path).map_or_else(String::new, |v| v.to_string());
        rows.push(ResolvedRow {
            key: path.clone(),
            value,
            source: Source::Layer(layer.clone()),
        });
    }
    rows
}

/// The value at a dotted path of the merged table (`task.NAME.…` looks the entry up by name).
fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur: &toml::Value = if first == "task" {
        let name = parts.next()?;
        table
            .get("task")?
            .as_array()?
            .iter()
            .find(|e| e.get("name").and_then(toml::Value::as_str) == Some(name))?
    } else {
        table.get(first)?
    };
    for p in parts {
        cur = cur.get(p)?;
    }
    Some(cur)
}

fn default_shown(key: &str) -> String {
    let d = harmonytask::EngineConfig::default();
    let dur = |x: std::time::Duration| humantime::format_duration(x).to_string();
    match key {
        "cpu" | "ram" | "gpu" => "detected".to_owned(),
        "poll_interval" => dur(d.poll_interval),
        "poll_interval_unhealthy" => dur(d.poll_interval_unhealthy),
        "heartbeat_interval" => dur(d.heartbeat_interval),
        "dead_after" => dur(d.dead_after),
        "reaper_interval" => dur(d.reaper_interval),
        "shutdown_grace" => dur(d.shutdown_grace),
        "claim_batch_max" => d.claim_batch_max.to_string(),
        _ => String::new(),
    }
}

async fn existing(admin: &Admin, name: &str) -> anyhow::Result<harmonytask::ConfigLayer> {
    admin.config_get(name).await?.ok_or_else(|| {
        UsageError(format!(
            "layer {name:?} does not exist (see `harmony config list`)"
        ))
        .into()
    })
}

async fn report_written(
    admin: &Admin,
    name: &str,
    changed: bool,
    json: bool,
) -> anyhow::Result<()> {
    let version = admin.config_history(name).await?.last().map(|v| v.version);
    if json {
        output::json(&serde_json::json!({
            "layer": name, "changed": changed, "version": version,
        }))?;
    } else if changed {
        outln!(
            "layer {name} written (version {}); nodes running it apply it within seconds",
            version.unwrap_or(0)
        );
    } else {
        outln!("layer {name} unchanged");
    }
    Ok(())
}

fn usage(e: LayerError) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

/// Reads a layer from a file or stdin (`-`), at most `LAYER_BYTES_MAX` bytes.
fn read_layer(file: &str) -> anyhow::Result<String> {
    let limit = LAYER_BYTES_MAX as u64;
    let mut bytes = Vec::new();
    let shown = if file == "-" { "stdin" } else { file };
    let read = if file == "-" {
        std::io::stdin().take(limit + 1).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| UsageError(format!("reading {shown}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(UsageError(format!("{shown}: larger than {LAYER_BYTES_MAX} bytes")).into());
    }
    String::from_utf8(bytes).map_err(|_| UsageError(format!("{shown}: not UTF-8 text")).into())
}

/// Opens the text in `$VISUAL` / `$EDITOR` (default `vi`) and returns what was saved, once it
/// checks. An invalid result is refused, and kept in a file whose name the error gives.
async fn edit(name: &str, old: &str) -> anyhow::Result<String> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".to_owned());
    let path = std::env::temp_dir().join(format!(
        "harmony-layer-{name}-{}-{}.toml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::write(&path, old)?;
    // The editor may be a command with arguments (`code --wait`).
    let mut parts = editor.split_whitespace();
    let program = parts.next().unwrap_or("vi").to_owned();
    let args: Vec<String> = parts.map(str::to_owned).collect();
    let status = tokio::process::Command::new(&program)
        .args(&args)
        .arg(&path)
        .status()
        .await
        .map_err(|e| UsageError(format!("starting the editor {editor:?}: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_file(&path);
        return Err(UsageError(format!(
            "the editor {editor:?} failed ({status}); nothing saved"
        ))
        .into());
    }
    let text = read_layer(&path.to_string_lossy())?;
    if let Err(e) = layers::check(name, &text) {
        return Err(UsageError(format!(
            "{e}; nothing saved (your edit is kept in {})",
            path.display()
        ))
        .into());
    }
    let _ = std::fs::remove_file(&path);
    Ok(text)
}

#[derive(Serialize)]
struct DiffOut<'a> {
    from: &'a str,
    lines: &'a [String],
}

/// Most lines compared line by line; longer texts are shown as all removed, all added.
const DIFF_LINES_MAX: usize = 4000;

/// A line diff (longest common subsequence): `-` removed, `+` added, ` ` kept.
fn diff_lines(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len() > DIFF_LINES_MAX || b.len() > DIFF_LINES_MAX {
        return a
            .iter()
            .map(|l| format!("-{l}"))
            .chain(b.iter().map(|l| format!("+{l}")))
            .collect();
    }
    // lcs[i][j]: length of the common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!(" {}", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("-{}", a[i]));
            i += 1;
        } else {
            out.push(format!("+{}", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_changed_lines() {
        let d = diff_lines("a\nb\nc\n", "a\nx\nc\nd\n");
        assert_eq!(d, [" a", "-b", "+x", " c", "+d"]);
        assert_eq!(diff_lines("", "a"), ["+a"]);
    }
}
