//! The cluster under test: its endpoints in the order connections use them, and how to open
//! gRPC connections to it.

use std::time::Duration;

use anyhow::Context;
use etcd_client::Client;
use etcd_client::ConnectOptions;
use longlink_proto::OneWrite;
use longlink_proto::etcdserverpb::kv_client::KvClient;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

/// The KV client of the put and get phases: the generated one over a plain channel, each unary
/// request sent in one write (as etcd's Go client does; see `longlink_proto::OneWrite`).
pub type Kv = KvClient<OneWrite<Channel>>;

pub struct Cluster {
    /// Full URLs. Connection `k` goes to `endpoints[k % len]`; the leader is last, so a lone
    /// connection talks to a follower (its writes are forwarded) on keeper and etcd alike,
    /// and with many connections the load is spread evenly over the nodes.
    pub endpoints: Vec<String>,
    pub leader: Option<String>,
    pub version: String,
    /// Per-request timeout of every connection.
    pub timeout: Duration,
}

impl Cluster {
    /// Asks every endpoint for its status (which also proves it is up) and orders them.
    pub async fn discover(endpoints: &[String], timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!endpoints.is_empty(), "no endpoints given");
        let mut endpoints: Vec<String> = endpoints.iter().map(|e| url(e)).collect();
        let mut version = String::new();
        let mut leader = None;
        for endpoint in &endpoints {
            let mut client = connect_one(endpoint, Some(timeout)).await?;
            let status = client
                .status()
                .await
                .with_context(|| format!("status of {endpoint}"))?;
            if version.is_empty() {
                version = status.version().to_owned();
            }
            let member = status.header().map(|h| h.member_id());
            if member.is_some_and(|m| m != 0 && m == status.leader()) {
                leader = Some(endpoint.clone());
            }
        }
        if let Some(leader) = &leader {
            endpoints.retain(|e| e != leader);
            endpoints.push(leader.clone());
        }
        Ok(Self {
            endpoints,
            leader,
            version,
            timeout,
        })
    }

    /// `count` independent gRPC connections (one HTTP/2 connection each), round robin over
    /// the endpoints, for unary requests.
    pub async fn connect(&self, count: usize) -> anyhow::Result<Vec<Client>> {
        self.connect_with(count, Some(self.timeout)).await
    }

    /// `count` KV clients on independent HTTP/2 connections, round robin over the endpoints, for
    /// the closed-loop phases. Connected before they are returned, so that no phase measures
    /// connection set-up.
    pub async fn connect_kv(&self, count: usize) -> anyhow::Result<Vec<Kv>> {
        let mut clients = Vec::with_capacity(count);
        for k in 0..count {
            let endpoint = &self.endpoints[k % self.endpoints.len()];
            let channel = Endpoint::from_shared(endpoint.clone())
                .with_context(|| format!("bad endpoint {endpoint}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(self.timeout)
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {endpoint}"))?;
            clients.push(KvClient::new(OneWrite::new(channel)));
        }
        Ok(clients)
    }

    /// Like [`Cluster::connect`], without the request timeout, which would otherwise also bound
    /// how long a watch stream may take to open.
    pub async fn connect_for_watch(&self, count: usize) -> anyhow::Result<Vec<Client>> {
        self.connect_with(count, None).await
    }

    async fn connect_with(
        &self,
        count: usize,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Vec<Client>> {
        let mut clients = Vec::with_capacity(count);
        for k in 0..count {
            let endpoint = &self.endpoints[k % self.endpoints.len()];
            clients.push(connect_one(endpoint, timeout).await?);
        }
        Ok(clients)
    }
}

async fn connect_one(endpoint: &str, timeout: Option<Duration>) -> anyhow::Result<Client> {
    let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    if let Some(timeout) = timeout {
        options = options.with_timeout(timeout);
    }
    Client::connect([endpoint], Some(options))
        .await
        .with_context(|| format!("cannot connect to {endpoint}"))
}

fn url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}
