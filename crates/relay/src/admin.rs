//! What operators reach over HTTP, and the revocation list.
//!
//! `/metrics` on the public listener needs `Authorization: Bearer <token>`:
//! a capability with `admin` rights for every room (`*`), rooted in a key
//! the relay trusts, unexpired and unrevoked (a bearer token: whoever holds
//! it may read the metrics, so keep it short-lived). Without one it answers
//! 401. [`Config::metrics_listen`] serves `/metrics` and `/healthz` on a
//! separate loopback address instead, without a token.
//!
//! Invites: `POST /admin/invites` (a bearer token with `admin` on the
//! room) stores what the invite grants, no more than the token, under the
//! hash of a fresh secret, and answers the secret; `POST /invites/redeem`
//! (the secret and a key) uses it once and answers a capability for that
//! key, signed with the relay's key (`syncline_core::auth::invite`).
//!
//! Revocation: the file `revoked` in the data directory lists capability
//! ids (hex, one per line; `syncline token revoke --data` appends), and so
//! does the store's metadata (`revoked`: ids of 16 bytes; a fleet's,
//! written by `syncline token revoke --postgres`, so every relay sharing
//! the database sees it). The relay reads both at start and every second
//! after: a listed id refuses every `hello` whose capability chain holds
//! it, and closes, with `unauthorized`, the open sessions that rest on it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use syncline_core::AuthorId;
use syncline_core::auth::{Capability, Claims, Grant, Invite, InviteCode, Rights, RoomPattern};
use syncline_core::proto::scope::Scope;
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
    let grant = bearer_grant(state, headers)?;
    if !grant.rights.contains(Rights::ADMIN) || grant.room.as_str() != "*" {
        return Err("the token is not an admin token for every room (*)".into());
    }
    Ok(())
}

/// The bearer capability in `headers`, verified against the relay's roots,
/// unrevoked and unexpired.
fn bearer_grant(state: &State, headers: &HeaderMap) -> Result<Grant, String> {
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
    if grant.chain.iter().any(|id| policy.revoked.contains(id)) {
        return Err("the token was revoked".into());
    }
    if grant.not_after_ms <= crate::conn::unix_ms() {
        return Err("the token expired".into());
    }
    Ok(grant)
}

/// Longest an invite code may stay usable.
const MAX_CODE_MS: u64 = 7 * 24 * 3_600_000;

/// `POST /admin/invites`: the body is `key=value` lines: `room`, `rights`
/// (`read`, `write`, `admin`, comma-separated), `write` (a path glob;
/// repeatable), `expires_ms` (how long the code is usable), `lasts_ms`
/// (how long the capability lasts once used). Answers the secret, base64url.
pub(crate) async fn create_invite(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let grant = match bearer_grant(&state, &headers) {
        Ok(g) if g.rights.contains(Rights::ADMIN) => g,
        Ok(_) => return refuse(StatusCode::FORBIDDEN, "the token has no admin right"),
        Err(why) => return refuse(StatusCode::UNAUTHORIZED, &why),
    };
    let invite = match parse_invite(&body, &grant) {
        Ok(invite) => invite,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, &why),
    };
    let mut secret = [0u8; 16];
    if getrandom::fill(&mut secret).is_err() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "no randomness for a secret",
        );
    }
    let store = state.rooms().store();
    let key = InviteCode::store_key(&secret);
    let stored = tokio::task::spawn_blocking(move || store.put_meta(&key, &invite.encode())).await;
    match stored {
        Ok(Ok(())) => {
            metrics::counter!(telemetry::INVITES, "what" => "created").increment(1);
            URL_SAFE_NO_PAD.encode(secret).into_response()
        }
        _ => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot store the invite; retry",
        ),
    }
}

/// What an invite request asks, if `grant` covers it.
fn parse_invite(body: &str, grant: &Grant) -> Result<Invite, String> {
    let (mut room, mut rights, mut write_paths) = (None, Rights::READ, Vec::new());
    let (mut expires_ms, mut lasts_ms) = (600_000u64, 30 * 24 * 3_600_000u64);
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("not key=value: {line:?}"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{key}: not a number"))
        };
        match key {
            "room" => room = Some(RoomPattern::parse(value).map_err(|e| e.to_string())?),
            "rights" => rights = Rights::parse(value).map_err(|e| e.to_string())?,
            "write" => write_paths.push(value.to_owned()),
            "expires_ms" => expires_ms = number()?,
            "lasts_ms" => lasts_ms = number()?,
            _ => return Err(format!("unknown field {key:?}")),
        }
    }
    let room = room.ok_or("no room")?;
    let scope = Scope::parse(&write_paths).map_err(|e| e.to_string())?;
    if !room.within(&grant.room) {
        return Err(format!("the token does not cover room {room}"));
    }
    if !grant.rights.contains(rights) {
        return Err(format!("the token does not hold {rights}"));
    }
    if rights.contains(Rights::WRITE) && !scope.within(&grant.write) {
        return Err("the write paths are wider than the token's".into());
    }
    if expires_ms == 0 || expires_ms > MAX_CODE_MS || lasts_ms == 0 {
        return Err("expires_ms: 1 ms to 7 days; lasts_ms above 0".into());
    }
    let now = crate::conn::unix_ms();
    Ok(Invite {
        room,
        rights,
        write_paths,
        code_expires_ms: now.saturating_add(expires_ms),
        // No longer than the inviter's own token.
        grant_ms: lasts_ms.min(grant.not_after_ms.saturating_sub(now)),
    })
}

