//! `longlink push`: a thin client of center's `POST /v1/apps/{app}/push`, equivalent to the curl
//! in the README.

use anyhow::Context;
use keeper_sdk::Keeper;

pub struct Args {
    pub app: String,
    pub users: Vec<String>,
    pub all: bool,
    pub payload: String,
    pub qos: u8,
    pub center: String,
    pub api_key: Option<String>,
    pub keeper: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let payload: serde_json::Value = serde_json::from_str(&args.payload)
        .with_context(|| format!("the payload is not JSON: {}", args.payload))?;
    let api_key = match args.api_key {
        Some(key) => key,
        None => {
            let keeper = Keeper::connect(&args.keeper).await?;
            let app = crate::seed::app(&keeper, &args.app).await?;
            app.api_keys
                .first()
                .cloned()
                .with_context(|| format!("app {:?} has no API key; pass --api-key", app.id))?
        }
    };
    let body = if args.all {
        serde_json::json!({"all": true, "payload": payload, "qos": args.qos})
    } else {
        serde_json::json!({"users": args.users, "payload": payload, "qos": args.qos})
    };
    let url = format!("http://{}/v1/apps/{}/push", args.center, args.app);
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(api_key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    println!("{text}");
    anyhow::ensure!(status.is_success(), "center answered {status}");
    Ok(())
}
