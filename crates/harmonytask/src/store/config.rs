//! Configuration layers: TOML documents by title in `harmony_config`, every version kept in
//! `harmony_config_history` with its time. The store keeps text only; what a layer means (and
//! whether it is valid) is decided by whoever writes it, before `config_set`.

use harmonydb::{Executor, Timestamp};

use super::Store;
use crate::error::Result;
use crate::hint::CONFIG_CHANNEL;
use crate::model::{ConfigLayer, ConfigLayerRow, ConfigVersion};

/// Most layers listed, and most versions of one layer read, by one call.
pub(crate) const CONFIG_ROWS_MAX: i64 = 10_000;

impl Store {
    /// Every layer, by title, with its size and last change.
    pub async fn config_list(&self) -> Result<Vec<ConfigLayerRow>> {
        Ok(self
            .db
            .select(
                "SELECT title, timestamp, LENGTH(config) AS bytes FROM harmony_config ORDER BY title LIMIT $1",
                &[&CONFIG_ROWS_MAX],
            )
            .await?)
    }

    /// The layers named that exist, in the order asked (a node reads its few layers).
    pub async fn config_get_many(&self, titles: &[String]) -> Result<Vec<ConfigLayer>> {
        let mut out = Vec::with_capacity(titles.len());
        for t in titles {
            if let Some(l) = self.config_get(t).await? {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// One layer, if it exists.
    pub async fn config_get(&self, title: &str) -> Result<Option<ConfigLayer>> {
        Ok(self
            .db
            .query_opt(
                "SELECT title, config, timestamp FROM harmony_config WHERE title = $1",
                &[&title],
            )
            .await?)
    }

    /// Writes a layer and its history row in one transaction, and tells the nodes (on
    /// [`CONFIG_CHANNEL`]). `false` when the text is what the layer already holds (nothing is
    /// written then).
    pub async fn config_set(&self, title: &str, config: &str, now: Timestamp) -> Result<bool> {
        let changed = self
            .db
            .transaction(|tx| async move {
                let old: Option<(String,)> = tx
                    .query_opt(
                        "SELECT config FROM harmony_config WHERE title = $1",
                        &[&title],
                    )
                    .await?;
                if old.as_ref().map(|(c,)| c.as_str()) == Some(config) {
                    return Ok(Some(false));
                }
                tx.exec(
                    "INSERT INTO harmony_config (title, config, timestamp) VALUES ($1, $2, $3)
                     ON CONFLICT (title) DO UPDATE SET config = excluded.config, timestamp = excluded.timestamp",
                    &[&title, &config, &now],
                )
                .await?;
                tx.exec(
                    "INSERT INTO harmony_config_history (title, config, changed_at) VALUES ($1, $2, $3)",
                    &[&title, &config, &now],
                )
                .await?;
                tx.notify(CONFIG_CHANNEL, title).await?;
                Ok(Some(true))
            })
            .await?;
        Ok(changed.unwrap_or(false))
    }

    /// Removes a layer (its history stays); `false` when there was none.
    pub async fn config_remove(&self, title: &str) -> Result<bool> {
        let removed = self
            .db
            .transaction(|tx| async move {
                let n = tx
                    .exec("DELETE FROM harmony_config WHERE title = $1", &[&title])
                    .await?;
                if n > 0 {
                    tx.notify(CONFIG_CHANNEL, title).await?;
                }
                Ok(Some(n > 0))
            })
            .await?;
        Ok(removed.unwrap_or(false))
    }

    /// The versions of a layer, oldest first, numbered from 1 (at most
    /// [`CONFIG_ROWS_MAX`], the newest ones).
    pub async fn config_history(&self, title: &str) -> Result<Vec<ConfigVersion>> {
        let rows: Vec<(i64, String, Timestamp)> = self
            .db
            .select(
                "SELECT id, config, changed_at FROM harmony_config_history WHERE title = $1 ORDER BY id DESC LIMIT $2",
                &[&title, &CONFIG_ROWS_MAX],
            )
            .await?;
        let total: i64 = self
            .db
            .scalar(
                "SELECT COUNT(*) FROM harmony_config_history WHERE title = $1",
                &[&title],
            )
            .await?;
        let first = total - rows.len() as i64 + 1;
        Ok(rows
            .into_iter()
            .rev()
            .enumerate()
            .map(|(i, (_, config, changed_at))| ConfigVersion {
                version: first + i as i64,
                config,
                changed_at,
            })
            .collect())
    }
}
