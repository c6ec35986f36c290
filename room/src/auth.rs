//! Device authentication: an HS256 JWT with claims `app`, `sub`, `dev` (optional), `exp`, signed
//! with the app's secret from the `apps` config. Trust boundary: nothing in a token is believed
//! before its signature is checked with the secret of the app it names.

use jsonwebtoken::Algorithm;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use longlink_common::AppsConfig;
use serde::Deserialize;

use crate::error::code;

/// Who a verified token says the device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub app: String,
    pub user: String,
    /// Empty when the token has no `dev` claim.
    pub device: String,
    /// Empty when the token has no `plat` claim.
    pub platform: String,
}

/// Longest accepted `plat` claim, in bytes.
pub const MAX_PLATFORM_BYTES: usize = 32;

#[derive(Debug, Deserialize)]
struct Claims {
    app: String,
    sub: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    plat: Option<String>,
}

/// A refused token: the protocol error code and a message for the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AuthError {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> AuthError {
    AuthError {
        code,
        message: message.into(),
    }
}

/// Verifies `token` against the secret of the app named in it.
pub fn verify(token: &str, apps: &AppsConfig) -> Result<Identity, AuthError> {
    // Only to pick the secret; the claims are re-read after the signature check.
    let unverified: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| refuse(code::UNAUTHORIZED, format!("malformed token: {e}")))?;
    let app = apps.get(&unverified.app).ok_or_else(|| {
        refuse(
            code::UNKNOWN_APP,
            format!("unknown app {:?}", unverified.app),
        )
    })?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(app.secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => refuse(code::TOKEN_EXPIRED, "token expired"),
        ErrorKind::InvalidSignature => refuse(code::UNAUTHORIZED, "bad token signature"),
        ErrorKind::InvalidAlgorithm => refuse(code::UNAUTHORIZED, "token must be HS256"),
        _ => refuse(code::UNAUTHORIZED, format!("invalid token: {e}")),
    })?;
    let claims = data.claims;
    if claims.sub.is_empty() {
        return Err(refuse(code::UNAUTHORIZED, "token has an empty sub"));
    }
    let platform = claims.plat.unwrap_or_default();
    if platform.len() > MAX_PLATFORM_BYTES {
        return Err(refuse(
            code::UNAUTHORIZED,
            format!(
                "plat claim is {} bytes; the limit is {MAX_PLATFORM_BYTES}",
                platform.len()
            ),
        ));
    }
    Ok(Identity {
        app: claims.app,
        user: claims.sub,
        device: claims.dev.unwrap_or_default(),
        platform,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use longlink_client::token;
    use longlink_client::token_at;
    use longlink_common::App;

    use super::*;

    fn apps() -> AppsConfig {
        AppsConfig {
            apps: vec![App {
                id: "demo".into(),
                secret: "s3cret".into(),
                api_keys: vec![],
                webhook_url: None,
                rate_limit: Default::default(),
            }],
        }
    }

    #[test]
    fn good_token_names_app_user_device() {
        let t = token(
            "demo",
            "alice",
            Some("phone"),
            "s3cret",
            Duration::from_secs(60),
        );
        assert_eq!(
            verify(&t, &apps()).unwrap(),
            Identity {
                app: "demo".into(),
                user: "alice".into(),
                device: "phone".into(),
                platform: String::new(),
            }
        );
    }

    #[test]
    fn plat_claim_is_carried_and_bounded() {
        let claims = |plat: &str| longlink_client::Claims {
            app: "demo".into(),
            sub: "alice".into(),
            dev: None,
            plat: Some(plat.into()),
            exp: 4_000_000_000,
        };
        let ok = longlink_client::sign(&claims("ios"), "s3cret");
        assert_eq!(verify(&ok, &apps()).unwrap().platform, "ios");
        let long = longlink_client::sign(&claims(&"x".repeat(33)), "s3cret");
        let err = verify(&long, &apps()).unwrap_err();
        assert_eq!(err.code, code::UNAUTHORIZED);
        assert!(err.message.contains("32"), "{err}");
    }

    #[test]
    fn each_refusal_has_its_code() {
        let hour = Duration::from_secs(3600);
        let bad_sig = token("demo", "alice", None, "wrong", hour);
        assert_eq!(
            verify(&bad_sig, &apps()).unwrap_err().code,
            code::UNAUTHORIZED
        );
        let expired = token_at("demo", "alice", None, "s3cret", 1_000);
        assert_eq!(
            verify(&expired, &apps()).unwrap_err().code,
            code::TOKEN_EXPIRED
        );
        let other_app = token("other", "alice", None, "s3cret", hour);
        assert_eq!(
            verify(&other_app, &apps()).unwrap_err().code,
            code::UNKNOWN_APP
        );
        assert_eq!(
            verify("garbage", &apps()).unwrap_err().code,
            code::UNAUTHORIZED
        );
        let no_user = token("demo", "", None, "s3cret", hour);
        assert_eq!(
            verify(&no_user, &apps()).unwrap_err().code,
            code::UNAUTHORIZED
        );
    }
}
