//! Wake-up hints between nodes: the channel and the payload format.
//!
//! Plain values, so that the store (which sends hints inside its transactions) and the
//! listener in `notify` (which parses them) share one format without importing each other.
//!
//! Hint payloads are short text: `add:TYPE:FROM`, `addt:TYPE:FROM:ID:POSTED_MS`, `rel:TYPE:FROM`,
//! `follow:TYPE:FROM`, `runnow:TYPE:FROM`, `machines:FROM`, `cancel:ID:FROM`, where FROM is the
//! sending machine (0 for a client), so a node ignores its own hints.

use harmonydb::Timestamp;

use crate::model::{MachineId, TaskId};

/// The notification channel.
pub(crate) const CHANNEL: &str = "harmony";

/// The channel a config layer change is announced on; the payload is the layer's title. A
/// hint like the others: nodes also poll their layers.
pub const CONFIG_CHANNEL: &str = "harmony_config";

/// One wake-up hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hint {
    /// New task(s) of a type; with the id and posted time when it is a single task.
    Added {
        name: String,
        task: Option<(TaskId, Timestamp)>,
    },
    /// Tasks of a type were released (retry, preemption, shutdown).
    Released { name: String },
    /// Completions of a type queued follow-ups.
    Follow { from: String },
    /// An operator asked a singleton to run now.
    RunNow { name: String },
    /// Machines changed: one died, or an operator cordoned or restarted one.
    Machines,
    /// An operator cancelled a task: its owner stops the attempt.
    Cancel { task: TaskId },
}

impl Hint {
    /// The payload, tagged with the sender.
    pub(crate) fn payload(&self, from: MachineId) -> String {
        match self {
            Hint::Added {
                name,
                task: Some((id, posted)),
            } => {
                format!("addt:{name}:{from}:{id}:{}", posted.as_millis())
            }
            Hint::Added { name, task: None } => format!("add:{name}:{from}"),
            Hint::Released { name } => format!("rel:{name}:{from}"),
            Hint::Follow { from: f } => format!("follow:{f}:{from}"),
            Hint::RunNow { name } => format!("runnow:{name}:{from}"),
            Hint::Machines => format!("machines:{from}"),
            Hint::Cancel { task } => format!("cancel:{task}:{from}"),
        }
    }

    /// Parses a payload; returns the hint and its sender. Anything malformed is `None`
    /// (ignored: hints never carry anything that must not be lost).
    pub(crate) fn parse(payload: &str) -> Option<(Hint, MachineId)> {
        let parts: Vec<&str> = payload.split(':').collect();
        let machine = |s: &str| s.parse::<i64>().ok().map(MachineId);
        // Type names may contain ':' (e.g. "bg:Cleanup"); the sender and optional fields are at
        // fixed positions from the end.
        match parts.first().copied()? {
            "machines" if parts.len() == 2 => Some((Hint::Machines, machine(parts[1])?)),
            "cancel" if parts.len() == 3 => {
                let task = TaskId(parts[1].parse().ok()?);
                Some((Hint::Cancel { task }, machine(parts[2])?))
            }
            kind => {
                let rest = &parts[1..];
                let with_task = kind == "addt";
                let (name_parts, tail) = if with_task {
                    rest.split_at(rest.len().checked_sub(3)?)
                } else {
                    rest.split_at(rest.len().checked_sub(1)?)
                };
                let name = name_parts.join(":");
                if name.is_empty() {
                    return None;
                }
                let from = machine(tail[0])?;
                let hint = match kind {
                    "addt" => {
                        let id = TaskId(tail[1].parse().ok()?);
                        let posted = Timestamp::from_millis(tail[2].parse().ok()?);
                        Hint::Added {
                            name,
                            task: Some((id, posted)),
                        }
                    }
                    "add" => Hint::Added { name, task: None },
                    "rel" => Hint::Released { name },
                    "follow" => Hint::Follow { from: name },
                    "runnow" => Hint::RunNow { name },
                    _ => return None,
                };
                Some((hint, from))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let me = MachineId(7);
        let cases = [
            Hint::Added {
                name: "SDR".into(),
                task: Some((TaskId(42), Timestamp::from_millis(1_700_000_000_123))),
            },
            Hint::Added {
                name: "bg:Clean".into(),
                task: None,
            },
            Hint::Released {
                name: "PoRep".into(),
            },
            Hint::Follow { from: "a:b".into() },
            Hint::RunNow {
                name: "WdPost".into(),
            },
            Hint::Machines,
            Hint::Cancel { task: TaskId(9) },
        ];
        for h in cases {
            let p = h.payload(me);
            assert_eq!(Hint::parse(&p), Some((h.clone(), me)), "{p}");
        }
    }

    #[test]
    fn garbage_is_ignored() {
        for p in [
            "",
            "add",
            "add::1",
            "nope:x:1",
            "add:x:notanumber",
            "addt:x:1:2",
            "machines",
            "cancel:x:1",
            "cancel:1",
        ] {
            assert_eq!(Hint::parse(p), None, "{p}");
        }
    }
}
