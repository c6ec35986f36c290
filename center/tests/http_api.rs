//! The HTTP API over a real socket: every error path, health, metrics, OpenAPI and dispatch.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn error_paths_return_the_documented_status_and_shape() {
    let mut config = test_config();
    config.max_body_bytes = 16_384;
    let h = start(config, two_apps(), vec![]).await;
    let push = "/v1/apps/demo/push";
    let ok_body = json!({"users": ["u1"], "payload": {"hello": 1}});

    // 401: no key, a key of another scheme, an unknown key.
    let m = h
        .post(push, None, ok_body.clone())
        .await
        .error(401, "unauthorized");
    assert!(m.contains("Bearer"), "{m}");
    let a = h
        .client
        .post(h.url(push))
        .header("authorization", "Basic k-demo")
        .body(ok_body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 401);
    h.post(push, Some("nope"), ok_body.clone())
        .await
        .error(401, "unauthorized");
    // 403: a valid key of another app.
    let m = h
        .post(push, Some("k-other"), ok_body.clone())
        .await
        .error(403, "forbidden");
    assert!(m.contains("another app"), "{m}");
    // 404: unknown app.
    let m = h
        .post("/v1/apps/ghost/push", Some("k-demo"), ok_body.clone())
        .await
        .error(404, "not_found");
    assert!(m.contains("ghost"), "{m}");

    // 400: malformed JSON, unknown field, too many users, no users, bad qos, missing payload.
    let a = h
        .send("POST", push, Some("k-demo"), Some("{\"users\": [".into()))
        .await;
    assert!(a.error(400, "bad_request").contains("invalid JSON"));
    // A struct's fields as an array is not an object (serde alone would accept it).
    let m = h
        .post(push, Some("k-demo"), json!([["u"], false, 1]))
        .await
        .error(400, "bad_request");
    assert!(m.contains("expected a JSON object"), "{m}");
    let m = h
        .send(
            "POST",
            "/v1/apps/demo/users/u/kick",
            Some("k-demo"),
            Some("[]".into()),
        )
        .await
        .error(400, "bad_request");
    assert!(m.contains("expected a JSON object"), "{m}");
    let m = h
        .post(
            push,
            Some("k-demo"),
            json!({"users": ["u"], "payload": 1, "priority": 9}),
        )
        .await
        .error(400, "bad_request");
    assert!(m.contains("priority"), "names the unknown field: {m}");
    let users: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let m = h
        .post(push, Some("k-demo"), json!({"users": users, "payload": 1}))
        .await
        .error(400, "bad_request");
    assert!(m.contains("1000"), "names the limit: {m}");
    let m = h
        .post(push, Some("k-demo"), json!({"users": [], "payload": 1}))
        .await
        .error(400, "bad_request");
    assert!(m.contains("1 to 1000"), "{m}");
    let m = h
        .post(
            push,
            Some("k-demo"),
            json!({"users": ["u"], "payload": 1, "qos": 2}),
        )
        .await
        .error(400, "bad_request");
    assert!(m.contains("qos"), "{m}");
    h.post(
        push,
        Some("k-demo"),
        json!({"users": ["u"], "payload": 1, "qos": "1"}),
    )
    .await
    .error(400, "bad_request");
    let m = h
        .post(push, Some("k-demo"), json!({"users": ["u"]}))
        .await
        .error(400, "bad_request");
    assert!(m.contains("payload"), "{m}");

    // 413: a body over max_body_bytes, declared and chunked.
    let big = json!({"users": ["u"], "payload": "x".repeat(20_000)});
    let m = h
        .post(push, Some("k-demo"), big.clone())
        .await
        .error(413, "payload_too_large");
    assert!(m.contains("16384"), "names the limit: {m}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(big.to_string().into_bytes()[..10_000].to_vec()),
        Ok(big.to_string().into_bytes()[10_000..].to_vec()),
    ];
    let resp = h
        .client
        .post(h.url(push))
        .header("authorization", "Bearer k-demo")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // Routes and methods that do not exist are JSON errors too.
    h.get("/v2/nothing", None).await.error(404, "not_found");
    h.send("DELETE", push, Some("k-demo"), None)
        .await
        .error(405, "method_not_allowed");
    h.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let mut apps = two_apps();
    apps.apps[0].rate_limit = longlink_common::apps::RateLimit {
        per_second: 1,
        burst: 2,
    };
    let h = start(test_config(), apps, vec![]).await;
    let path = "/v1/apps/demo/broadcasts/b-none";
    // The bucket holds 2: the first two pass auth (and find no such broadcast).
    h.get(path, Some("k-demo")).await.error(404, "not_found");
    h.get(path, Some("k-demo")).await.error(404, "not_found");
    let a = h.get(path, Some("k-demo")).await;
    let m = a.error(429, "rate_limited");
    assert!(m.contains("1/s") && m.contains("burst 2"), "{m}");
    assert_eq!(a.headers["retry-after"], "1");
    // Another app has its own bucket.
    h.get("/v1/apps/other/broadcasts/b-none", Some("k-other"))
        .await
        .error(404, "not_found");
    h.stop().await;
}

