//! `harmony run` child processes: the real node, as users run it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::store::BenchStore;
use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A running node process; killed if dropped while running.
pub(crate) struct NodeProcess {
    child: Child,
    /// Its `--listen` identity.
    pub listen: String,
}

impl NodeProcess {
    /// Starts `harmony run` on `url` with extra arguments.
    pub(crate) fn spawn(exe: &Path, url: &str, extra: &[&str]) -> anyhow::Result<NodeProcess> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(exe)
            .arg("--db")
            .arg(url)
            .arg("--log")
            .arg("warn")
            .arg("run")
            .arg("--listen")
            .arg(&listen)
            .arg("--builtin")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(NodeProcess { child, listen })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Waits until the node has registered its machine row.
    pub(crate) async fn wait_registered(&mut self, store: &BenchStore) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("node {} exited during start-up: {status}", self.listen);
            }
            if store.machine_registered(&self.listen).await? {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("node {} did not register within 60 s", self.listen);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Crash: SIGKILL, waiting for the exit.
    pub(crate) async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Graceful stop (SIGTERM), waiting for the exit.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("node {} did not stop within 60 s of SIGTERM", self.listen)
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
