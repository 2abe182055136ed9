//! Direct blob URLs (`docs/protocol.md` §5.10): blob bytes over plain HTTP,
//! beside the WebSocket, for clients that can stream a file faster than
//! they can frame it.
//!
//! A session asks for a URL with `blob-grant`; the room's hub decides
//! whether it may have one (the rights of `blob-get` and `blob-put`) and
//! [`Grants`] signs it: a keyed BLAKE3 MAC over the room, the blob, the
//! direction and an expiry, under a key derived from the relay's own
//! seed, so grants need no table and survive nothing but the key. Then:
//!
//! - `GET /blobs/HASH?room=ROOM&grant=G` streams the blob (`Range: bytes=`
//!   for a part: 206 with `Content-Range`), decrypted, each group checked
//!   against the outboard as it is read;
//! - `PUT /blobs/HASH?room=ROOM&grant=G` takes the bytes of a blob a
//!   `blob-put` began (`Content-Range: bytes A-B/SIZE` to send a part, `A`
//!   at a 64 KiB group boundary) and checks each group as it completes:
//!   a group that does not match the outboard stops the request with 422
//!   and nothing of it is kept; past the blob quota, 507.
//!
//! Neither holds more than a few groups in memory. A bad or expired grant
//! is 403, a blob not held (or not begun, for a PUT) 404, a body that
//! stalls longer than the write timeout ends the request.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use syncline_core::RoomId;
use syncline_core::blob::{GROUP_BYTES, group_range};
use syncline_core::ids::{from_hex, to_hex};
use syncline_hub::BlobUrls;
use syncline_store::{BlobState, BlobStore, BlobStoreError};
use tracing::debug;

use crate::conn::unix_ms;
use crate::telemetry;

/// Groups read or written per blocking step (1 MiB): few enough to bound
/// memory, enough to keep the thread hops off the profile.
const GROUPS_PER_STEP: u64 = 16;

/// Signs and checks direct blob URLs.
#[derive(Debug)]
pub(crate) struct Grants {
    key: [u8; 32],
    ttl: Duration,
}

impl Grants {
    /// Grants keyed from the relay's seed, valid for `ttl`.
    pub(crate) fn new(relay_seed: &[u8; 32], ttl: Duration) -> Grants {
        Grants {
            key: blake3::derive_key("syncline 2026-11 blob url grant", relay_seed),
            ttl,
        }
    }

    fn mac(&self, room: &str, hash: &[u8; 32], put: bool, expires: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(room.len() as u64).to_be_bytes());
        h.update(room.as_bytes());
        h.update(hash);
        h.update(&[u8::from(put)]);
        h.update(&expires.to_be_bytes());
        h.finalize()
    }

    /// Whether `grant` lets its holder read (or, if `put`, write) blob
    /// `hash` in room `room` at Unix time `now` (ms).
    fn check(
        &self,
        room: &str,
        hash: &[u8; 32],
        put: bool,
        grant: &str,
        now: u64,
    ) -> Result<(), &'static str> {
        let mut parts = grant.splitn(3, '-');
        let (Some(expires), Some(mode), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err("a grant is EXPIRES-MODE-MAC");
        };
        let expires: u64 = expires
            .parse()
            .map_err(|_| "a grant's expiry is a number")?;
        if mode != if put { "w" } else { "r" } {
            return Err("this grant is for the other direction");
        }
        let mac = from_hex::<32>(mac).ok_or("a grant's MAC is 64 hex digits")?;
        // blake3::Hash compares in constant time.
        if self.mac(room, hash, put, expires) != blake3::Hash::from(mac) {
            return Err("this grant is not the relay's, or not for this blob and room");
        }
        if now >= expires {
            return Err("this grant expired: ask for another (blob-grant)");
        }
        Ok(())
    }
}

