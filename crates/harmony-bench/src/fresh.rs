//! A fresh database per workload: a temporary SQLite file, or a new Postgres schema that is
//! dropped afterwards.

use anyhow::Context;
use harmonydb::{BackendConfig, Db, DbConfig};

/// A throw-away database.
pub struct FreshDb {
    /// URL that opens it (for child processes too).
    pub url: String,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
}

impl FreshDb {
    /// Creates one on the backend of `base_url`, migrated.
    pub async fn create(base_url: &str) -> anyhow::Result<FreshDb> {
        let cfg = DbConfig::from_url(base_url).context("parsing the benchmark database URL")?;
        let (url, backend, dir) = match cfg.backend {
            BackendConfig::Sqlite(_) => {
                let dir = tempfile::Builder::new()
                    .prefix("harmony-bench")
                    .tempdir()
                    .context("creating a temporary directory")?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                (url, "sqlite", Some(dir))
            }
            BackendConfig::Postgres(_) => {
                let schema = format!(
                    "bench_{}",
                    (0..10).map(|_| fastrand::lowercase()).collect::<String>()
                );
                // A benchmark schema of its own; remove any schema option the URL had.
                let base = strip_option(base_url, "schema");
                let sep = if base.contains('?') { '&' } else { '?' };
                (format!("{base}{sep}schema={schema}"), "postgres", None)
            }
        };
        let fresh = FreshDb {
            url,
            backend,
            _dir: dir,
        };
        // Migrate once, so concurrent openers (nodes) find the schema ready.
        let db = fresh.open().await?;
        drop(db);
        Ok(fresh)
    }

    /// Opens a handle (own connections).
    pub async fn open(&self) -> anyhow::Result<Db> {
        let cfg = DbConfig::from_url(&self.url)?;
        Db::open(cfg).await.with_context(|| {
            format!(
                "opening benchmark database {}",
                harmonydb::redact(&self.url)
            )
        })
    }

    /// Drops the Postgres schema (the SQLite directory goes when this is dropped).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        if self.backend == "postgres" {
            let mut cfg = DbConfig::from_url(&self.url)?;
            cfg.migrate_on_open = false;
            Db::open(cfg).await?.drop_own_schema().await?;
        }
        Ok(())
    }
}

fn strip_option(url: &str, key: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.starts_with(&format!("{key}=")))
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_schema() {
        assert_eq!(
            strip_option("postgres://h/db?schema=x&pool_size=4", "schema"),
            "postgres://h/db?pool_size=4"
        );
        assert_eq!(
            strip_option("postgres://h/db?schema=x", "schema"),
            "postgres://h/db"
        );
        assert_eq!(strip_option("postgres://h/db", "schema"), "postgres://h/db");
    }
}
