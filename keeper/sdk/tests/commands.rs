//! Control commands against a real 3-node keeper: order, acks, and redelivery of unacked
//! commands to a new stream.

mod common;

use std::time::Duration;

use common::*;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use keeper_sdk::layout::CommandAck;
use keeper_sdk::layout::CommandDoc;

async fn issue(k: &Keeper, seq: u64, verb: &str) -> anyhow::Result<()> {
    let doc = CommandDoc {
        seq,
        verb: verb.into(),
        args: serde_json::json!({ "n": seq }),
        issued_at: layout::now_rfc3339(),
    };
    k.put(
        &layout::command_key("room", "r1", seq),
        serde_json::to_vec(&doc)?,
    )
    .await?;
    Ok(())
}

async fn next(s: &mut keeper_sdk::CommandStream) -> anyhow::Result<keeper_sdk::Command> {
    Ok(tokio::time::timeout(Duration::from_secs(10), s.next()).await??)
}

#[tokio::test]
async fn commands_arrive_in_order_and_only_unacked_ones_come_again() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let k = connect(cluster.endpoints(), "r1", 10).await?;
    for (seq, verb) in [(1, "reload"), (2, "dump"), (3, "custom")] {
        issue(&k, seq, verb).await?;
    }
    // Another instance's commands are not ours.
    k.put(&layout::command_key("room", "r10", 1), b"{}".to_vec())
        .await?;

    let mut stream = k.commands("room", "r1").await?;
    let c1 = next(&mut stream).await?;
    assert_eq!((c1.seq, c1.verb.as_str()), (1, "reload"));
    assert_eq!(c1.args["n"], 1);
    c1.ack(true, "reloaded").await?;
    let c2 = next(&mut stream).await?;
    assert_eq!(c2.seq, 2);
    drop(c2); // not acked
    let c3 = next(&mut stream).await?;
    assert_eq!(c3.seq, 3);
    c3.ack(false, "unknown verb").await?;

    // Issued while the stream waits.
    issue(&k, 4, "drain").await?;
    let c4 = next(&mut stream).await?;
    assert_eq!((c4.seq, c4.verb.as_str()), (4, "drain"));
    c4.ack(true, "drained").await?;

    let ack: CommandAck = k
        .get(&layout::command_ack_key("room", "r1", 3))
        .await?
        .expect("ack written")
        .json()?;
    assert!(!ack.ok);
    assert_eq!(ack.message, "unknown verb");

    // A new stream (a restarted instance) gets only the unacked command, then new ones.
    let mut again = k.commands("room", "r1").await?;
    let c2 = next(&mut again).await?;
    assert_eq!(c2.seq, 2);
    c2.ack(true, "dumped").await?;
    issue(&k, 5, "reload").await?;
    assert_eq!(next(&mut again).await?.seq, 5);
    Ok(())
}