impl BlobUrls for Grants {
    fn grant(&self, room: &RoomId, hash: &[u8; 32], put: bool) -> (String, u64) {
        let expires = unix_ms() + self.ttl.as_millis() as u64;
        let mac = self.mac(room.as_str(), hash, put, expires);
        let path = format!(
            "/blobs/{}?room={}&grant={expires}-{}-{}",
            to_hex(hash),
            room.as_str(),
            if put { "w" } else { "r" },
            mac.to_hex()
        );
        (path, expires)
    }
}

/// What the blob routes share.
#[derive(Debug)]
pub(crate) struct BlobHttp {
    pub(crate) grants: Arc<Grants>,
    pub(crate) store: Arc<BlobStore>,
    /// How long a request body may stall.
    pub(crate) idle: Duration,
}

/// A refusal: the status and a sentence saying what to do.
fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    let why = why.into();
    debug!(status = status.as_u16(), why, "blob request refused");
    metrics::counter!(telemetry::REFUSED, "why" => "blob_http").increment(1);
    (status, why + "\n").into_response()
}

/// `room` and `grant` from the query (values percent-decoded).
fn query(uri: &Uri) -> Option<(String, String)> {
    let (mut room, mut grant) = (None, None);
    for pair in uri.query()?.split('&') {
        let (key, value) = pair.split_once('=')?;
        let value = percent_decode(value)?;
        match key {
            "room" => room = Some(value),
            "grant" => grant = Some(value),
            _ => {}
        }
    }
    Some((room?, grant?))
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Checks the URL's blob and grant; the blob's hash if they hold, else
/// the refusal's status and sentence.
fn admit(
    http: &BlobHttp,
    hash: &str,
    uri: &Uri,
    put: bool,
) -> Result<[u8; 32], (StatusCode, &'static str)> {
    let hash =
        from_hex::<32>(hash).ok_or((StatusCode::NOT_FOUND, "a blob is named by 64 hex digits"))?;
    let (room, grant) = query(uri).ok_or((
        StatusCode::FORBIDDEN,
        "no grant: ask for this URL over a session (blob-grant)",
    ))?;
    http.grants
        .check(&room, &hash, put, &grant, unix_ms())
        .map_err(|why| (StatusCode::FORBIDDEN, why))?;
    Ok(hash)
}

/// The `Range: bytes=` of a request, as `start..end` of a blob of `size`
/// bytes: `Ok(None)` for the whole blob (no range, or several, which the
/// relay may answer whole), `Err` if it cannot be satisfied.
fn byte_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (first, last) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(drop)?;
            (size.saturating_sub(n), size)
        }
        (first, "") => (first.parse().map_err(drop)?, size),
        (first, last) => {
            let last: u64 = last.parse().map_err(drop)?;
            (
                first.parse().map_err(drop)?,
                last.saturating_add(1).min(size),
            )
        }
    };
    if start >= end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// `GET /blobs/{hash}`: the blob's bytes, or a range of them.
