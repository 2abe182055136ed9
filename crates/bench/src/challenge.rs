//! The relay's first frame on a connection: the challenge each `hello`
//! signs (`docs/protocol.md`).

use anyhow::{Context, Result, bail};
use futures_util::{Stream, StreamExt};
use syncline_core::proto::message::{Envelope, Message};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// Reads the connection's first frame, which must be a `challenge`, and
/// returns its nonce.
pub(crate) async fn read_challenge(
    stream: &mut (impl Stream<Item = Result<WsMessage, tungstenite::Error>> + Unpin),
) -> Result<[u8; 32]> {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
        .await
        .context("no challenge from the relay within 30 s")?
        .context("the relay closed the connection")??;
    let WsMessage::Binary(bytes) = frame else {
        bail!("the relay's first frame is not binary");
    };
    match Envelope::decode(&bytes)?.message {
        Message::Challenge { nonce, .. } => Ok(nonce),
        other => bail!(
            "the relay's first frame is type {}, not a challenge",
            other.type_code()
        ),
    }
}
