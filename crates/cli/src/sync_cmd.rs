//! `syncline sync` and `syncline watch`: the SDK's background sync driven
//! from the command line.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use syncline::auth::Capability;
use syncline::{Origin, Replica, SyncOptions, TokenSource};
use syncline_core::RoomId;
use syncline_core::ids::to_hex;
use syncline_core::proto::scope::Scope;

use crate::{Cli, Exit, Failed, Outcome, open, print};

/// The SDK's options for `servers`: presenting `token` for every room if
/// given (checked here, so a mistyped token fails at once rather than at
/// every connect), else each room's token kept by `syncline join`.
fn options(
    replica: &Replica,
    servers: &[String],
    token: Option<&str>,
) -> Result<SyncOptions, Failed> {
    let endpoints: Vec<&str> = servers.iter().map(String::as_str).collect();
    let mut options = SyncOptions::new(&endpoints);
    options.token = Some(match token {
        Some(token) => {
            Capability::from_token(token).map_err(|e| {
                Failed::new(
                    Exit::Usage,
                    format!(
                        "--token / SYNCLINE_TOKEN: {e} (tokens start with sl1.; see syncline token show)"
                    ),
                )
            })?;
            TokenSource::fixed(token)
        }
        None => {
            let replica = replica.clone();
            TokenSource::refresh(move |room| replica.saved_token(room).map_err(|e| e.to_string()))
        }
    });
    Ok(options)
}

/// Keeps `token`, which just worked, for the rooms it names whose key is
/// this replica's: later commits there carry it (a locked room's replicas
/// find it in their history), and later syncs present it.
fn keep_token(replica: &Replica, rooms: &[&str], token: &str) -> Outcome {
    let Ok(cap) = Capability::from_token(token) else {
        return Ok(());
    };
    if cap.claims.subject.to_string() != replica.author() {
        return Ok(());
    }
    for room in rooms {
        if RoomId::new(room).is_ok_and(|id| cap.claims.room.matches(&id)) {
            replica.save_token(room, token)?;
        }
    }
    Ok(())
}

/// Says on stderr what the sync engine's connection does (connected,
/// disconnected and retrying), once per change, and turns what retrying
/// cannot fix into a failure.
#[derive(Default)]
struct Reporter {
    said: Option<String>,
    /// A progress bar shows the connection instead.
    quiet: bool,
}

impl Reporter {
    fn report(&mut self, status: &syncline::Status) -> Outcome {
        if let Some(why) = &status.fatal {
            return Err(Failed::new(
                Exit::Sync,
                format!("{why} (check --server: relays serve ws://HOST:PORT/ws)"),
            ));
        }
        if let Some(why) = &status.refused {
            return Err(Failed::new(
                Exit::Unauthorized,
                format!(
                    "the relay refused access: {why} (get a token: syncline token issue, or \
                     pass it with --token / SYNCLINE_TOKEN)"
                ),
            ));
        }
        let now = if status.connected {
            format!(
                "connected to {}",
                status.endpoint.as_deref().unwrap_or("the relay")
            )
        } else if status.failures > 0 {
            format!(
                "disconnected ({}); retrying",
                status.last_error.as_deref().unwrap_or("no connection")
            )
        } else {
            return Ok(());
        };
        if self.said.as_deref() != Some(now.as_str()) {
            if !self.quiet {
                eprintln!("syncline: {now}");
            }
            self.said = Some(now);
        }
        Ok(())
    }
}