pub(crate) async fn get(
    State(http): State<Arc<BlobHttp>>,
    Path(hash): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let hash = match admit(&http, &hash, &uri, false) {
        Ok(hash) => hash,
        Err((status, why)) => return refuse(status, why),
    };
    let size = match http.store.state(&hash) {
        Ok(BlobState::Complete { size }) => size,
        Ok(_) => return refuse(StatusCode::NOT_FOUND, "the relay does not hold this blob"),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (status, start, end) = match byte_range(&headers, size) {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Err(()) => {
            let mut refused = refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the blob has {size} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                refused.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return refused;
        }
    };
    // A step at a time on the blocking pool: up to GROUPS_PER_STEP groups,
    // read, decrypted and checked, trimmed to the range.
    let store = http.store.clone();
    let body = futures_util::stream::unfold(start, move |pos| {
        let store = store.clone();
        async move {
            if pos >= end {
                return None;
            }
            let read = tokio::task::spawn_blocking(move || {
                let first = pos / GROUP_BYTES as u64;
                let mut out = Vec::new();
                for index in first..first + GROUPS_PER_STEP {
                    let range = group_range(size, index);
                    if range.start >= end {
                        break;
                    }
                    let group = store.read_group(&hash, index)?;
                    let from = pos.max(range.start) - range.start;
                    let to = end.min(range.end) - range.start;
                    out.extend_from_slice(&group[from as usize..to as usize]);
                }
                Ok::<_, BlobStoreError>(out)
            })
            .await;
            let bytes = match read {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => return Some((Err(std::io::Error::other(e)), end)),
                Err(e) => return Some((Err(std::io::Error::other(e)), end)),
            };
            metrics::counter!(telemetry::BLOB_HTTP_BYTES, "direction" => "out")
                .increment(bytes.len() as u64);
            let next = pos + bytes.len() as u64;
            Some((Ok(Bytes::from(bytes)), next))
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", to_hex(&hash))) {
        headers.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        headers.insert(header::CONTENT_RANGE, v);
    }
    response
}

/// The `Content-Range: bytes A-B/SIZE` of an upload, as `A..B+1`; the
/// whole blob without one.
fn upload_range(headers: &HeaderMap, size: u64) -> Result<(u64, u64), String> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok((0, size));
    };
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| {
            let (range, total) = v.split_once('/')?;
            let (first, last) = range.split_once('-')?;
            Some((
                first.parse::<u64>().ok()?,
                last.parse::<u64>().ok()?,
                total.parse::<u64>().ok()?,
            ))
        });
    let Some((first, last, total)) = parsed else {
        return Err("Content-Range is `bytes FIRST-LAST/SIZE`".into());
    };
    if total != size || first > last || last >= size {
        return Err(format!("the blob has {size} bytes"));
    }
    if first % GROUP_BYTES as u64 != 0 {
        return Err(format!(
            "a part starts at a group boundary (a multiple of {GROUP_BYTES})"
        ));
    }
    Ok((first, last + 1))
}

