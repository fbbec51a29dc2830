//! Task type names: the one rule every entry point checks (the engine, clients, followers).

use crate::error::{Error, Result};

/// Longest task type name (a `VARCHAR(16)` column upstream).
pub const TASK_NAME_MAX: usize = 16;

/// Checks a task type name: 1–16 characters of `[A-Za-z0-9_:]`.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidName("task type name is empty".into()));
    }
    if name.chars().count() > TASK_NAME_MAX {
        return Err(Error::InvalidName(format!(
            "task type name {name:?} is {} characters long; the limit is {TASK_NAME_MAX}",
            name.chars().count()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == ':'))
    {
        return Err(Error::InvalidName(format!(
            "task type name {name:?} contains {bad:?}; use only A-Z, a-z, 0-9, _ and :"
        )));
    }
    Ok(())
}
