//! A handle with a relay (`Db::with_relay`): notifications sent in a transaction reach the
//! relay after the commit and never on rollback, none goes through the database's `NOTIFY`,
//! and `Db::listen` hears what the relay's inbound side receives. The handle without the relay
//! keeps using `NOTIFY`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harmony_testkit::TestDb;
use harmonydb::{Inbound, Notification, Relay};

/// A relay that records what it was given and loops it back to its inbound side.
#[derive(Default)]
struct Loopback {
    inbound: Inbound,
    published: Mutex<Vec<String>>,
}

impl Relay for Loopback {
    fn publish(&self, notifications: Vec<Notification>) {
        for n in notifications {
            self.published.lock().unwrap().push(n.payload.clone());
            self.inbound.deliver(&n.channel, &n.payload);
        }
    }

    fn inbound(&self) -> &Inbound {
        &self.inbound
    }
}

async fn relay_publishes_only_what_committed(t: &TestDb) {
    let relay = Arc::new(Loopback::default());
    let db = t.db.with_relay(Arc::clone(&relay) as Arc<dyn Relay>);
    let mut heard = db
        .listen(&["relay_test"])
        .await
        .unwrap()
        .expect("relay listener");
    // On Postgres, a real LISTEN on the plain handle: nothing may arrive through NOTIFY.
    let mut pg = t.db.listen(&["relay_test"]).await.unwrap();

    db.transaction(|tx| async move {
        assert!(tx.relayed());
        tx.notify("relay_test", "rolled back").await?;
        Ok(false)
    })
    .await
    .unwrap();
    db.transaction(|tx| {
        let relay = Arc::clone(&relay);
        async move {
            tx.notify("relay_test", "one").await?;
            tx.notify("relay_test", "two").await?;
            assert!(
                relay.published.lock().unwrap().is_empty(),
                "published before the commit"
            );
            Ok(true)
        }
    })
    .await
    .unwrap();
    db.notify("relay_test", "alone").await.unwrap();
    assert_eq!(*relay.published.lock().unwrap(), ["one", "two", "alone"]);
    for want in ["one", "two", "alone"] {
        assert_eq!(heard.try_recv().unwrap().payload, want);
    }
    assert!(heard.try_recv().is_none());

    if let Some(pg) = pg.as_mut() {
        // The plain handle still notifies through the database: once that arrives, anything
        // the relayed handle had sent through NOTIFY would have arrived before it.
        t.db.notify("relay_test", "plain").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), pg.recv())
            .await
            .expect("NOTIFY on the plain handle")
            .unwrap();
        assert_eq!(n.payload, "plain");
        assert!(pg.try_recv().is_none());
    }
}

harmony_testkit::both_backends!(relay_publishes_only_what_committed);
