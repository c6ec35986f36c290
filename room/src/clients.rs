//! gRPC clients of other services' instances, kept per instance id and remade when the
//! instance's address changes (a restarted instance may come back elsewhere).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use longlink_proto::OneWrite;

/// A channel to another service's instance; unary calls go out in one write (`OneWrite`).
pub type Channel = OneWrite<tonic::transport::Channel>;

/// How long a connection attempt to another service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Clients by instance id: `make` wraps a lazily connecting channel with `timeout` per call.
pub struct Clients<C> {
    by_id: Mutex<HashMap<String, (String, C)>>,
    make: fn(Channel) -> C,
    timeout: Duration,
}

impl<C: Clone> Clients<C> {
    pub fn new(make: fn(Channel) -> C, timeout: Duration) -> Clients<C> {
        Clients {
            by_id: Mutex::new(HashMap::new()),
            make,
            timeout,
        }
    }

    /// The client of instance `id` at `addr` (`host:port` or a URL); `None` for an address
    /// that is not a valid URI.
    pub fn get(&self, id: &str, addr: &str) -> Option<C> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, c)) = by_id.get(id)
            && a == addr
        {
            return Some(c.clone());
        }
        let url = if addr.starts_with("http") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = tonic::transport::Channel::from_shared(url)
            .ok()?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(self.timeout)
            .initial_stream_window_size(longlink_common::GRPC_STREAM_WINDOW)
            .initial_connection_window_size(longlink_common::GRPC_CONNECTION_WINDOW)
            .connect_lazy();
        let client = (self.make)(OneWrite::new(channel));
        by_id.insert(id.to_string(), (addr.to_string(), client.clone()));
        Some(client)
    }
}
