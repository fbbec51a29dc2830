//! `harmony machine ls`.

use harmonytask::resources::format_bytes;
use harmonytask::store::Store;

use crate::cli::MachineCommand;
use crate::commands::{EXIT_OK, open_existing};
use crate::output::{self, Table};

/// Runs one `machine` subcommand.
pub async fn run(db_url: &str, json: bool, cmd: MachineCommand) -> anyhow::Result<u8> {
    match cmd {
        MachineCommand::Ls => {
            let db = open_existing(db_url).await?;
            let machines = Store::new(db).machine_list().await?;
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
                ]);
            }
            if t.is_empty() {
                println!("no machines registered");
            } else {
                t.print();
            }
            Ok(EXIT_OK)
        }
    }
}