/// `PUT /blobs/{hash}`: bytes of a blob a `blob-put` began, each group
/// checked as it completes.
pub(crate) async fn put(
    State(http): State<Arc<BlobHttp>>,
    Path(hash): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let hash = match admit(&http, &hash, &uri, true) {
        Ok(hash) => hash,
        Err((status, why)) => return refuse(status, why),
    };
    let size = match http.store.outboard(&hash) {
        Ok(Some(outboard)) => outboard.size(),
        Ok(None) => {
            return refuse(
                StatusCode::NOT_FOUND,
                "this blob was not offered: send blob-put first",
            );
        }
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (start, end) = match upload_range(&headers, size) {
        Ok(range) => range,
        Err(why) => return refuse(StatusCode::RANGE_NOT_SATISFIABLE, why),
    };
    let mut body = body.into_data_stream();
    let mut index = start / GROUP_BYTES as u64;
    let mut pos = start;
    let mut group = Vec::with_capacity(GROUP_BYTES);
    let mut ready: Vec<(u64, Vec<u8>)> = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(http.idle, body.next()).await {
            Err(_) => return refuse(StatusCode::REQUEST_TIMEOUT, "the body stalled"),
            Ok(None) => None,
            Ok(Some(Err(e))) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
            Ok(Some(Ok(chunk))) => Some(chunk),
        };
        let ended = chunk.is_none();
        let mut chunk = chunk.unwrap_or_default();
        metrics::counter!(telemetry::BLOB_HTTP_BYTES, "direction" => "in")
            .increment(chunk.len() as u64);
        if pos + chunk.len() as u64 > end {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the body runs past byte {end} of the blob"),
            );
        }
        pos += chunk.len() as u64;
        // Cut the body into groups; a group's bytes may span chunks.
        while !chunk.is_empty() {
            let want = group_range(size, index).end - group_range(size, index).start;
            let take = chunk.len().min(want as usize - group.len());
            group.extend_from_slice(&chunk.split_to(take));
            if group.len() as u64 == want {
                ready.push((
                    index,
                    std::mem::replace(&mut group, Vec::with_capacity(GROUP_BYTES)),
                ));
                index += 1;
            }
        }
        if ready.len() as u64 >= GROUPS_PER_STEP || (ended && !ready.is_empty()) {
            let store = http.store.clone();
            let groups = std::mem::take(&mut ready);
            let written = tokio::task::spawn_blocking(move || {
                groups.iter().try_for_each(|(index, bytes)| {
                    store.write_group(&hash, *index, bytes).map(drop)
                })
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e @ BlobStoreError::Blob(_))) => {
                    return refuse(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
                }
                Ok(Err(e @ BlobStoreError::QuotaExceeded { .. })) => {
                    return refuse(StatusCode::INSUFFICIENT_STORAGE, e.to_string());
                }
                Ok(Err(e)) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        if ended {
            break;
        }
    }
    // A group cut short by the end of the body is not kept: the client
    // sends it again.
    match http.store.state(&hash) {
        Ok(BlobState::Complete { .. }) => (StatusCode::OK, "complete\n").into_response(),
        Ok(BlobState::Partial { held, groups, .. }) => (
            StatusCode::ACCEPTED,
            format!("held {held} of {groups} groups\n"),
        )
            .into_response(),
        Ok(BlobState::Missing) => refuse(StatusCode::NOT_FOUND, "the blob was removed"),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_holds_only_for_its_room_blob_direction_and_time() {
        let grants = Grants::new(&[7; 32], Duration::from_secs(60));
        let room = RoomId::new("team/notes").unwrap();
        let (path, expires) = grants.grant(&room, &[1; 32], false);
        let uri: Uri = path.parse().unwrap();
        let (named, grant) = query(&uri).unwrap();
        assert_eq!(named, "team/notes");
        let now = expires - 1;
        assert_eq!(grants.check(&named, &[1; 32], false, &grant, now), Ok(()));
        // Another blob, room, direction, key or time: refused.
        assert!(grants.check(&named, &[2; 32], false, &grant, now).is_err());
        assert!(
            grants
                .check("team/other", &[1; 32], false, &grant, now)
                .is_err()
        );
        assert!(grants.check(&named, &[1; 32], true, &grant, now).is_err());
        let other = Grants::new(&[8; 32], Duration::from_secs(60));
        assert!(other.check(&named, &[1; 32], false, &grant, now).is_err());
        assert!(
            grants
                .check(&named, &[1; 32], false, &grant, expires)
                .is_err()
        );
        // A later expiry written in does not carry the MAC.
        let stretched = grant.replacen(&expires.to_string(), &(expires + 1000).to_string(), 1);
        assert!(
            grants
                .check(&named, &[1; 32], false, &stretched, now)
                .is_err()
        );
        for garbage in ["", "1-r", "x-r-00", "1-r-zz"] {
            assert!(grants.check(&named, &[1; 32], false, garbage, now).is_err());
        }
    }

    #[test]
    fn ranges_parse_as_rfc_9110_says() {
        let range = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            byte_range(&headers, 1000)
        };
        assert_eq!(byte_range(&HeaderMap::new(), 1000), Ok(None));
        assert_eq!(range("bytes=0-99"), Ok(Some((0, 100))));
        assert_eq!(range("bytes=900-"), Ok(Some((900, 1000))));
        assert_eq!(range("bytes=-10"), Ok(Some((990, 1000))));
        assert_eq!(range("bytes=990-5000"), Ok(Some((990, 1000))));
        // Several ranges: the whole blob.
        assert_eq!(range("bytes=0-1,5-6"), Ok(None));
        assert_eq!(range("bytes=1000-"), Err(()));
        assert_eq!(range("bytes=5-4"), Err(()));
        assert_eq!(range("bytes=a-b"), Err(()));
        let upload = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(v).unwrap());
            upload_range(&headers, 200_000)
        };
        assert_eq!(upload_range(&HeaderMap::new(), 200_000), Ok((0, 200_000)));
        assert_eq!(upload("bytes 65536-199999/200000"), Ok((65536, 200_000)));
        assert!(upload("bytes 100-199999/200000").is_err(), "not at a group");
        assert!(upload("bytes 0-199999/300000").is_err(), "another size");
        assert!(upload("bytes 0-200000/200000").is_err(), "past the end");
    }
}
