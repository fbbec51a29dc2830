//! `harmony machine ls|cordon|uncordon|restart`.

use harmonytask::MachineId;
use harmonytask::resources::format_bytes;
use harmonytask::{Admin, MachineRow};
use serde::Serialize;

use crate::cli::{MachineCommand, MachineTarget};
use crate::commands::peering::Peering;
use crate::commands::run::check_listen;
use crate::commands::{EXIT_OK, UsageError, open_existing};
use crate::output::{self, Table};

/// Runs one `machine` subcommand. `notify` says whether operator actions wake the machine at
/// once (a notification) or wait for its next heartbeat.
pub async fn run(
    db_url: &str,
    json: bool,
    notify: &Peering,
    cmd: MachineCommand,
) -> anyhow::Result<u8> {
    match cmd {
        MachineCommand::Cordon(target) => act(db_url, json, notify, Action::Cordon, &target).await,
        MachineCommand::Uncordon(target) => {
            act(db_url, json, notify, Action::Uncordon, &target).await
        }
        MachineCommand::Restart(target) => {
            act(db_url, json, notify, Action::Restart, &target).await
        }
        MachineCommand::Ls => {
            let db = open_existing(db_url).await?;
            let machines = Admin::new(db).machines().await?;
            if json {
                output::json(&machines)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&[
                "ID",
                "HOST",
                "NAME",
                "CPU",
                "RAM",
                "GPU",
                "RUNNING",
                "LAST CONTACT",
                "FLAGS",
                "TASKS",
                "LAYERS",
            ]);
            for m in &machines {
                let mut flags = Vec::new();
                if m.unschedulable {
                    flags.push("cordoned");
                }
                if m.restart_request.is_some() {
                    flags.push("restart requested");
                }
                t.row(vec![
                    m.id.to_string(),
                    m.host_and_port.clone(),
                    m.name.clone(),
                    m.cpu.to_string(),
                    format_bytes(u64::try_from(m.ram).unwrap_or(0)),
                    m.gpu.to_string(),
                    m.running.to_string(),
                    m.last_contact.to_sqlite_text(),
                    if flags.is_empty() {
                        "-".to_owned()
                    } else {
                        flags.join(",")
                    },
                    m.tasks.clone(),
                    if m.layers.is_empty() {
                        "-".to_owned()
                    } else {
                        m.layers.clone()
                    },
                ]);
            }
            if t.is_empty() {
                outln!("no machines registered");
            } else {
                t.print();
            }
            Ok(EXIT_OK)
        }
    }
}

/// Most machines an error message lists.
const LISTED_MAX: usize = 20;

/// An operator action on one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Cordon,
    Uncordon,
    Restart,
}

/// What `--json` prints for an action.
#[derive(Serialize)]
struct Acted<'a> {
    action: Action,
    machine: MachineId,
    host_and_port: &'a str,
    /// False when the machine was already in the requested state.
    changed: bool,
}

async fn act(
    db_url: &str,
    json: bool,
    notify: &Peering,
    action: Action,
    target: &MachineTarget,
) -> anyhow::Result<u8> {
    match (&target.listen, target.this) {
        (Some(_), false) => {
            return Err(UsageError(
                "--listen only goes with --self (to name a machine by id, give just the id)".into(),
            )
            .into());
        }
        (_, true) => check_listen(target.self_listen())?,
        (None, false) => {}
    }
    let db = open_existing(db_url).await?;
    let admin = Admin::new(notify.attach(db)).with_notify(notify.enabled());
    let machines = admin.machines().await?;
    let machine = find(&machines, target)?;
    let changed = match action {
        Action::Cordon => !machine.unschedulable,
        Action::Uncordon => machine.unschedulable,
        Action::Restart => machine.restart_request.is_none(),
    };
    let done = match action {
        Action::Cordon => admin.cordon(machine.id).await,
        Action::Uncordon => admin.uncordon(machine.id).await,
        Action::Restart => admin.request_restart(machine.id).await,
    };
    match done {
        Ok(()) => {}
        // It was listed a moment ago: it stopped (or was reaped) in between.
        Err(harmonytask::Error::MachineNotFound(_)) => {
            return Err(UsageError(format!(
                "machine {} ({}) is no longer registered; it stopped in the meantime",
                machine.id, machine.host_and_port
            ))
            .into());
        }
        Err(e) => return Err(e.into()),
    }
    if json {
        output::json(&Acted {
            action,
            machine: machine.id,
            host_and_port: &machine.host_and_port,
            changed,
        })?;
        return Ok(EXIT_OK);
    }
    let who = format!("machine {} ({})", machine.id, machine.host_and_port);
    let already = if changed { "" } else { " (it already was)" };
    match action {
        Action::Cordon => outln!(
            "{who} cordoned{already}: it claims no new tasks; running tasks finish, can_yield tasks give way"
        ),
        Action::Uncordon => {
            outln!("{who} uncordoned{already}: it claims tasks again")
        }
        Action::Restart => outln!(
            "{who} asked to restart{already}: it claims nothing new and exits with code 100 once its running tasks have finished"
        ),
    }
    if !notify.enabled() {
        outln!("(--notify off: the machine sees this at its next heartbeat)");
    }
    Ok(EXIT_OK)
}

/// The machine a target names; a usage error when none is registered under it.
fn find<'a>(machines: &'a [MachineRow], target: &MachineTarget) -> anyhow::Result<&'a MachineRow> {
    let found = match target.id {
        Some(id) => machines.iter().find(|m| m.id.0 == id),
        None => machines
            .iter()
            .find(|m| m.host_and_port == target.self_listen()),
    };
    found.ok_or_else(|| {
        let registered = if machines.is_empty() {
            "no machine is registered".to_owned()
        } else {
            let list: Vec<String> = machines
                .iter()
                .take(LISTED_MAX)
                .map(|m| format!("{} ({})", m.id, m.host_and_port))
                .collect();
            let more = machines.len().saturating_sub(LISTED_MAX);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("registered: {}{more}", list.join(", "))
        };
        let what = match target.id {
            Some(id) => format!("no machine with id {id}"),
            None => format!(
                "no machine registered as {} (--self means the node started with `harmony run --listen {}`)",
                target.self_listen(),
                target.self_listen()
            ),
        };
        UsageError(format!("{what}; {registered}")).into()
    })
}
