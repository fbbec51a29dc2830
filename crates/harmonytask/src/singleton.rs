//! IAmBored callbacks and singletons.
//!
//! A type's `iambored` is called when this node has spare capacity for it — after a
//! scheduling pass and on the idle tick — at most once per `iambored_interval` per type (the
//! engine rate-limits it), and at once for a run-now request. It may add tasks.
//!
//! [`singleton`] builds an `iambored` that keeps at most one task of the type in the cluster:
//! it adds a task only when the type's row in `harmony_task_singletons` points at no live task
//! and either `last_run_time + min_interval` has passed or `run_now_request` is set. The check
//! runs inside the insert transaction, under that row's lock, so two nodes can never both add
//! one; the foreign key `task_id → harmony_task ON DELETE SET NULL` frees the row when the task
//! finishes or fails for good.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::TaskAdder;
use crate::store::Store;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What an `iambored` callback gets.
#[derive(Clone)]
pub struct BoredContext {
    /// Adds tasks of the type.
    pub adder: TaskAdder,
    /// Called because an operator asked for a run now.
    pub run_now: bool,
}

/// A type's IAmBored callback.
#[derive(Clone)]
pub struct IAmBored {
    pub(crate) call: Arc<dyn Fn(BoredContext) -> BoxFuture<crate::Result<()>> + Send + Sync>,
    pub(crate) singleton: Option<Duration>,
}

impl fmt::Debug for IAmBored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.singleton {
            Some(d) => write!(f, "IAmBored(singleton every {d:?})"),
            None => f.write_str("IAmBored"),
        }
    }
}

impl IAmBored {
    /// A callback from a closure.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(BoredContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::Result<()>> + Send + 'static,
    {
        IAmBored {
            call: Arc::new(move |ctx| Box::pin(f(ctx))),
            singleton: None,
        }
    }

    /// The interval, when this is a singleton.
    pub fn singleton_interval(&self) -> Option<Duration> {
        self.singleton
    }
}

/// An `iambored` that runs the type as a cluster-wide singleton at most every `min_interval`
/// (or at once on a run-now request).
pub fn singleton(min_interval: Duration) -> IAmBored {
    let last_try: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut bored = IAmBored::new(move |ctx: BoredContext| {
        let last_try = Arc::clone(&last_try);
        async move {
            {
                // Cheap local gate: without a run-now request, ask the database at most once
                // per interval.
                let mut last = last_try.lock().unwrap_or_else(|p| p.into_inner());
                if !ctx.run_now && last.is_some_and(|t| t.elapsed() < min_interval) {
                    return Ok(());
                }
                *last = Some(Instant::now());
            }
            let name = ctx.adder.name().to_owned();
            let now = ctx.adder.now();
            let name = &name;
            ctx.adder
                .add(|id, tx| async move {
                    Store::singleton_take(&tx, name, id, min_interval, now).await
                })
                .await?;
            Ok(())
        }
    });
    bored.singleton = Some(min_interval);
    bored
}
