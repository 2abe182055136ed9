//! Access control from the command line: which rooms `serve` leaves open,
//! and `syncline token` (issue, show) for capabilities
//! (`docs/security.md`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use serde_json::json;
use syncline::auth::{Capability, Claims, Rights, RoomPattern, hex};
use syncline_core::AuthorId;
use syncline_core::proto::scope::Scope;

use crate::{Cli, Exit, Failed, Outcome, open, print};

/// Who may open which rooms of `syncline serve`.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Access")]
pub(crate) struct ServeAccess {
    /// Open every room to anyone who connects (read and write, no token),
    /// also on a non-loopback address.
    #[arg(long, conflicts_with = "locked")]
    open: bool,
    /// Open the rooms matching PATTERN (a room, or a prefix ending in `*`:
    /// `public/*`); repeatable; the rest stay locked.
    #[arg(long, value_name = "PATTERN", conflicts_with = "open")]
    open_room: Vec<String>,
    /// Lock every room, also on a loopback address (where rooms are open by
    /// default, for development).
    #[arg(long)]
    locked: bool,
    /// Also trust capabilities issued by KEY (hex, e.g. an app backend's
    /// key); repeatable. The relay's own key is always trusted.
    #[arg(long, value_name = "KEY")]
    trust: Vec<String>,
}

impl ServeAccess {
    /// Sets the rooms left open and the keys trusted. By default rooms are
    /// open on a loopback address and locked on any other.
    pub(crate) fn apply(&self, config: &mut syncline_relay::Config) -> Result<(), Failed> {
        let usage = |m: String| Failed::new(Exit::Usage, m);
        config.open_rooms = if self.open {
            vec![every_room()]
        } else if self.locked {
            Vec::new()
        } else if !self.open_room.is_empty() {
            self.open_room
                .iter()
                .map(|p| RoomPattern::parse(p).map_err(|e| usage(format!("--open-room {p}: {e}"))))
                .collect::<Result<_, _>>()?
        } else if config.listen.ip().is_loopback() {
            vec![every_room()]
        } else {
            Vec::new()
        };
        // Named explicitly: the operator said so.
        config.open_on_network = self.open || !self.open_room.is_empty();
        config.trusted_keys = self
            .trust
            .iter()
            .map(|k| parse_key(k).map_err(|e| usage(format!("--trust {k}: {e}"))))
            .collect::<Result<_, _>>()?;
        Ok(())
    }
}

fn every_room() -> RoomPattern {
    RoomPattern::parse("*").expect("* is a room pattern")
}

