//! `longlink token`: a device JWT signed with the app's secret as stored in the keeper.

use std::time::Duration;

use keeper_sdk::Keeper;

pub async fn run(
    keeper: &[String],
    app: &str,
    user: &str,
    device: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<()> {
    println!("{}", mint(keeper, app, user, device, ttl).await?);
    Ok(())
}

/// Reads the app's secret from the keeper and signs a token with it.
pub async fn mint(
    keeper: &[String],
    app: &str,
    user: &str,
    device: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    let keeper = Keeper::connect(keeper).await?;
    let app = crate::seed::app(&keeper, app).await?;
    Ok(longlink_client::token(
        &app.id,
        user,
        device,
        &app.secret,
        ttl,
    ))
}
