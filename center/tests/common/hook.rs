//! A webhook receiver for tests, and the signature computed independently of center's code.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use hmac::Mac;
use tokio::sync::Semaphore;

/// What the receiving server saw: (event id header, timestamp header, signature header, body).
pub type Seen = Arc<Mutex<Vec<(String, String, String, Vec<u8>)>>>;

/// A webhook receiver on 127.0.0.1:0. It answers 500 to the first `fail_first` POSTs, and
/// waits for a permit from `gate` before answering each POST.
pub async fn receiver(fail_first: usize, gate: Arc<Semaphore>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let record = seen.clone();
    let handler = move |headers: HeaderMap, body: Bytes| {
        let record = record.clone();
        let calls = calls.clone();
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            record.lock().unwrap().push((
                h("x-longlink-event"),
                h("x-longlink-timestamp"),
                h("x-longlink-signature"),
                body.to_vec(),
            ));
            if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NO_CONTENT
            }
        }
    };
    let router = axum::Router::new().route("/hook", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, seen)
}

pub fn open_gate() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))
}

/// HMAC-SHA256 computed here, independently of center's code.
pub fn expected_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}