#[tokio::test]
async fn batch_limits_name_the_message_and_each_message_costs_a_token() {
    let mut apps = two_apps();
    apps.apps[0].rate_limit = longlink_common::apps::RateLimit {
        per_second: 1,
        burst: 5,
    };
    let h = start(test_config(), apps, vec![]).await;
    let batch = "/v1/apps/demo/push/batch";
    let one = |user: &str| json!({"users": [user], "payload": {"to": user}});

    // Refusals take no token: the bucket (5) is still full afterwards.
    let m = h
        .post(batch, Some("k-demo"), json!({"messages": []}))
        .await
        .error(400, "bad_request");
    assert!(m.contains("1 to 1000 messages"), "{m}");
    let many: Vec<_> = (0..1001).map(|i| one(&format!("u{i}"))).collect();
    let m = h
        .post(batch, Some("k-demo"), json!({ "messages": many }))
        .await
        .error(400, "bad_request");
    assert!(m.contains("1000") && m.contains("1001"), "{m}");
    let wide: Vec<String> = (0..600).map(|i| format!("u{i}")).collect();
    let m = h
        .post(
            batch,
            Some("k-demo"),
            json!({"messages": [
                {"users": wide, "payload": 1},
                {"users": wide, "payload": 2},
            ]}),
        )
        .await
        .error(400, "bad_request");
    assert!(m.contains("at most 1000 users in total, got 1200"), "{m}");
    let m = h
        .post(
            batch,
            Some("k-demo"),
            json!({"messages": [one("a"), {"users": ["b"], "payload": 1, "qos": 2}]}),
        )
        .await
        .error(400, "bad_request");
    assert!(m.starts_with("messages[1]: qos must be 0 or 1"), "{m}");
    let m = h
        .post(
            batch,
            Some("k-demo"),
            json!({"messages": [{"all": true, "payload": 1}]}),
        )
        .await
        .error(400, "bad_request");
    assert!(m.contains("unknown field `all`"), "{m}");
    let six: Vec<_> = (0..6).map(|i| one(&format!("u{i}"))).collect();
    let m = h
        .post(batch, Some("k-demo"), json!({ "messages": six }))
        .await
        .error(400, "bad_request");
    assert!(m.contains("6 pushes") && m.contains("bursts of 5"), "{m}");
    h.post(batch, None, json!({"messages": [one("a")]}))
        .await
        .error(401, "unauthorized");

    // Four messages take four tokens: one is left, so a batch of two is refused with a wait.
    let four: Vec<_> = (0..4).map(|i| one(&format!("u{i}"))).collect();
    let a = h
        .post(batch, Some("k-demo"), json!({ "messages": four }))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.json);
    let results = a.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    let ids: std::collections::HashSet<&str> =
        results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "every message has its own id");
    let a = h
        .post(
            batch,
            Some("k-demo"),
            json!({"messages": [one("a"), one("b")]}),
        )
        .await;
    a.error(429, "rate_limited");
    assert_eq!(a.headers["retry-after"], "1");
    let last = h.post("/v1/apps/demo/push", Some("k-demo"), one("a")).await;
    assert_eq!(
        last.status, 200,
        "the last token still serves a single push"
    );
    h.stop().await;
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let h = start(test_config(), two_apps(), vec![room(1)]).await;
    let a = h.get("/healthz", None).await;
    assert_eq!((a.status, a.json["status"].as_str()), (200, Some("ok")));

    let a = h.get("/openapi.json", None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    // Every documented operation is routed: none answers the router's own "no such route".
    let paths = a.json["paths"].as_object().unwrap().clone();
    assert_eq!(paths.len(), center::http::ROUTES.len());
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .replace("{app}", "demo")
                .replace("{user}", "u1")
                .replace("{id}", "b-x");
            let concrete = if concrete == "/v1/dispatch" {
                "/v1/dispatch?app=demo&user=u1".to_owned()
            } else {
                concrete
            };
            let a = h
                .send(
                    &method.to_uppercase(),
                    &concrete,
                    Some("k-demo"),
                    Some("{}".into()),
                )
                .await;
            assert!(
                !(a.status == 404 && a.text.contains("no such route")) && a.status != 405,
                "{method} {path} is documented but not routed: {} {}",
                a.status,
                a.text
            );
        }
    }

    let a = h.get("/metrics", None).await;
    assert_eq!(a.status, 200);
    assert!(a.text.contains("center_http_requests_total"), "{}", a.text);
    h.stop().await;
}

