//! The coordinator against a real receiving HTTP server: signed events reported through the
//! gRPC Coordinator service, retries on 500, and drops (counted) when the queue is full.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::hook::*;
use common::*;
use longlink_proto::centerpb;
use longlink_proto::centerpb::coordinator_client::CoordinatorClient;
use tokio::sync::Semaphore;

fn uplink(app: &str, user: &str, n: u64) -> centerpb::Event {
    centerpb::Event {
        kind: centerpb::event::Kind::Uplink as i32,
        app: app.into(),
        user: user.into(),
        device: "phone".into(),
        conn_id: 7,
        room: "room-1".into(),
        ts: 1_700_000_000_000,
        payload_json: serde_json::to_vec(&serde_json::json!({"n": n})).unwrap(),
        reason: String::new(),
    }
}

#[tokio::test]
async fn signed_uplink_and_offline_reach_the_webhook() {
    let (url, seen) = receiver(0, open_gate()).await;
    let mut apps = two_apps();
    apps.apps[0].webhook_url = Some(url);
    let h = start(test_config(), apps, vec![]).await;
    let mut client = CoordinatorClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let mut offline = uplink("demo", "u2", 0);
    offline.kind = centerpb::event::Kind::Offline as i32;
    offline.reason = "closed".into();
    // `other` has no webhook: its event is not queued.
    let answer = client
        .report(centerpb::ReportRequest {
            events: vec![uplink("demo", "u1", 1), offline, uplink("other", "x", 2)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.queued, answer.not_queued), (2, 1));

    testkit::wait_until("two webhook POSTs", Duration::from_secs(10), || {
        let n = seen.lock().unwrap().len();
        async move { (n >= 2).then_some(()) }
    })
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    let mut types = vec![];
    for (id, ts, sig, body) in &seen {
        assert!(id.starts_with("e-"), "event id header: {id:?}");
        assert_eq!(
            sig,
            &expected_signature("demo-secret", ts, body),
            "signature"
        );
        assert!(center::webhook::verify(
            "demo-secret",
            ts.parse().unwrap(),
            body,
            sig
        ));
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["app"], "demo");
        assert_eq!(&event["id"], id.as_str());
        types.push(event["type"].as_str().unwrap().to_owned());
        if event["type"] == "uplink" {
            assert_eq!(event["payload"]["n"], 1);
            assert_eq!(
                (event["user"].as_str(), event["conn_id"].as_str()),
                (Some("u1"), Some("7"))
            );
        } else {
            assert_eq!(
                (event["user"].as_str(), event["reason"].as_str()),
                (Some("u2"), Some("closed"))
            );
        }
    }
    types.sort();
    assert_eq!(types, ["offline", "uplink"]);
    h.stop().await;
}

#[tokio::test]
async fn a_500_is_retried_until_accepted() {
    let (url, seen) = receiver(2, open_gate()).await;
    let mut apps = two_apps();
    apps.apps[0].webhook_url = Some(url);
    let h = start(test_config(), apps, vec![]).await;
    let mut client = CoordinatorClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    client
        .report(centerpb::ReportRequest {
            events: vec![uplink("demo", "u1", 1)],
        })
        .await
        .unwrap();
    let stats = h.center.coordinator().stats();
    testkit::wait_until("delivery after two 500s", Duration::from_secs(10), || {
        let done = stats.delivered.load(Ordering::SeqCst);
        async move { (done == 1).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(stats.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(stats.failed.load(Ordering::SeqCst), 0);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    // The same event (id, body) each time, re-signed at each attempt.
    assert!(seen.iter().all(|s| s.0 == seen[0].0 && s.3 == seen[0].3));
    h.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let gate = Arc::new(Semaphore::new(0));
    let (url, seen) = receiver(0, gate.clone()).await;
    let mut apps = two_apps();
    apps.apps[0].webhook_url = Some(url);
    let mut config = test_config();
    config.webhook.queue = 2;
    config.webhook.concurrency = 1;
    let h = start(config, apps, vec![]).await;
    // The webhook hangs: one delivery in flight, then the queue fills, then drops.
    let mut queued: u64 = 0;
    for n in 0..10 {
        let event = center::webhook::Event {
            id: format!("e-{n}"),
            app: "demo".into(),
            user: "u".into(),
            device: String::new(),
            conn_id: String::new(),
            room: String::new(),
            ts: 0,
            kind: center::webhook::EventKind::Online,
        };
        if h.center.coordinator().submit(event) {
            queued += 1;
        }
        if n == 0 {
            // Let the worker take the first event so the in-flight one is deterministic.
            testkit::wait_until("first POST in flight", Duration::from_secs(5), || {
                let a = h
                    .center
                    .coordinator()
                    .stats()
                    .attempts
                    .load(Ordering::SeqCst);
                async move { (a == 1).then_some(()) }
            })
            .await
            .unwrap();
        }
    }
    let stats = h.center.coordinator().stats();
    let dropped = stats.dropped.load(Ordering::SeqCst);
    assert_eq!(queued + dropped, 10);
    // 1 in flight + 2 queued; the worker takes no event while its only slot is busy.
    assert_eq!((queued, dropped), (3, 7));
    let metrics = h.get("/metrics", None).await.text;
    assert!(
        metrics.contains("center_webhook_dropped_total"),
        "{metrics}"
    );

    gate.add_permits(100);
    testkit::wait_until("queued events delivered", Duration::from_secs(10), || {
        let d = stats.delivered.load(Ordering::SeqCst);
        async move { (d == queued).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(seen.lock().unwrap().len() as u64, queued);
    h.stop().await;
}
