//! `syncline sync` and `syncline watch`: the SDK's background sync driven
//! from the command line.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use syncline::auth::Capability;
use syncline::{
    Change, Origin, PresenceEvent, PresenceFeed, PresenceKind, Replica, Subscription, SyncHandle,
    SyncOptions, TokenSource,
};
use syncline_core::RoomId;
use syncline_core::ids::to_hex;

use crate::json::to_json;
use crate::{Cli, Exit, Failed, Outcome, open, print};

/// The SDK's options for `servers`: presenting `token` for every room if
/// given (checked here, so a mistyped token fails at once rather than at
/// every connect), else each room's token kept by `syncline join`.
pub(crate) fn options(
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
        } else if let Some(wait) = status.retry_in {
            format!(
                "disconnected ({}); retrying in {:.1} s (attempt {})",
                status.last_error.as_deref().unwrap_or("no connection"),
                wait.as_secs_f64(),
                status.failures + 1
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
    prefetch: Option<syncline::Prefetch>,
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
    // Subscribed before syncing starts, so nothing it brings is missed.
    let subscriptions = if watch {
        let subscriptions = names
            .iter()
            .map(|name| Ok(replica.room(name)?.changes()))
            .collect::<Result<Vec<_>, Failed>>()?;
        Some(subscriptions)
    } else {
        None
    };
    let waits_for_prefetch = prefetch.is_some();
    let sync = replica.connect_with(
        SyncOptions {
            prefetch,
            ..options(&replica, servers, token)?
        },
        &names,
    )?;
    if let Some(subscriptions) = subscriptions {
        return follow(cli, subscriptions, Vec::new(), Some(&sync));
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
            bar.set_message(match (status.connected, status.blobs_uploading) {
                (false, _) => "connecting".to_owned(),
                (true, 0) => "syncing".to_owned(),
                (true, n) => format!("{n} blob(s) up"),
            });
        }
        // A refused blob leaves the upload queue: look before calling it done.
        if let Some(why) = &status.blob_refused {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            // `why` starts with the refusal's code.
            let exit = if why.starts_with("unauthorized") {
                Exit::Unauthorized
            } else {
                Exit::Storage
            };
            return Err(Failed::new(
                exit,
                format!("the relay refused a blob upload: {why}"),
            ));
        }
        if status.connected
            && status.caught_up
            && status.unacknowledged == 0
            && status.blobs_uploading == 0
            && (!waits_for_prefetch || status.blobs_fetching == 0)
        {
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
    // Subscribed before syncing starts, so nothing it brings is missed.
    let subscription = match pattern {
        Some(p) => replica.room(room)?.subscribe(p)?,
        None => replica.room(room)?.changes(),
    };
    let (sync, feeds) = if servers.is_empty() {
        (None, Vec::new())
    } else {
        let feed = replica.room(room)?.presence_events();
        let sync = replica.connect_with(options(&replica, servers, token)?, &[room])?;
        (Some(sync), vec![feed])
    };
    follow(cli, vec![subscription], feeds, sync.as_ref())
}

/// Prints the subscriptions' changes as they happen, until interrupted:
/// each field with its old and new value, each text edit, and the other
/// paths touched.
/// What `follow` prints: a change, or a peer joining, changing or leaving.
enum Seen {
    Change(Change),
    Presence(PresenceEvent),
}

pub(crate) fn follow(
    cli: &Cli,
    subscriptions: Vec<Subscription>,
    feeds: Vec<PresenceFeed>,
    sync: Option<&SyncHandle>,
) -> Outcome {
    // Bounded: the readers wait while this prints.
    let (tx, rx) = std::sync::mpsc::sync_channel(256);
    for subscription in subscriptions {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for change in subscription {
                if tx.send(Seen::Change(change)).is_err() {
                    break;
                }
            }
        });
    }
    for feed in feeds {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for event in feed {
                if tx.send(Seen::Presence(event)).is_err() {
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
            Ok(Seen::Change(change)) => change,
            Ok(Seen::Presence(event)) => {
                print_presence(cli, &event);
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let origin = match change.origin {
            Origin::Local => "local",
            Origin::Remote => "remote",
            Origin::OtherProcess => "other-process",
        };
        let fields: Vec<serde_json::Value> = change
            .fields
            .iter()
            .map(|f| {
                json!({
                    "path": f.path, "field": f.field,
                    "old": f.old.as_ref().map(to_json), "new": f.new.as_ref().map(to_json),
                })
            })
            .collect();
        let texts: Vec<serde_json::Value> = change
            .texts
            .iter()
            .map(|t| json!({"path": t.path, "pos": t.pos, "deleted": t.deleted, "inserted": t.inserted}))
            .collect();
        print(
            cli,
            json!({
                "room": change.room, "origin": origin, "paths": change.paths,
                "fields": fields, "texts": texts, "missed": change.missed,
            }),
            || describe_change(&change, origin),
        );
    }
    Ok(())
}

/// A presence event in one line: `ROOM presence: KEY8#CLIENT joined
/// (busy: "in a meeting")`.
fn print_presence(cli: &Cli, event: &PresenceEvent) {
    let kind = match event.kind {
        PresenceKind::Joined => "joined",
        PresenceKind::Updated => "updated",
        PresenceKind::Left => "left",
    };
    let p = &event.peer;
    print(
        cli,
        json!({
            "room": event.room, "presence": kind, "peer": p.peer, "client": p.client,
            "status": p.status.as_str(), "message": p.message, "data_bytes": p.data.len(),
        }),
        || {
            format!(
                "{} presence: {}#{} {kind} ({}{})",
                event.room,
                &p.peer[..8],
                p.client,
                p.status.as_str(),
                if p.message.is_empty() {
                    String::new()
                } else {
                    format!(": {:?}", p.message)
                }
            )
        },
    );
}

/// A change in one line per field and text edit (the paths alone if it
/// has neither): `ROOM ORIGIN: PATH FIELD: OLD -> NEW`.
fn describe_change(change: &Change, origin: &str) -> String {
    let show = |v: &Option<syncline::Value>| {
        v.as_ref()
            .map_or("(unset)".to_owned(), |v| to_json(v).to_string())
    };
    let head = format!("{} {origin}:", change.room);
    let mut lines: Vec<String> = Vec::new();
    if change.missed > 0 {
        lines.push(format!("{head} ({} changes missed)", change.missed));
    }
    for f in &change.fields {
        lines.push(format!(
            "{head} {} {}: {} -> {}",
            f.path,
            f.field,
            show(&f.old),
            show(&f.new)
        ));
    }
    for t in &change.texts {
        let what = match (t.deleted, t.inserted.is_empty()) {
            (0, _) => format!("insert {:?} at {}", t.inserted, t.pos),
            (n, true) => format!("delete {n} at {}", t.pos),
            (n, false) => format!("replace {n} at {} with {:?}", t.pos, t.inserted),
        };
        lines.push(format!("{head} {} {what}", t.path));
    }
    if change.fields.is_empty() && change.texts.is_empty() {
        lines.push(format!("{head} {}", change.paths.join(" ")));
    }
    lines.join("\n")
}

/// `syncline presence`: shows this replica in a room while it runs, and
/// prints who else is there as they join, change and leave.
pub(crate) fn presence(
    cli: &Cli,
    room: &str,
    status: syncline::PresenceStatus,
    message: &str,
    servers: &[String],
    token: Option<&str>,
) -> Outcome {
    let replica = open(cli)?;
    let servers = crate::servers_or_remote(&replica, servers)?;
    let shown = replica.room(room)?;
    shown.set_presence(status, message, b"")?;
    let feed = shown.presence_events();
    let sync = replica.connect_with(options(&replica, &servers, token)?, &[room])?;
    follow(cli, Vec::new(), vec![feed], Some(&sync))
}