/// `syncline token …`.
#[derive(Debug, Subcommand)]
pub(crate) enum TokenAction {
    /// Issue a capability token for a key: signed with the relay's key
    /// (--data), or delegated from an admin token of this replica
    /// (--parent, signed with the replica's key). Prints the token.
    Issue {
        /// The room, or a prefix ending in `*` (`team/*`; `*`: every room).
        #[arg(long)]
        room: String,
        /// The key that will use it (hex, as `syncline init` prints it).
        #[arg(long)]
        subject: String,
        /// read, write or admin, comma-separated (write and admin include
        /// read).
        #[arg(long, default_value = "write")]
        rights: String,
        /// A path glob the holder may write (`/docs/**`); repeatable;
        /// none: the whole room.
        #[arg(long = "write-path", value_name = "GLOB")]
        write_paths: Vec<String>,
        /// How long it lasts: 90s, 10m, 12h, 7d [default: 1h, and no longer
        /// than --parent].
        #[arg(long)]
        expires: Option<String>,
        /// Sign with the key of the relay whose data directory this is.
        #[arg(long, conflicts_with = "parent", required_unless_present = "parent")]
        data: Option<PathBuf>,
        /// Delegate from this token, issued to this replica with admin
        /// rights (the new one may only be narrower).
        #[arg(long, env = "SYNCLINE_TOKEN")]
        parent: Option<String>,
    },
    /// Revoke a token (by its id, or the token itself) at a relay: sessions
    /// resting on it close within a second, and it opens no more.
    Revoke {
        /// The token's id (32 hex digits, as `token issue --json` and
        /// `token show` print it), or the token.
        id: String,
        /// The relay's data directory (that relay alone).
        #[arg(long, required_unless_present = "postgres")]
        data: Option<PathBuf>,
        /// A fleet's PostgreSQL database: every relay on it refuses the
        /// token within a second.
        #[arg(
            long,
            env = "SYNCLINE_POSTGRES",
            value_name = "URL",
            hide_env_values = true
        )]
        postgres: Option<String>,
    },
    /// Print what a token claims; with --data, check it against that
    /// relay's key.
    Show {
        /// The token (`sl1.…`).
        token: String,
        /// The relay's data directory.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

pub(crate) fn token(cli: &Cli, action: &TokenAction) -> Outcome {
    match action {
        TokenAction::Issue {
            room,
            subject,
            rights,
            write_paths,
            expires,
            data,
            parent,
        } => {
            let usage = |m: String| Failed::new(Exit::Usage, m);
            let parent = parent
                .as_deref()
                .map(Capability::from_token)
                .transpose()
                .map_err(|e| usage(format!("--parent: {e}")))?;
            let not_after_ms = match expires {
                Some(text) => {
                    let lasts = parse_duration(text)
                        .map_err(|e| usage(format!("--expires {text}: {e}")))?;
                    unix_ms().saturating_add(lasts.as_millis() as u64)
                }
                // A delegated token outliving its parent would be refused.
                None => {
                    let hour = unix_ms().saturating_add(3_600_000);
                    parent
                        .as_ref()
                        .map_or(hour, |p| hour.min(p.claims.not_after_ms))
                }
            };
            Scope::parse(write_paths).map_err(|e| usage(format!("--write-path: {e}")))?;
            let claims = Claims {
                id: fresh_id()?,
                room: RoomPattern::parse(room).map_err(|e| usage(format!("--room {room}: {e}")))?,
                subject: parse_key(subject)
                    .map_err(|e| usage(format!("--subject {subject}: {e}")))?,
                rights: Rights::parse(rights)
                    .map_err(|e| usage(format!("--rights {rights}: {e}")))?,
                write_paths: write_paths.clone(),
                not_after_ms,
            };
            let cap = match (data, parent) {
                (Some(dir), _) => Capability::issue(&relay_key(dir)?, claims, None),
                (None, Some(parent)) => open(cli)?.delegate(parent, claims)?,
                (None, None) => unreachable!("clap requires --data or --parent"),
            };
            print(
                cli,
                json!({"token": cap.to_token(), "id": hex(&cap.claims.id)}),
                || cap.to_token(),
            );
            Ok(())
        }
        TokenAction::Revoke { id, data, postgres } => {
            let id =
                match syncline_core::ids::from_hex::<16>(id.trim()) {
                    Some(id) => id,
                    None => Capability::from_token(id)
                        .map_err(|e| {
                            Failed::new(
                                Exit::Usage,
                                format!(
                                    "{id:?} is neither a token id (32 hex digits) nor a token: {e}"
                                ),
                            )
                        })?
                        .claims
                        .id,
                };
            match (data, postgres) {
                (Some(data), _) => syncline_relay::Server::revoke_in(data, &id).map_err(|e| {
                    Failed::new(
                        Exit::Usage,
                        format!("cannot revoke at {}: {e}", data.display()),
                    )
                })?,
                (None, Some(url)) => syncline_relay::Server::revoke_in_database(url, &id)
                    .map_err(|e| Failed::new(Exit::Storage, format!("cannot revoke: {e}")))?,
                (None, None) => unreachable!("clap requires --data or --postgres"),
            }
            print(cli, json!({"revoked": hex(&id)}), || {
                format!(
                    "revoked {} (a running relay applies it within a second)",
                    hex(&id)
                )
            });
            Ok(())
        }
        TokenAction::Show { token, data } => {
            let cap = Capability::from_token(token)
                .map_err(|e| Failed::new(Exit::Usage, format!("{e}")))?;
            let checked = match data {
                Some(dir) => Some(
                    cap.verify(&[relay_key(dir)?.author()])
                        .map_err(|e| e.to_string()),
                ),
                None => None,
            };
            let c = &cap.claims;
            let mut chain = Vec::new();
            let mut link = Some(&cap);
            while let Some(l) = link {
                chain.push(json!({"id": hex(&l.claims.id), "issuer": l.issuer.to_string()}));
                link = l.parent.as_deref();
            }
            let valid = match &checked {
                Some(Ok(_)) => json!(true),
                Some(Err(e)) => json!(e),
                None => json!(null),
            };
            let expires_in_s = (c.not_after_ms as i64 - unix_ms() as i64) / 1000;
            print(
                cli,
                json!({
                    "id": hex(&c.id),
                    "room": c.room.as_str(),
                    "subject": c.subject.to_string(),
                    "rights": c.rights.to_string(),
                    "write_paths": c.write_paths,
                    "not_after_ms": c.not_after_ms,
                    "expires_in_s": expires_in_s,
                    "chain": chain,
                    "valid": valid,
                }),
                || {
                    let mut lines = vec![
                        format!("id        {}", hex(&c.id)),
                        format!("room      {}", c.room),
                        format!("subject   {}", c.subject),
                        format!("rights    {}", c.rights),
                        format!(
                            "write     {}",
                            if c.write_paths.is_empty() {
                                "the whole room".to_owned()
                            } else {
                                c.write_paths.join(" ")
                            }
                        ),
                        if expires_in_s > 0 {
                            format!("expires   in {expires_in_s} s")
                        } else {
                            format!("expired   {} s ago", -expires_in_s)
                        },
                        format!(
                            "chain     {} link(s), root issuer {}",
                            chain.len(),
                            root(&cap).issuer
                        ),
                    ];
                    match &checked {
                        Some(Ok(_)) => lines.push("valid     signed by this relay's key".into()),
                        Some(Err(e)) => lines.push(format!("INVALID   {e}")),
                        None => {}
                    }
                    lines.join("\n")
                },
            );
            match checked {
                Some(Err(e)) => Err(Failed::new(
                    Exit::Failure,
                    format!("the token is invalid: {e}"),
                )),
                _ => Ok(()),
            }
        }
    }
}

fn root(cap: &Capability) -> &Capability {
    let mut link = cap;
    while let Some(parent) = &link.parent {
        link = parent;
    }
    link
}

fn relay_key(dir: &Path) -> Result<syncline_core::Keypair, Failed> {
    syncline_relay::Server::key_in(dir).map_err(|e| Failed::new(Exit::Usage, e.to_string()))
}

/// A public key in hex.
pub(crate) fn parse_key(text: &str) -> Result<AuthorId, String> {
    AuthorId::from_hex(text.trim()).ok_or_else(|| "not a key: 64 hex digits".to_owned())
}

/// `250ms`, `90s`, `10m`, `12h`, `7d` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "give a number and a unit: 90s, 10m, 12h, 7d".to_owned())?;
    if n == 0 {
        return Err("a duration of 0 would expire at once".into());
    }
    if unit == "ms" {
        return Ok(Duration::from_millis(n));
    }
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s, m, h or d")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| "too long".to_owned())
}

/// Unix time in milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh capability id.
fn fresh_id() -> Result<[u8; 16], Failed> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| Failed::new(Exit::Failure, format!("no randomness for a token id: {e}")))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "m", "0s", "10x", "-5m", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
