//! The whole keeper loop in one small service: typed config, registration, discovery, commands.
//! Run a keeper (`longlink dev` or `keeper --config ...`), then
//! `cargo run -p keeper-sdk --example hello_service -- 127.0.0.1:7379`, and push a config with
//! `keeperctl config push hello hello.toml` (body: `greeting = "hi"`).

#[derive(serde::Deserialize, schemars::JsonSchema, Default, Debug)]
#[serde(default, deny_unknown_fields)]
struct Hello {
    /// What the service says.
    greeting: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints: Vec<String> = std::env::args().skip(1).collect();
    let keeper = keeper_sdk::Keeper::connect(&endpoints).await?;
    let mut config = keeper.config_or_default::<Hello>("hello").await?;
    let me = keeper_sdk::Instance {
        id: keeper.instance().to_string(),
        ..Default::default()
    };
    let registration = keeper.register("hello", me).await?;
    let peers = keeper.discover("hello").await?;
    let mut commands = keeper.commands("hello", keeper.instance()).await?;
    println!(
        "v{} {:?}; {} peer(s)",
        config.version(),
        config.current(),
        peers.instances().len()
    );
    loop {
        tokio::select! {
            new = config.changed() => println!("config v{}: {:?}", config.version(), new?),
            cmd = commands.next() => {
                let cmd = cmd?;
                let stop = cmd.verb == "drain";
                cmd.ack(true, format!("hello did {}", if stop { "drain" } else { "nothing" })).await?;
                if stop { break; }
            }
        }
    }
    registration.shutdown().await?;
    Ok(())
}