/// `POST /invites/redeem`: the body is the secret (base64url) and the key
/// (hex), one per line. Uses the invite (once) and answers a token.
pub(crate) async fn redeem_invite(
    AxumState(state): AxumState<Arc<State>>,
    body: String,
) -> Response {
    let mut lines = body.lines().map(str::trim);
    let secret = lines
        .next()
        .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
        .and_then(|s| <[u8; 16]>::try_from(s).ok());
    let subject = lines.next().and_then(AuthorId::from_hex);
    let (Some(secret), Some(subject)) = (secret, subject) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "send the invite secret and your key, one per line",
        );
    };
    let rooms = state.rooms().clone();
    let redeemed = tokio::task::spawn_blocking(move || rooms.redeem(&secret, subject)).await;
    let outcome = match redeemed {
        Ok(Ok(token)) => (StatusCode::OK, token),
        Ok(Err((status, why))) => (status, why),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "redeeming failed; retry".to_owned(),
        ),
    };
    let what = if outcome.0 == StatusCode::OK {
        "redeemed"
    } else {
        "refused"
    };
    metrics::counter!(telemetry::INVITES, "what" => what).increment(1);
    (outcome.0, outcome.1).into_response()
}

/// Uses the invite stored under `secret`'s hash once: the token for
/// `subject`, or why not.
pub(crate) fn redeem(
    store: &dyn syncline_store::Store,
    key_pair: &syncline_core::Keypair,
    secret: &[u8; 16],
    subject: AuthorId,
) -> Result<String, (StatusCode, String)> {
    let key = InviteCode::store_key(secret);
    let unavailable = |_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "storage failed; retry".to_owned(),
        )
    };
    let gone = |why: &str| (StatusCode::GONE, why.to_owned());
    // One redemption at a time across a fleet's relays too (a name no
    // room has: room names hold no spaces).
    let _fleet_wide = store.lock("syncline invites").map_err(unavailable)?;
    let stored = store.get_meta(&key).map_err(unavailable)?;
    let Some(bytes) = stored else {
        return Err((StatusCode::NOT_FOUND, "no such invite".into()));
    };
    if bytes.is_empty() {
        return Err(gone("the invite was already used"));
    }
    let invite = Invite::decode(&bytes).map_err(|_| gone("the invite is damaged"))?;
    let now = crate::conn::unix_ms();
    if invite.code_expires_ms <= now {
        return Err(gone("the invite expired"));
    }
    // Used: an empty record, durably, before the token goes out.
    store.put_meta(&key, &[]).map_err(unavailable)?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "no randomness".to_owned()))?;
    let claims = Claims {
        id,
        room: invite.room,
        subject,
        rights: invite.rights,
        write_paths: invite.write_paths,
        not_after_ms: now.saturating_add(invite.grant_ms),
    };
    Ok(Capability::issue(key_pair, claims, None).to_token())
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// The store metadata holding revocations made through the store.
const REVOKED_META: &str = "revoked";

/// Adds `id` to the revocations in `store` (every relay sharing it applies
/// it within a second).
pub(crate) fn revoke_in_store(
    store: &dyn syncline_store::Store,
    id: &[u8; 16],
) -> Result<(), syncline_store::StoreError> {
    // One writer of the list at a time (a name no room has).
    let _one_at_a_time = store.lock("syncline revocations")?;
    let mut listed = store.get_meta(REVOKED_META)?.unwrap_or_default();
    if !listed.chunks(16).any(|listed| listed == id) {
        listed.extend_from_slice(id);
        store.put_meta(REVOKED_META, &listed)?;
    }
    Ok(())
}

/// The revocations in `store`.
pub(crate) fn stored_revoked(
    store: &dyn syncline_store::Store,
) -> Result<HashSet<[u8; 16]>, syncline_store::StoreError> {
    let listed = store.get_meta(REVOKED_META)?.unwrap_or_default();
    Ok(listed
        .chunks_exact(16)
        .filter_map(|id| <[u8; 16]>::try_from(id).ok())
        .collect())
}

/// Appends `id` to the revocation list of `data_dir`; a running relay
/// applies it within a second.
pub(crate) fn append_revoked(data_dir: &Path, id: &[u8; 16]) -> std::io::Result<()> {
    use std::io::Write as _;
    // Every relay's data directory holds its key file (one on PostgreSQL
    // has no relay.db).
    if !data_dir.join(crate::KEY_FILE).exists() {
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

/// Rereads the revocation lists (the file and the store's) every second;
/// newly listed ids go into the policy and close the sessions that rest on
/// them.
pub(crate) async fn watch_revoked(state: Arc<State>, data_dir: PathBuf) {
    // The file is read again only when it changed (its warnings, once).
    let modified = || {
        std::fs::metadata(data_dir.join(REVOKED_FILE))
            .and_then(|m| m.modified())
            .ok()
    };
    let mut file = (modified(), read_revoked(&data_dir));
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let modified = modified();
        if modified != file.0 {
            file = (modified, read_revoked(&data_dir));
        }
        let store = state.rooms().store();
        let from_file = file.1.clone();
        let listed = tokio::task::spawn_blocking(move || {
            let mut listed = from_file;
            listed.extend(stored_revoked(store.as_ref())?);
            Ok::<_, syncline_store::StoreError>(listed)
        })
        .await;
        let listed = match listed {
            Ok(Ok(listed)) => listed,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the revocations in the store; trying again");
                continue;
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let fresh: Vec<[u8; 16]> = {
            let mut policy = state.policy.write().unwrap_or_else(|p| p.into_inner());
            if policy.revoked == listed {
                continue;
            }
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
