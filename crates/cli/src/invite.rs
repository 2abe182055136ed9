//! `syncline invite` and `syncline join`: pairing a device through a
//! one-time code (`syncline_core::auth::invite`).
//!
//! `invite` asks the relay (with an admin token) to keep an invite and
//! prints the code; `join` on the new device trades the code and its own
//! key for a capability, keeps it in the replica for that room, and syncs
//! the room once. Both speak plain HTTP to the relay's address (the part of
//! the `ws://` URL before `/ws`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use syncline::auth::{Capability, InviteCode};

use crate::access::parse_duration;
use crate::{Cli, Exit, Failed, Outcome, open, print, sync_cmd};

/// Longest a relay's answer may be.
const MAX_ANSWER: u64 = 64 * 1024;

/// What `syncline invite` asks for.
pub(crate) struct InviteRequest<'a> {
    pub(crate) room: &'a str,
    pub(crate) server: &'a str,
    pub(crate) token: Option<&'a str>,
    pub(crate) rights: &'a str,
    pub(crate) write_paths: &'a [String],
    pub(crate) expires: &'a str,
    pub(crate) lasts: &'a str,
}

pub(crate) fn invite(cli: &Cli, request: &InviteRequest<'_>) -> Outcome {
    let usage = |m: String| Failed::new(Exit::Usage, m);
    let token = request.token.ok_or_else(|| {
        usage(
            "an admin token for the room is needed: --token or SYNCLINE_TOKEN \
             (syncline token issue --rights admin)"
                .into(),
        )
    })?;
    Capability::from_token(token).map_err(|e| usage(format!("--token: {e}")))?;
    let expires = parse_duration(request.expires)
        .map_err(|e| usage(format!("--expires {}: {e}", request.expires)))?;
    let lasts = parse_duration(request.lasts)
        .map_err(|e| usage(format!("--lasts {}: {e}", request.lasts)))?;
    let mut body = format!(
        "room={}\nrights={}\nexpires_ms={}\nlasts_ms={}\n",
        request.room,
        request.rights,
        expires.as_millis(),
        lasts.as_millis()
    );
    for glob in request.write_paths {
        body.push_str(&format!("write={glob}\n"));
    }
    let answer = post(request.server, "/admin/invites", Some(token), &body)?;
    let secret = URL_SAFE_NO_PAD
        .decode(answer.trim())
        .ok()
        .and_then(|s| <[u8; 16]>::try_from(s).ok())
        .ok_or_else(|| Failed::new(Exit::Sync, "the relay's answer is not an invite secret"))?;
    let code = InviteCode {
        url: request.server.to_owned(),
        secret,
    }
    .to_code();
    print(
        cli,
        json!({"code": code, "room": request.room, "expires_in_s": expires.as_secs()}),
        || code.clone(),
    );
    Ok(())
}

pub(crate) fn join(cli: &Cli, code: &str, room: Option<&str>, timeout: Duration) -> Outcome {
    let code = InviteCode::parse(code).map_err(|e| Failed::new(Exit::Usage, e.to_string()))?;
    let replica = open(cli)?;
    let body = format!(
        "{}\n{}\n",
        URL_SAFE_NO_PAD.encode(code.secret),
        replica.author()
    );
    let token = post(&code.url, "/invites/redeem", None, &body)?;
    let token = token.trim().to_owned();
    let cap = Capability::from_token(&token).map_err(|e| {
        Failed::new(
            Exit::Sync,
            format!("the relay's answer is not a token: {e}"),
        )
    })?;
    let pattern = cap.claims.room.as_str();
    let room = match room {
        Some(room) => room.to_owned(),
        None if !pattern.ends_with('*') => pattern.to_owned(),
        None => {
            // The code is used: keep the token where the user sees it.
            println!("{token}");
            return Err(Failed::new(
                Exit::Usage,
                format!(
                    "the invite is for rooms {pattern}: its token is printed above; name the room: \
                     syncline sync --token TOKEN --server {} ROOM",
                    code.url
                ),
            ));
        }
    };
    replica.save_token(&room, &token)?;
    drop(replica);
    eprintln!(
        "joined {} with rights {} (token {} kept in this replica); syncing",
        cap.claims.room,
        cap.claims.rights,
        syncline::auth::hex(&cap.claims.id)
    );
    sync_cmd::sync(cli, &[code.url], None, &[room], false, timeout, None)
}

/// POSTs `body` to the HTTP side of the relay at `ws_url`; the answer's
/// body, or a failure saying what the relay answered.
fn post(ws_url: &str, path: &str, bearer: Option<&str>, body: &str) -> Result<String, Failed> {
    let authority = ws_url
        .strip_prefix("ws://")
        .ok_or_else(|| {
            Failed::new(
                Exit::Usage,
                format!(
                    "{ws_url}: only ws:// addresses are supported here (put TLS in front of \
                     the relay and invite through its plain address)"
                ),
            )
        })?
        .split('/')
        .next()
        .unwrap_or_default();
    let unreachable = |e: std::io::Error| {
        Failed::new(
            Exit::Sync,
            format!("cannot reach the relay at {authority}: {e} (is it running? check the URL)"),
        )
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| Failed::new(Exit::Usage, format!("{authority}: no such address")))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    let auth = bearer.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Content-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(unreachable)?;
    let mut response = String::new();
    stream
        .take(MAX_ANSWER)
        .read_to_string(&mut response)
        .map_err(unreachable)?;
    let status: u16 = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failed::new(Exit::Sync, "the relay's answer is not HTTP"))?;
    let answer = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_owned();
    match status {
        200 => Ok(answer),
        401 | 403 => Err(Failed::new(
            Exit::Unauthorized,
            format!("the relay refused: {answer}"),
        )),
        404 | 410 => Err(Failed::new(
            Exit::Unauthorized,
            format!("the invite cannot be used: {answer}"),
        )),
        400 => Err(Failed::new(
            Exit::Usage,
            format!("the relay refused the request: {answer}"),
        )),
        _ => Err(Failed::new(
            Exit::Sync,
            format!("the relay answered {status}: {answer}"),
        )),
    }
}
