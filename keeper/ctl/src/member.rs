//! `keeperctl member list|add|promote|remove` and `keeperctl status`: the keeper's own cluster,
//! through its etcd Cluster and Maintenance APIs.

use anyhow::anyhow;
use anyhow::bail;
use longlink_proto::etcdserverpb::Member;
use longlink_proto::etcdserverpb::MemberAddRequest;
use longlink_proto::etcdserverpb::MemberListRequest;
use longlink_proto::etcdserverpb::MemberPromoteRequest;
use longlink_proto::etcdserverpb::MemberRemoveRequest;
use longlink_proto::etcdserverpb::StatusRequest;
use serde_json::json;

use crate::cli::MemberCommand;
use crate::client::Client;
use crate::client::endpoint_url;
use crate::client::maintenance_of;
use crate::client::status_error;
use crate::output::Out;

fn member_json(m: &Member) -> serde_json::Value {
    json!({
        "id": m.id,
        "name": m.name,
        "peer_urls": m.peer_ur_ls,
        "client_urls": m.client_ur_ls,
        "is_learner": m.is_learner,
    })
}

fn print_members(out: Out, members: &[Member]) -> anyhow::Result<()> {
    let mut members = members.to_vec();
    members.sort_by_key(|m| m.id);
    if out.json {
        return out.json(&members.iter().map(member_json).collect::<Vec<_>>());
    }
    let rows = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.name.clone(),
                m.peer_ur_ls.join(","),
                if m.is_learner { "learner" } else { "voter" }.to_string(),
            ]
        })
        .collect();
    out.table(&["id", "name", "address", "role"], rows);
    Ok(())
}

async fn list(client: &Client) -> anyhow::Result<Vec<Member>> {
    let mut cluster = client.cluster();
    let resp = client
        .bounded(
            "member list",
            cluster.member_list(MemberListRequest { linearizable: true }),
        )
        .await?;
    Ok(resp.members)
}

pub async fn run(client: &Client, out: Out, cmd: MemberCommand) -> anyhow::Result<()> {
    match cmd {
        MemberCommand::List => print_members(out, &list(client).await?),
        MemberCommand::Add { addr } => {
            let mut cluster = client.cluster();
            let resp = client
                .bounded(
                    &format!("member add {addr}"),
                    cluster.member_add(MemberAddRequest {
                        peer_ur_ls: vec![endpoint_url(&addr)],
                        is_learner: true,
                    }),
                )
                .await?;
            let added = resp
                .member
                .ok_or_else(|| anyhow!("member add: the keeper answered without the new member"))?;
            let id = added.id;
            if out.json {
                let mut members = resp.members.clone();
                members.sort_by_key(|m| m.id);
                return out.json(&json!({
                    "added": member_json(&added),
                    "members": members.iter().map(member_json).collect::<Vec<_>>(),
                }));
            }
            println!(
                "added member {id} at {addr} as a learner: start it with --id {id} and \
                 initial_cluster_state = \"existing\", then `keeperctl member promote {id}` once \
                 it caught up"
            );
            print_members(out, &resp.members)
        }
        MemberCommand::Promote { id } => {
            let mut cluster = client.cluster();
            let resp = client
                .bounded(
                    &format!("member promote {id}"),
                    cluster.member_promote(MemberPromoteRequest { id }),
                )
                .await?;
            if !out.json {
                println!("promoted member {id} to voter");
            }
            print_members(out, &resp.members)
        }
        MemberCommand::Remove { id } => {
            let mut cluster = client.cluster();
            let resp = client
                .bounded(
                    &format!("member remove {id}"),
                    cluster.member_remove(MemberRemoveRequest { id }),
                )
                .await?;
            if !out.json {
                println!("removed member {id}");
            }
            print_members(out, &resp.members)
        }
    }
}

/// One endpoint's view of the cluster.
struct EndpointStatus {
    endpoint: String,
    result: anyhow::Result<longlink_proto::etcdserverpb::StatusResponse>,
}

/// Asks every endpoint for its status; fails (after printing them) when none reports a leader.
pub async fn status(
    endpoints: &[String],
    timeout: std::time::Duration,
    out: Out,
) -> anyhow::Result<()> {
    let asks = endpoints.iter().map(|e| async move {
        let result = async {
            let mut maintenance = maintenance_of(e, timeout).await?;
            let resp = tokio::time::timeout(timeout, maintenance.status(StatusRequest {}))
                .await
                .map_err(|_| anyhow!("{e}: no status within {:.1} s", timeout.as_secs_f64()))?
                .map_err(|s| status_error(&format!("{e}: status"), s))?;
            Ok(resp.into_inner())
        }
        .await;
        EndpointStatus {
            endpoint: e.clone(),
            result,
        }
    });
    let all = futures::future::join_all(asks).await;
    let leader = all
        .iter()
        .filter_map(|s| s.result.as_ref().ok())
        .map(|r| r.leader)
        .find(|l| *l != 0);
    if out.json {
        let docs: Vec<_> = all
            .iter()
            .map(|s| match &s.result {
                Ok(r) => {
                    let header = r.header.unwrap_or_default();
                    json!({
                        "endpoint": s.endpoint,
                        "reachable": true,
                        "member_id": header.member_id,
                        "leader": r.leader,
                        "is_leader": r.leader != 0 && r.leader == header.member_id,
                        "is_learner": r.is_learner,
                        "raft_term": r.raft_term,
                        "revision": header.revision,
                        "raft_index": r.raft_index,
                        "raft_applied_index": r.raft_applied_index,
                        "db_size": r.db_size,
                        "version": r.version,
                    })
                }
                Err(e) => {
                    json!({"endpoint": s.endpoint, "reachable": false, "error": e.to_string()})
                }
            })
            .collect();
        out.json(&json!({"leader": leader, "endpoints": docs}))?;
    } else {
        let rows = all
            .iter()
            .map(|s| match &s.result {
                Ok(r) => {
                    let header = r.header.unwrap_or_default();
                    let role = if r.leader != 0 && r.leader == header.member_id {
                        "leader"
                    } else if r.is_learner {
                        "learner"
                    } else {
                        "follower"
                    };
                    vec![
                        s.endpoint.clone(),
                        header.member_id.to_string(),
                        role.to_string(),
                        if r.leader == 0 {
                            "none".into()
                        } else {
                            r.leader.to_string()
                        },
                        r.raft_term.to_string(),
                        header.revision.to_string(),
                        r.raft_index.to_string(),
                        r.db_size.to_string(),
                        "ok".to_string(),
                    ]
                }
                Err(e) => {
                    let mut row = vec![s.endpoint.clone()];
                    row.extend(std::iter::repeat_n("-".to_string(), 7));
                    row.push(format!("unreachable: {e}"));
                    row
                }
            })
            .collect();
        out.table(
            &[
                "endpoint",
                "member",
                "role",
                "leader",
                "term",
                "revision",
                "raft index",
                "db size (keys)",
                "health",
            ],
            rows,
        );
    }
    if leader.is_none() {
        bail!(
            "no leader: no reachable endpoint of {} knows a leader",
            endpoints.join(",")
        );
    }
    Ok(())
}
