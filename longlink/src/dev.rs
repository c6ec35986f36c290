//! `longlink dev`: keeper, register, room and center in one process on the loopback defaults of
//! DESIGN.md §8, seeded with a demo app. Ctrl-C stops everything cleanly; the data directory
//! keeps the keeper's and the register's state across restarts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use keeper_sdk::Keeper;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::defaults;

/// How long each part may take to come up before `dev` gives up with an error.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(data_dir: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    // Every part stops on Ctrl-C, and all stop when one of them fails.
    let stop = shutdown.child_token();
    let mut parts: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();

    let keeper_config = keeper::KeeperConfig {
        id: 1,
        listen: defaults::KEEPER.parse()?,
        data_dir: data_dir.join("keeper"),
        ..Default::default()
    };
    let token = stop.clone();
    parts.spawn(async move {
        let r = keeper::run(keeper_config, token).await.map_err(Into::into);
        ("keeper", r)
    });
    let keeper = tokio::select! {
        k = wait_for_keeper() => k?,
        Some(done) = parts.join_next() => return Err(failed(done)),
    };
    let demo = crate::seed::seed_demo(&keeper).await?;

    let register_config = register::ProcessConfig {
        id: "register-1".into(),
        listen: defaults::REGISTER.parse()?,
        data_dir: data_dir.join("register"),
        keeper: vec![defaults::KEEPER.into()],
        ..Default::default()
    };
    let token = stop.clone();
    parts.spawn(async move {
        let r = register::run(register_config, token)
            .await
            .map_err(Into::into);
        ("register", r)
    });
    let room_config = room::RoomConfig {
        id: "room-1".into(),
        tcp: defaults::ROOM_TCP.parse()?,
        ws: defaults::ROOM_WS.parse()?,
        grpc: defaults::ROOM_GRPC.parse()?,
        keeper: vec![defaults::KEEPER.into()],
        advertise_host: None,
    };
    let token = stop.clone();
    parts.spawn(async move {
        let r = room::run(room_config, token).await.map_err(Into::into);
        ("room", r)
    });
    let center_config = center::CenterConfig {
        id: "center-1".into(),
        http: defaults::CENTER_HTTP.parse()?,
        grpc: defaults::CENTER_GRPC.parse()?,
        keeper: vec![defaults::KEEPER.into()],
        ..Default::default()
    };
    let token = stop.clone();
    parts.spawn(async move {
        let r = center::run(center_config, token).await.map_err(Into::into);
        ("center", r)
    });

    tokio::select! {
        ready = wait_until_serving() => ready?,
        Some(done) = parts.join_next() => {
            stop.cancel();
            while parts.join_next().await.is_some() {}
            return Err(failed(done));
        }
    }
    print_banner(&data_dir, &demo);

    // Run until Ctrl-C or until a part stops on its own (which stops the others).
    let mut first_error = None;
    while let Some(done) = parts.join_next().await {
        let (name, result) = done.unwrap_or_else(|e| ("a task", Err(e.into())));
        if !stop.is_cancelled() {
            tracing::error!("{name} stopped; stopping everything");
            stop.cancel();
        }
        if let Err(e) = result {
            first_error.get_or_insert(e.context(format!("{name} failed")));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None if shutdown.is_cancelled() => {
            eprintln!("longlink dev: stopped; data kept in {}", data_dir.display());
            Ok(())
        }
        None => Err(anyhow::anyhow!("a part stopped unexpectedly")),
    }
}

fn failed(
    done: Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>,
) -> anyhow::Error {
    match done {
        Ok((name, Err(e))) => e.context(format!("{name} could not start")),
        Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped during start-up"),
        Err(e) => anyhow::anyhow!("a part panicked during start-up: {e}"),
    }
}

/// Connects once the keeper answers reads (it elects itself leader first).
async fn wait_for_keeper() -> anyhow::Result<Keeper> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        let attempt = async {
            let keeper = Keeper::connect(&[defaults::KEEPER.to_string()]).await?;
            keeper.get("/config/apps").await?;
            anyhow::Ok(keeper)
        };
        match attempt.await {
            Ok(keeper) => return Ok(keeper),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context("the keeper did not become ready"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until center answers `/healthz` and the room accepts TCP connections.
async fn wait_until_serving() -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    let health = format!("http://{}/healthz", defaults::CENTER_HTTP);
    let client = reqwest::Client::new();
    loop {
        let center_up = client
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let room_up = tokio::net::TcpStream::connect(defaults::ROOM_TCP)
            .await
            .is_ok();
        if center_up && room_up {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "center or room did not start within {STARTUP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_banner(data_dir: &std::path::Path, demo: &longlink_common::App) {
    let key = demo.api_keys.first().map_or("(none)", String::as_str);
    println!(
        "longlink dev is running (data in {data})

  keeper    {keeper}                 etcd v3 API, typed config, discovery
  register  {register}                 sessions
  room      tcp {tcp}  ws {ws}/ws  grpc {rgrpc}
  center    http {http}  grpc {cgrpc}

  demo app: {app}   API key: {key}

Try, in another terminal:
  longlink listen --app {app} --user alice
  longlink push --app {app} --user alice '{{\"hello\":\"world\"}}'
  curl -s -H 'Authorization: Bearer {key}' http://{http}/v1/apps/{app}/users/alice

Ctrl-C stops everything; a restart keeps the data.",
        data = data_dir.display(),
        keeper = defaults::KEEPER,
        register = defaults::REGISTER,
        tcp = defaults::ROOM_TCP,
        ws = defaults::ROOM_WS,
        rgrpc = defaults::ROOM_GRPC,
        http = defaults::CENTER_HTTP,
        cgrpc = defaults::CENTER_GRPC,
        app = demo.id,
    );
}
