//! `syncline remote`: the relays a replica syncs with when no `--server`
//! is given.

use serde_json::json;
use syncline::Replica;

use crate::exit::{Exit, Failed, Outcome};
use crate::{Cli, RemoteAction, open, print};

pub(crate) fn remote(cli: &Cli, action: Option<&RemoteAction>) -> Outcome {
    let replica = open(cli)?;
    match action {
        Some(RemoteAction::Set { urls }) => {
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            replica.set_remotes(&urls)?;
        }
        Some(RemoteAction::Clear) => replica.set_remotes(&[])?,
        Some(RemoteAction::Show) | None => {}
    }
    let remotes = replica.remotes()?;
    print(cli, json!({"remotes": remotes}), || {
        if remotes.is_empty() {
            "no remote: syncline remote set ws://HOST:PORT/ws".to_owned()
        } else {
            remotes.join("\n")
        }
    });
    Ok(())
}

/// `given` servers, else the replica's remembered ones, else a usage
/// error saying how to name one.
pub(crate) fn servers_or_remote(
    replica: &Replica,
    given: &[String],
) -> Result<Vec<String>, Failed> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let remembered = replica.remotes()?;
    if remembered.is_empty() {
        return Err(Failed::new(
            Exit::Usage,
            "no server: pass --server ws://HOST:PORT/ws, set SYNCLINE_SERVER, or remember one \
             with syncline remote set URL",
        ));
    }
    Ok(remembered)
}