#[tokio::test]
async fn dispatch_is_stable_for_the_same_room_set() {
    let rooms: Vec<_> = (0..6).map(room).collect();
    let h = start(test_config(), two_apps(), rooms.clone()).await;
    let first = h.get("/v1/dispatch?app=demo&user=alice", None).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let list = first.json["rooms"].as_array().unwrap().clone();
    assert_eq!(list.len(), 3);
    assert!(list[0]["tcp"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        list[0].get("grpc").is_none(),
        "internal address not shown to devices"
    );
    for _ in 0..5 {
        assert_eq!(
            h.get("/v1/dispatch?app=demo&user=alice", None).await.json,
            first.json
        );
    }
    // The same set listed in another order, then without a room that was not chosen first.
    let first_id = list[0]["id"].as_str().unwrap().to_owned();
    let mut reordered = rooms.clone();
    reordered.reverse();
    h.rooms
        .send_replace(std::sync::Arc::new(center::rooms::sorted(reordered)));
    assert_eq!(
        h.get("/v1/dispatch?app=demo&user=alice", None).await.json,
        first.json
    );
    let fewer: Vec<_> = rooms
        .iter()
        .filter(|r| r.id != list[2]["id"].as_str().unwrap())
        .cloned()
        .collect();
    h.rooms
        .send_replace(std::sync::Arc::new(center::rooms::sorted(fewer)));
    let after = h.get("/v1/dispatch?app=demo&user=alice", None).await;
    assert_eq!(after.json["rooms"][0]["id"], first_id.as_str());

    // Errors: unknown app, missing user, no rooms.
    h.get("/v1/dispatch?app=ghost&user=u", None)
        .await
        .error(404, "not_found");
    h.get("/v1/dispatch?app=demo", None)
        .await
        .error(400, "bad_request");
    h.rooms.send_replace(std::sync::Arc::new(vec![]));
    h.get("/v1/dispatch?app=demo&user=u", None)
        .await
        .error(503, "unavailable");
    h.stop().await;
}

#[tokio::test]
async fn grpc_api_checks_keys_and_limits_like_http() {
    use longlink_proto::centerpb;
    use longlink_proto::centerpb::center_client::CenterClient;
    let h = start(test_config(), two_apps(), (0..4).map(room).collect()).await;
    let mut client = CenterClient::connect(format!("http://{}", h.grpc))
        .await
        .unwrap();
    let push = |key: Option<&str>, users: Vec<String>, payload: &[u8]| {
        let mut req = tonic::Request::new(centerpb::PushRequest {
            app: "demo".into(),
            users,
            all: false,
            payload_json: payload.to_vec(),
            qos: 0,
            ttl_s: 0,
        });
        if let Some(key) = key {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        req
    };
    let code =
        |r: Result<tonic::Response<centerpb::PushResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(client.push(push(None, vec!["u".into()], b"1")).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(
            client
                .push(push(Some("k-other"), vec!["u".into()], b"1"))
                .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            client
                .push(push(Some("k-demo"), vec!["u".into()], b"{nope"))
                .await
        ),
        tonic::Code::InvalidArgument
    );
    let many = (0..1001).map(|i| format!("u{i}")).collect();
    let status = client
        .push(push(Some("k-demo"), many, b"1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("1000"), "{}", status.message());

    // A batch over gRPC: one answer per message; a bad message is named by its index.
    let message = |user: &str, payload: &[u8]| centerpb::BatchMessage {
        users: vec![user.into()],
        payload_json: payload.to_vec(),
        qos: 0,
        ttl_s: 0,
    };
    let batch = |messages: Vec<centerpb::BatchMessage>| {
        let mut req = tonic::Request::new(centerpb::PushBatchRequest {
            app: "demo".into(),
            messages,
        });
        req.metadata_mut()
            .insert("authorization", "Bearer k-demo".parse().unwrap());
        req
    };
    let done = client
        .push_batch(batch(vec![message("a", b"1"), message("b", b"{\"x\":2}")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.results.len(), 2);
    assert_ne!(done.results[0].id, done.results[1].id);
    let status = client
        .push_batch(batch(vec![message("a", b"1"), message("b", b"{nope")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("messages[1]"),
        "{}",
        status.message()
    );

    // Dispatch over gRPC agrees with HTTP.
    let d = client
        .dispatch(centerpb::DispatchRequest {
            app: "demo".into(),
            user: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let http = h.get("/v1/dispatch?app=demo&user=alice", None).await;
    let ids: Vec<&str> = d.rooms.iter().map(|r| r.id.as_str()).collect();
    let http_ids: Vec<&str> = http.json["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, http_ids);
    drop(client);
    h.stop().await;
}