pub(crate) fn sync(
    cli: &Cli,
    servers: &[String],
    token: Option<&str>,
    rooms: &[String],
    watch: bool,
    timeout: Duration,
) -> Outcome {
    let replica = open(cli)?;
    let servers = &crate::servers_or_remote(&replica, servers)?;
    let rooms: Vec<String> = if rooms.is_empty() {
        replica.stored_rooms()?
    } else {
        rooms.to_vec()
    };
    if rooms.is_empty() {
        return Err(Failed::new(
            Exit::Usage,
            "this replica has no rooms yet: name the rooms to sync (syncline sync --server URL ROOM...)",
        ));
    }
    let names: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let sync = replica.connect_with(options(&replica, servers, token)?, &names)?;
    if watch {
        return follow(cli, &replica, &names, None, Some(&sync));
    }
    let mut reporter = Reporter::default();
    // A bar of nodes moved: received by catch-ups plus uploads acknowledged,
    // out of that plus what is still to come.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} nodes [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let held = |names: &[&str]| -> usize {
        names
            .iter()
            .filter_map(|r| replica.room(r).ok())
            .map(|r| r.node_count())
            .sum()
    };
    let (held_at_start, unacked_at_start) = (held(&names), sync.status().unacknowledged);
    let deadline = Instant::now() + timeout;
    loop {
        let status = sync.status();
        if let Some(bar) = &bar {
            let received = held(&names).saturating_sub(held_at_start) as u64;
            let uploaded = unacked_at_start.saturating_sub(status.unacknowledged) as u64;
            let done = received + uploaded;
            bar.set_length(done + status.catching_up + status.unacknowledged as u64);
            bar.set_position(done);
            bar.set_message(if status.connected {
                "syncing"
            } else {
                "connecting"
            });
        }
        if status.connected && status.caught_up && status.unacknowledged == 0 {
            break;
        }
        reporter.quiet = bar.is_some();
        if let Err(failed) = reporter.report(&status) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Err(failed);
        }
        let refused = status.refused.clone().or_else(|| {
            (status.connected && status.caught_up && status.read_only).then(|| {
                format!(
                    "the token allows reading only: {} local nodes were not uploaded",
                    status.unacknowledged
                )
            })
        });
        if let Some(why) = refused {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Err(Failed::new(
                Exit::Unauthorized,
                format!(
                    "the relay refused access: {why} (get a token: syncline token issue, or \
                     pass it with --token / SYNCLINE_TOKEN)"
                ),
            ));
        }
        if Instant::now() >= deadline {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let why = status.last_error.unwrap_or_else(|| {
                format!("{} local nodes still unacknowledged", status.unacknowledged)
            });
            return Err(Failed::new(
                Exit::Sync,
                format!(
                    "sync did not finish within {} s: {why} (is the server running at {}?)",
                    timeout.as_secs(),
                    servers.join(", ")
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    sync.stop();
    if let Some(token) = token {
        keep_token(&replica, &names, token)?;
    }
    let mut rows = Vec::new();
    for name in &names {
        let room = replica.room(name)?;
        rows.push(
            json!({"room": name, "nodes": room.node_count(), "hash": to_hex(&room.state_hash())}),
        );
    }
    print(cli, json!({"synced": rows}), || {
        rows.iter()
            .map(|r| {
                format!(
                    "{}: {} nodes, hash {}",
                    r["room"].as_str().unwrap_or(""),
                    r["nodes"],
                    r["hash"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

pub(crate) fn watch(
    cli: &Cli,
    room: &str,
    pattern: Option<&str>,
    servers: &[String],
    token: Option<&str>,
) -> Outcome {
    let replica = open(cli)?;
    let scope = match pattern {
        Some(p) => {
            Scope::parse(&[p.to_owned()]).map_err(|e| Failed::new(Exit::Usage, e.to_string()))?
        }
        None => Scope::everything(),
    };
    let sync = if servers.is_empty() {
        None
    } else {
        Some(replica.connect_with(options(&replica, servers, token)?, &[room])?)
    };
    follow(cli, &replica, &[room], Some(&scope), sync.as_ref())
}

/// Prints the rooms' changes as they happen, until interrupted.
fn follow(
    cli: &Cli,
    replica: &Replica,
    rooms: &[&str],
    scope: Option<&Scope>,
    sync: Option<&syncline::Sync>,
) -> Outcome {
    let (tx, rx) = std::sync::mpsc::channel();
    for name in rooms {
        let changes = replica.room(name)?.changes();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for change in changes {
                if tx.send(change).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut reporter = Reporter::default();
    loop {
        if let Some(sync) = sync {
            reporter.report(&sync.status())?;
        }
        let change = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(change) => change,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let paths: Vec<&String> = change
            .paths
            .iter()
            .filter(|p| {
                let names: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
                scope.is_none_or(|s| s.matches(&names))
            })
            .collect();
        if paths.is_empty() {
            continue;
        }
        let origin = match change.origin {
            Origin::Local => "local",
            Origin::Remote => "remote",
            Origin::OtherProcess => "other-process",
        };
        print(
            cli,
            json!({"room": change.room, "origin": origin, "paths": paths}),
            || {
                format!(
                    "{} {origin}: {}",
                    change.room,
                    paths
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            },
        );
    }
    Ok(())
}
