//! What operators reach over HTTP, and the revocation list.
//!
//! `/metrics` on the public listener needs `Authorization: Bearer <token>`:
//! a capability with `admin` rights for every room (`*`), rooted in a key
//! the relay trusts, unexpired and unrevoked (a bearer token: whoever holds
//! it may read the metrics, so keep it short-lived). Without one it answers
//! 401. [`Config::metrics_listen`] serves `/metrics` and `/healthz` on a
//! separate loopback address instead, without a token.
//!
//! Revocation: the file `revoked` in the data directory lists capability
//! ids (hex, one per line; `syncline token revoke` appends). The relay
//! reads it at start and every second after: a listed id refuses every
//! `hello` whose capability chain holds it, and closes, with
//! `unauthorized`, the open sessions that rest on it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use syncline_core::auth::{Capability, Rights};
use tracing::{info, warn};

use crate::conn::State;
use crate::telemetry;

/// The revocation list's file name in the data directory.
pub(crate) const REVOKED_FILE: &str = "revoked";

/// `GET /metrics` on the public listener: Prometheus text for an admin.
pub(crate) async fn metrics(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
) -> Response {
    match admin_bearer(&state, &headers) {
        Ok(()) => telemetry::render().await.into_response(),
        Err(why) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!(
                "{why}: /metrics needs an admin token (syncline token issue --rights admin \
                 --room '*'), or serve it on --metrics-listen\n"
            ),
        )
            .into_response(),
    }
}

/// Whether `headers` carry a bearer capability with `admin` on every room,
/// valid now.
pub(crate) fn admin_bearer(state: &State, headers: &HeaderMap) -> Result<(), String> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("no Authorization header")?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("Authorization is not a Bearer token")?;
    let cap = Capability::from_token(token).map_err(|e| e.to_string())?;
    let policy = state.policy.read().unwrap_or_else(|p| p.into_inner());
    let grant = cap.verify(&policy.roots).map_err(|e| e.to_string())?;
    if !grant.rights.contains(Rights::ADMIN) || grant.room.as_str() != "*" {
        return Err("the token is not an admin token for every room (*)".into());
    }
    if grant.chain.iter().any(|id| policy.revoked.contains(id)) {
        return Err("the token was revoked".into());
    }
    if grant.not_after_ms <= crate::conn::unix_ms() {
        return Err("the token expired".into());
    }
    Ok(())
}

/// Appends `id` to the revocation list of `data_dir`; a running relay
/// applies it within a second.
pub(crate) fn append_revoked(data_dir: &Path, id: &[u8; 16]) -> std::io::Result<()> {
    use std::io::Write as _;
    if !data_dir.join("relay.db").exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no relay data here (see --data)",
        ));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join(REVOKED_FILE))?;
    writeln!(file, "{}", syncline_core::auth::hex(id))?;
    file.sync_all()
}

/// Reads the revocation list of `data_dir` (empty if there is none).
pub(crate) fn read_revoked(data_dir: &Path) -> HashSet<[u8; 16]> {
    let path = data_dir.join(REVOKED_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return HashSet::new();
    };
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match syncline_core::ids::from_hex::<16>(line) {
            Some(id) => {
                ids.insert(id);
            }
            None => warn!(
                file = %path.display(),
                line = n + 1,
                "not a capability id (32 hex digits): ignored"
            ),
        }
    }
    ids
}

/// Rereads the revocation list every second; newly listed ids go into the
/// policy and close the sessions that rest on them.
pub(crate) async fn watch_revoked(state: Arc<State>, data_dir: PathBuf) {
    let mut seen: Option<std::time::SystemTime> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let path = data_dir.join(REVOKED_FILE);
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified == seen {
            continue;
        }
        seen = modified;
        let listed = read_revoked(&data_dir);
        let fresh: Vec<[u8; 16]> = {
            let mut policy = state.policy.write().unwrap_or_else(|p| p.into_inner());
            let fresh = listed
                .iter()
                .filter(|id| !policy.revoked.contains(*id))
                .copied()
                .collect();
            policy.revoked = listed;
            fresh
        };
        for id in fresh {
            info!(id = %syncline_core::auth::hex(&id), "capability revoked");
            state.rooms().revoke(id).await;
        }
    }
}
