//! The peering router served on a real socket: a signed request reaches a listener opened with
//! `Db::listen` on a handle with the relay; forged, stale, replayed, oversized and malformed
//! requests are refused with their status and counted under their reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harmony_peer::{
    BODY_BYTES_MAX, ClusterSecret, HINTS_PATH, HttpRelay, PeerConfig, PeerState, Refusal,
    SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use harmony_testkit::TestDb;
use harmonydb::{Db, Relay};
use harmonytask::Admin;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SECRET: &str = "a-cluster-secret-for-tests";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Posts `body` with the given headers; the status and the answer's text.
async fn post(addr: &str, headers: &[(&str, String)], body: Vec<u8>) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::post(format!("http://{addr}{HINTS_PATH}"));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn signed(secret: &ClusterSecret, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let ts = ts.to_string();
    let sig = secret.sign(&ts, body);
    vec![(TIMESTAMP_HEADER, ts), (SIGNATURE_HEADER, sig)]
}

async fn serve(db: &Db) -> (Arc<HttpRelay>, String) {
    let secret = ClusterSecret::new(SECRET).unwrap();
    let (relay, _sender) = HttpRelay::new(PeerConfig::new(secret, ""), Admin::new(db.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = harmony_peer::router(PeerState::new(&relay));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (relay, addr)
}

#[tokio::test]
async fn signed_hints_reach_the_listener_and_bad_ones_are_refused_and_counted() {
    let t = TestDb::sqlite().await;
    let (relay, addr) = serve(&t.db).await;
    let db = t.db.with_relay(Arc::clone(&relay) as Arc<dyn Relay>);
    let mut listener = db
        .listen(&["harmony"])
        .await
        .unwrap()
        .expect("a relay listener");
    let secret = ClusterSecret::new(SECRET).unwrap();
    let body = br#"{"from":"x:1","nonce":1,"hints":[{"channel":"harmony","payload":"add:t:7"},{"channel":"other","payload":"ignored"}]}"#.to_vec();

    let (status, _) = post(&addr, &signed(&secret, now_ms(), &body), body.clone()).await;
    assert_eq!(status, 204);
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("delivered")
        .unwrap();
    assert_eq!(
        (n.channel.as_str(), n.payload.as_str()),
        ("harmony", "add:t:7")
    );
    assert_eq!(relay.metrics().accepted_count(), 1);

    // Forged: signed with another secret.
    let other = ClusterSecret::new("not-the-cluster-secret").unwrap();
    let (status, text) = post(&addr, &signed(&other, now_ms(), &body), body.clone()).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("bad_signature"), "{text}");
    assert_eq!(relay.metrics().refused_count(Refusal::BadSignature), 1);

    // Replayed: the accepted request again, byte for byte.
    let ts = now_ms();
    let headers = signed(&secret, ts, b"{\"from\":\"\",\"nonce\":2,\"hints\":[]}");
    let replay_body = b"{\"from\":\"\",\"nonce\":2,\"hints\":[]}".to_vec();
    assert_eq!(post(&addr, &headers, replay_body.clone()).await.0, 204);
    let (status, text) = post(&addr, &headers, replay_body).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("replay"), "{text}");
    assert_eq!(relay.metrics().refused_count(Refusal::Replay), 1);

    // Stale: a correct signature of a timestamp a minute old.
    let (status, text) = post(&addr, &signed(&secret, ts - 60_000, &body), body.clone()).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("stale"), "{text}");
    assert_eq!(relay.metrics().refused_count(Refusal::Stale), 1);

    // Too large, before any signature is checked.
    let big = vec![b' '; BODY_BYTES_MAX + 1];
    let (status, text) = post(&addr, &signed(&secret, now_ms(), &big), big).await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(relay.metrics().refused_count(Refusal::TooLarge), 1);

    // Signed, but not a hint body; and no headers at all.
    let junk = b"not json".to_vec();
    let (status, text) = post(&addr, &signed(&secret, now_ms(), &junk), junk.clone()).await;
    assert_eq!(status, 400, "{text}");
    let (status, _) = post(&addr, &[], junk).await;
    assert_eq!(status, 400);
    assert_eq!(relay.metrics().refused_count(Refusal::Malformed), 2);

    // Nothing refused reached the listener.
    assert_eq!(relay.metrics().accepted_count(), 2);
    assert!(listener.try_recv().is_none());

    // The counters are in the registry under their names.
    let mut registry = prometheus_client::registry::Registry::default();
    relay.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("harmony_peer_hint_requests_refused_total{reason=\"bad_signature\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("harmony_peer_hint_requests_accepted_total 2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_relay_publishes_after_commit_and_nothing_on_rollback() {
    let t = TestDb::sqlite().await;
    let (relay, _addr) = serve(&t.db).await;
    let db = t.db.with_relay(Arc::clone(&relay) as Arc<dyn Relay>);
    let mut listener = db.listen(&["harmony"]).await.unwrap().unwrap();
    db.transaction(|tx| async move {
        tx.notify("harmony", "rolled-back").await?;
        Ok(false)
    })
    .await
    .unwrap();
    assert!(listener.try_recv().is_none());
    db.transaction(|tx| async move {
        tx.notify("harmony", "committed").await?;
        Ok(true)
    })
    .await
    .unwrap();
    assert_eq!(listener.try_recv().unwrap().payload, "committed");
    db.notify("harmony", "alone").await.unwrap();
    assert_eq!(listener.try_recv().unwrap().payload, "alone");
}
