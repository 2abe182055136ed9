//! Blob bytes over a relay's direct URLs (`docs/protocol.md` §5.10): plain
//! HTTP/1.1 on the relay's own address, a `Range` (or `Content-Range`) per
//! run of groups the other side lacks. Every group is checked against the
//! blob's outboard as it lands (the local store does it on write, the
//! relay on its side), so a bad byte stops the transfer at once; nothing
//! holds more than [`GROUPS_PER_STEP`] groups in memory.
//!
//! A transfer here is a task beside the sync engine: when it ends, the
//! engine is woken and reads the outcome; an error sends the transfer back
//! to the session (`blob-need` / `blob-chunk`), which every relay speaks.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use syncline_core::blob::{GROUP_BYTES, group_range};
use syncline_store::BlobStore;
use tokio::net::TcpStream;

/// Groups read or written per blocking step (1 MiB).
const GROUPS_PER_STEP: u64 = 16;

/// How long the relay may stay silent (connecting, or mid-body).
const IDLE: Duration = Duration::from_secs(30);

/// Where a relay's direct URLs live: the `host:port` of its WebSocket
/// endpoint (`ws://host:port/ws`).
pub(crate) fn origin_of(endpoint: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("ws://")?;
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then(|| authority.to_owned())
}

type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

/// An HTTP/1.1 connection to `origin`, its driver spawned.
async fn connect<B>(origin: &str) -> Result<Sender<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::time::timeout(IDLE, TcpStream::connect(origin))
        .await
        .map_err(|_| format!("{origin}: no connection within {IDLE:?}"))?
        .map_err(|e| format!("{origin}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Why a response is not the success asked for: its status and the first
/// line of what the relay said.
async fn refused(response: hyper::Response<hyper::body::Incoming>) -> String {
    let status = response.status();
    let said = tokio::time::timeout(IDLE, response.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    format!("HTTP {status}: {said}")
}

/// The bytes `start..end` that groups `groups` of a blob of `size` bytes
/// span.
fn byte_span(size: u64, groups: &Range<u64>) -> (u64, u64) {
    (
        group_range(size, groups.start).start,
        group_range(size, groups.end - 1).end,
    )
}

/// Downloads the runs of groups `ranges` of blob `hash` (begun in
/// `store`) from `origin` + `path` into the store, one request per run on
/// one connection.
pub(crate) async fn download(blob: Target, ranges: Vec<Range<u64>>) -> Result<(), String> {
    let mut sender = connect::<Empty<Bytes>>(&blob.origin).await?;
    for groups in ranges {
        sender.ready().await.map_err(|e| e.to_string())?;
        download_run(&mut sender, &blob, groups).await?;
    }
    Ok(())
}

/// A blob to move over a direct URL, and where.
#[derive(Debug)]
pub(crate) struct Target {
    /// The relay's `host:port`.
    pub(crate) origin: String,
    /// Path and query, its grant included.
    pub(crate) path: String,
    pub(crate) store: Arc<BlobStore>,
    pub(crate) hash: [u8; 32],
    pub(crate) size: u64,
}

async fn download_run(
    sender: &mut Sender<Empty<Bytes>>,
    blob: &Target,
    groups: Range<u64>,
) -> Result<(), String> {
    let (hash, size) = (blob.hash, blob.size);
    let (start, end) = byte_span(size, &groups);
    let request = Request::get(blob.path.as_str())
        .header(header::HOST, blob.origin.as_str())
        .header(header::RANGE, format!("bytes={start}-{}", end - 1))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let whole = start == 0 && end == size;
    let ok = response.status() == StatusCode::PARTIAL_CONTENT
        || (whole && response.status() == StatusCode::OK);
    if !ok {
        return Err(refused(response).await);
    }
    let mut body = response.into_body();
    let mut index = groups.start;
    let mut group = Vec::with_capacity(GROUP_BYTES);
    let mut ready: Vec<(u64, Vec<u8>)> = Vec::new();
    loop {
        let frame = tokio::time::timeout(IDLE, body.frame())
            .await
            .map_err(|_| format!("the relay sent nothing for {IDLE:?}"))?;
        let ended = frame.is_none();
        if let Some(frame) = frame {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(mut data) = frame.into_data() {
                while !data.is_empty() {
                    if index >= groups.end {
                        return Err("the relay sent more than was asked for".into());
                    }
                    let range = group_range(size, index);
                    let want = (range.end - range.start) as usize;
                    let take = data.len().min(want - group.len());
                    group.extend_from_slice(&data.split_to(take));
                    if group.len() == want {
                        let full = std::mem::replace(&mut group, Vec::with_capacity(GROUP_BYTES));
                        ready.push((index, full));
                        index += 1;
                    }
                }
            }
        }
        if ready.len() as u64 >= GROUPS_PER_STEP || (ended && !ready.is_empty()) {
            let store = blob.store.clone();
            let batch = std::mem::take(&mut ready);
            tokio::task::spawn_blocking(move || {
                batch
                    .iter()
                    .try_for_each(|(i, bytes)| store.write_group(&hash, *i, bytes).map(drop))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        }
        if ended {
            break;
        }
    }
    if index < groups.end {
        return Err(format!(
            "the relay's answer ended at group {index} of {}",
            groups.end
        ));
    }
    Ok(())
}

/// Uploads the runs of groups `ranges` of blob `hash` (complete in
/// `store`) to `origin` + `path`, which a `blob-put` began on the relay:
/// one request per run.
pub(crate) async fn upload(blob: Target, ranges: Vec<Range<u64>>) -> Result<(), String> {
    for groups in ranges {
        upload_run(&blob, groups).await?;
    }
    Ok(())
}

async fn upload_run(blob: &Target, groups: Range<u64>) -> Result<(), String> {
    let (hash, size) = (blob.hash, blob.size);
    let (start, end) = byte_span(size, &groups);
    // Groups are read a step at a time on the blocking pool and handed to
    // the body through a queue of two steps.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(2);
    let store = blob.store.clone();
    let reader = tokio::spawn(async move {
        let mut index = groups.start;
        while index < groups.end {
            let last = (index + GROUPS_PER_STEP).min(groups.end);
            let store = store.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut out = Vec::with_capacity(((last - index) as usize) * GROUP_BYTES);
                for i in index..last {
                    out.extend_from_slice(&store.read_group(&hash, i).map_err(|e| e.to_string())?);
                }
                Ok::<_, String>(Bytes::from(out))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let failed = read.is_err();
            if tx.send(read).await.is_err() || failed {
                return;
            }
            index = last;
        }
    });
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|step| step.map(|read| read.map(Frame::data)))
    }));
    let result = async {
        let mut sender = connect::<StreamBody<_>>(&blob.origin).await?;
        let request = Request::put(blob.path.as_str())
            .header(header::HOST, blob.origin.as_str())
            .header(header::CONTENT_LENGTH, end - start)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", end - 1),
            )
            .body(body)
            .map_err(|e| e.to_string())?;
        // The relay answers once it has the whole body: allow for it.
        let response = tokio::time::timeout(
            IDLE + Duration::from_secs((end - start) >> 20),
            sender.send_request(request),
        )
        .await
        .map_err(|_| "the relay did not answer the upload in time".to_owned())?
        .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(refused(response).await);
        }
        Ok(())
    }
    .await;
    reader.abort();
    result
}
