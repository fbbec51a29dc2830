//! The `harmony` binary: parses flags, builds typed configs, installs logging and signal
//! handling, and calls the libraries. No engine logic lives here.

// First, so that its printing macros are in scope in every other module.
#[macro_use]
mod output;
mod catalog;
mod cli;
mod command_task;
mod commands;
mod demo;
mod layers;
mod taskfile;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::cli::Cli;

/// Longest wait at exit for work still running on the runtime's threads.
const RUNTIME_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version print to stdout and succeed.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Clap would print the whole help as the error; a new user needs the one line that
            // says what is missing and what to type next.
            let line = format!("error: {}", missing_command(&e.render().to_string()));
            report_error(json_requested(), commands::EXIT_USAGE, &line);
            return ExitCode::from(commands::EXIT_USAGE);
        }
        Err(e) => {
            let line = one_line(&e.render().to_string());
            report_error(json_requested(), commands::EXIT_USAGE, &line);
            return ExitCode::from(commands::EXIT_USAGE);
        }
    };
    let json = cli.json;
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(commands::EXIT_ERROR);
        }
    };
    let shutdown = CancellationToken::new();
    let long_running = cli.command.is_long_running();
    let result = runtime.block_on(async {
        if long_running {
            install_signal_handlers(shutdown.clone());
        }
        commands::dispatch(cli, shutdown).await
    });
    // Dropping the runtime would wait for every blocking thread, including one stuck in a read
    // that a signal interrupted; give them a moment, then exit regardless.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line, redacted: anyhow's `{:#}` joins the context chain with ": ".
            let code = commands::exit_code_for(&e);
            let line = format!("error: {}", harmonydb::redact(&format!("{e:#}")));
            report_error(json, code, &line);
            ExitCode::from(code)
        }
    }
}

/// Whether `--json` was given, read from the raw arguments (for errors of parsing them).
fn json_requested() -> bool {
    std::env::args_os().any(|a| a == "--json")
}

/// Prints a failed command's one error line on stderr, its echoed values cut to a readable
/// length; with `--json`, as an object `{"error": "…", "kind": "…"}` so that scripts need not
/// parse text.
fn report_error(json: bool, code: u8, line: &str) {
    let line = &output::readable(line);
    if json {
        let message = line.strip_prefix("error: ").unwrap_or(line);
        let value = serde_json::json!({ "error": message, "kind": commands::exit_kind(code) });
        errln!("{value}");
    } else {
        errln!("{line}");
    }
}

/// Squeezes clap's multi-line usage error into one line: the message and any listed items,
/// without the usage block and the `--help` tip.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A one-line usage for a command given without its subcommand (`harmony`, `harmony task`),
/// from the help clap rendered: its usage line and the names of the commands it lists.
fn missing_command(help: &str) -> String {
    let usage = help
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage:"))
        .map_or("harmony <COMMAND>", str::trim);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    // `harmony task [OPTIONS] <COMMAND>` → `harmony task`, the prefix to ask --help of.
    let prefix = usage
        .split(" [")
        .next()
        .unwrap_or(usage)
        .split(" <")
        .next()
        .unwrap_or(usage);
    format!(
        "a command is missing; usage: {usage}, COMMAND one of: {}; `{prefix} --help` describes them",
        commands.join(", ")
    )
}

/// First SIGINT or SIGTERM: cancel `shutdown` (the command shuts down gracefully). A second
/// one: exit at once; tasks this node still owns are released when the cluster reaps it.
fn install_signal_handlers(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot install signal handlers; SIGINT/SIGTERM will not shut down gracefully");
            return;
        }
    };
    tokio::spawn(async move {
        for n in 0.. {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if n == 0 {
                // Cancel before logging: whatever happens to the log, the signal is obeyed.
                shutdown.cancel();
                tracing::info!(
                    signal = name,
                    "shutting down gracefully (send it again to exit at once)"
                );
            } else {
                errln!("error: second {name}; exiting without a graceful shutdown");
                std::process::exit(i32::from(commands::EXIT_ERROR));
            }
        }
    });
}

fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    // A node's log is its record of what happened; other commands stay quiet unless asked.
    let default = match cli.command {
        cli::Command::Run(_) | cli::Command::Web(_) => "info",
        _ => "warn",
    };
    // --log wins over HARMONY_LOG, which wins over the default.
    let filter = match &cli.log_level {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_env("HARMONY_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
    };
    // Colours only on a terminal: a log redirected to a file or a collector stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A closed log pipe (`harmony run 2>&1 | head -1`) must not panic or wedge the node: the
    // writer drops what it cannot write, and tracing never reports its own write errors.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| output::LossyStderr)
        .log_internal_errors(false)
        .with_target(false)
        .compact()
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_command_is_one_usage_line() {
        for (args, usage, listed) in [
            (
                &["harmony"][..],
                "usage: harmony [OPTIONS] <COMMAND>",
                "db, run, task, machine, demo, bench, web, config, storage;",
            ),
            (
                &["harmony", "task"][..],
                "usage: harmony task [OPTIONS] <COMMAND>",
                "add, ls,",
            ),
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            let line = missing_command(&e.render().to_string());
            assert!(!line.contains('\n'), "{line}");
            assert!(line.contains(usage) && line.contains(listed), "{line}");
            assert!(!line.contains("help,"), "{line}");
        }
        let e = Cli::try_parse_from(["harmony", "task"]).unwrap_err();
        assert!(
            missing_command(&e.render().to_string())
                .ends_with("`harmony task --help` describes them")
        );
    }

    #[test]
    fn clap_errors_fit_on_one_line() {
        let e = Cli::try_parse_from(["harmony", "run", "--ram", "12XB"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("error: invalid value '12XB' for '--ram"),
            "{line}"
        );
        assert!(line.contains("unknown unit \"XB\""), "{line}");
        let e = Cli::try_parse_from(["harmony", "task", "add"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(line.contains("<TYPE>") && !line.contains("Usage"), "{line}");
    }
}
