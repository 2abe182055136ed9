//! `syncline`: run a relay, edit the rooms of a local replica, and sync.
//!
//! Scriptable: every read takes `--json`; exit codes are stable (see
//! [`Exit`]); errors say what to do. The replica is `--replica DIR` or
//! `SYNCLINE_REPLICA` (default `./syncline-replica`).

// Printing is this binary's job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use syncline::{Replica, Room};
use syncline_core::ids::to_hex;
use syncline_core::{EntryKind, Value};

mod access;
mod blob_cmd;
mod demo;
mod exit;
mod history;
mod invite;
mod json;
mod remote;
mod resolve;
mod sync_cmd;

use exit::{Exit, Failed, Outcome};
use json::{from_json, to_json};
use remote::servers_or_remote;

/// Syncline: a local-first sync engine. Edit rooms of a local replica
/// offline; sync them through a relay.
#[derive(Debug, Parser)]
#[command(
    name = "syncline",
    version,
    about,
    after_help = "Exit codes: 0 success; 1 other failure; 2 bad arguments; 3 path or field not \
found; 4 the server could not be reached, is no relay, or did not acknowledge in time; 5 local \
storage failed or the replica is in use; 6 the relay refused access.\n\
Environment: SYNCLINE_REPLICA (--replica), SYNCLINE_SERVER (--server), SYNCLINE_TOKEN \
(--token), SYNCLINE_POSTGRES and SYNCLINE_NATS (serve's --postgres and --nats), SYNCLINE_LOG \
(log filter, e.g. debug).\n\
Server URLs: ws://HOST:PORT/ws (the path defaults to /ws)."
)]
struct Cli {
    /// The replica directory.
    #[arg(
        long,
        global = true,
        env = "SYNCLINE_REPLICA",
        default_value = "./syncline-replica"
    )]
    replica: PathBuf,
    /// Print reads as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of `serve`'s limits costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay server (embedded SQLite store, or PostgreSQL).
    Serve {
        /// Where the server keeps its data.
        #[arg(long, default_value = "./syncline-data")]
        data: PathBuf,
        /// Keep rooms in this PostgreSQL database
        /// (postgres://user@host:port/db) instead of DATA/relay.db.
        #[arg(
            long,
            env = "SYNCLINE_POSTGRES",
            value_name = "URL",
            hide_env_values = true
        )]
        postgres: Option<String>,
        /// With --postgres: the NATS server relays sharing the database
        /// tell one another of their writes through (nats://host:4222).
        /// Without it they find each other's writes every --fleet-poll.
        #[arg(long, env = "SYNCLINE_NATS", value_name = "URL", requires = "postgres")]
        nats: Option<String>,
        /// Subject prefix of the fleet's notices on NATS (fleets sharing a
        /// NATS server need prefixes of their own).
        #[arg(long, default_value = "syncline", value_name = "PREFIX")]
        nats_prefix: String,
        /// With --postgres: how often to check the loaded rooms against
        /// the database for writes of other relays whose notice was
        /// missed (250ms, 1s, ...).
        #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = access::parse_duration)]
        fleet_poll: Duration,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: std::net::SocketAddr,
        /// Serve /metrics and /healthz without a token on this loopback
        /// address (on --listen, /metrics needs an admin token).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Most nodes per pack the server sends (smaller packs: finer
        /// resumption of interrupted catch-ups, more overhead).
        #[arg(long, default_value_t = 50_000)]
        max_pack_nodes: usize,
        #[command(flatten)]
        access: access::ServeAccess,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Invite a device: print a one-time code that `syncline join` trades
    /// for a capability (needs an admin token for the room).
    Invite {
        /// The room (or a prefix ending in `*`).
        room: String,
        /// Relay URL (ws://host:port/ws; default: the remembered remote).
        #[arg(long, env = "SYNCLINE_SERVER")]
        server: Option<String>,
        /// An admin token for the room.
        #[arg(long, env = "SYNCLINE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// read, write or admin, comma-separated (no more than the admin
        /// token holds).
        #[arg(long, default_value = "write")]
        rights: String,
        /// A path glob the device may write (/docs/**); repeatable; none:
        /// the whole room.
        #[arg(long = "write", value_name = "GLOB")]
        write_paths: Vec<String>,
        /// How long the code can be used: 90s, 10m, 12h (at most 7d).
        #[arg(long, default_value = "10m")]
        expires: String,
        /// How long the device's capability lasts once joined.
        #[arg(long, default_value = "30d")]
        lasts: String,
    },
    /// Join a room with an invite code: get a capability for this
    /// replica's key, keep it, and sync the room once.
    Join {
        /// The code `syncline invite` printed (sli1.…).
        code: String,
        /// The room, when the invite names several (a prefix ending in *).
        #[arg(long)]
        room: Option<String>,
        /// Give up syncing after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Issue and inspect capability tokens for locked rooms.
    Token {
        #[command(subcommand)]
        action: access::TokenAction,
    },
    /// Create the replica (if needed) and print its identity.
    Init,
    /// Set a field to a JSON value, creating the entry's path.
    Set {
        /// Room name.
        room: String,
        /// Entry path, e.g. /todo/1.
        path: String,
        /// Field name.
        field: String,
        /// The value, as JSON (strings need quotes: '"milk"').
        value: String,
    },
    /// Print a field, or every field of an entry.
    Get {
        /// Room name.
        room: String,
        /// Entry path.
        path: String,
        /// One field (all if omitted).
        field: Option<String>,
    },
    /// List the children of an entry.
    Ls {
        /// Room name.
        room: String,
        /// Entry path.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Delete an entry and its subtree.
    Rm {
        /// Room name.
        room: String,
        /// Entry path.
        path: String,
    },
    /// Move or rename an entry (creating the destination's parents).
    Mv {
        /// Room name.
        room: String,
        /// Entry path.
        path: String,
        /// New path.
        new_path: String,
        /// Move even onto a name that exists (both entries then carry it,
        /// listed by `conflicts`).
        #[arg(long)]
        force: bool,
    },
    /// Edit or print a collaborative text.
    Text {
        /// Room name.
        room: String,
        /// Text entry path.
        path: String,
        #[command(subcommand)]
        action: TextAction,
    },
    /// List conflicts at and below a path, each with numbered candidates
    /// and the `resolve` command that settles it.
    Conflicts {
        /// Room name.
        room: String,
        /// Entry path.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Settle a conflict by picking a candidate as `conflicts` numbers
    /// them: a field's value (or a new one with --value), which entry
    /// keeps a shared name (the others are renamed NAME~2, …), or where a
    /// concurrently moved entry goes.
    Resolve {
        /// Room name.
        room: String,
        /// The entry's path (for a name conflict: the shared path).
        path: String,
        /// The field, for a field conflict.
        field: Option<String>,
        /// The candidate to keep (0: the one in effect).
        #[arg(long, conflicts_with = "value")]
        pick: Option<usize>,
        /// A value of your own for the field, as JSON.
        #[arg(long)]
        value: Option<String>,
    },
    /// Print the room's history, oldest first: time (UTC), node id, author
    /// and seq, and what each node did.
    Log {
        /// Room name.
        room: String,
    },
    /// Print one node: author, time, parents and every edit.
    Show {
        /// Room name.
        room: String,
        /// The node's id, or its first hex digits (at least 4).
        node: String,
    },
    /// Load a JSON file into a room: what `export` printed (the same
    /// state), or any JSON object, whose nested objects become entries and
    /// other values fields.
    Import {
        /// Room name.
        room: String,
        /// The JSON file (`-` for stdin).
        file: PathBuf,
    },
    /// Print the room's state hash (hex): equal on replicas that converged.
    Hash {
        /// Room name.
        room: String,
    },
    /// Print the whole visible state as JSON.
    Export {
        /// Room name.
        room: String,
    },
    /// Remember the relay this replica syncs with (used when --server is
    /// not given), show it, or forget it.
    Remote {
        #[command(subcommand)]
        action: Option<RemoteAction>,
    },
    /// Sync rooms with a relay.
    Sync {
        /// Relay URL (ws://host:port/ws); repeat for fallbacks, tried in
        /// order (default: the remembered remote).
        #[arg(long, env = "SYNCLINE_SERVER")]
        server: Vec<String>,
        /// Rooms (default: every room of the replica).
        rooms: Vec<String>,
        /// Catch up, upload, wait until the server holds every local node
        /// durably, then exit (the default).
        #[arg(long, conflicts_with = "watch")]
        once: bool,
        /// Stay connected and keep syncing until interrupted.
        #[arg(long)]
        watch: bool,
        /// Give up after this many seconds (with --once).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// A capability token for locked rooms (`syncline token issue`).
        #[arg(long, env = "SYNCLINE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Fetch the blobs referenced at paths matching this pattern
        /// (`/photos/**`; repeat for more) as they appear, not only on
        /// `blob get`; `sync --once` waits for them.
        #[arg(long = "prefetch", value_name = "PATTERN")]
        prefetch: Vec<String>,
        /// The largest blob --prefetch fetches [default: 16 MiB].
        #[arg(long, value_name = "BYTES", requires = "prefetch")]
        prefetch_max: Option<u64>,
    },
    /// Print live changes of a room: local, from a relay, and from other
    /// processes on this replica; fields with old and new values, text edits.
    Watch {
        /// Room name.
        room: String,
        /// Only paths matching this glob (e.g. /projects/alpha/**).
        pattern: Option<String>,
        /// Relay URL to sync with while watching.
        #[arg(long, env = "SYNCLINE_SERVER")]
        server: Vec<String>,
        /// A capability token for locked rooms (`syncline token issue`).
        #[arg(long, env = "SYNCLINE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Show this replica as present in a room while it runs, and print
    /// who else is there as they join, change and leave (never in history).
    Presence {
        /// Room name.
        room: String,
        /// online, away or busy.
        #[arg(long, default_value = "online", value_parser = parse_status)]
        status: syncline::PresenceStatus,
        /// A message for people ("in a meeting"), at most 256 bytes.
        #[arg(long, default_value = "")]
        message: String,
        /// Relay URL (default: the remembered remote).
        #[arg(long, env = "SYNCLINE_SERVER")]
        server: Vec<String>,
        /// A capability token for locked rooms.
        #[arg(long, env = "SYNCLINE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Files as blobs: their bytes beside the history, a reference in a
    /// field, moved through the relay.
    Blob {
        #[command(subcommand)]
        action: BlobAction,
    },
    /// Print the replica's rooms, their sizes and unacknowledged nodes.
    Status {
        /// One room (default: all).
        room: Option<String>,
    },
    /// Start a relay and three replicas in this process, edit one room
    /// concurrently offline, reconnect, and show that they converge.
    Demo,
}

#[derive(Debug, Subcommand)]
enum BlobAction {
    /// Store FILE as a blob and set the field to its reference (`sync`
    /// uploads it).
    Put {
        /// Room name.
        room: String,
        /// Entry path.
        path: String,
        /// Field name.
        field: String,
        /// The file.
        file: PathBuf,
        /// Its media type.
        #[arg(long, default_value = "application/octet-stream")]
        mime: String,
    },
    /// Write the blob a field references to a file (or stdout), fetching
    /// it from the relay unless it is held here.
    Get {
        /// Room name.
        room: String,
        /// Entry path.
        path: String,
        /// Field name.
        field: String,
        /// Where to write it (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Relay URL (default: the remembered remote).
        #[arg(long, env = "SYNCLINE_SERVER")]
        server: Vec<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// List the blobs this replica holds, whole or in part.
    Status,
    /// Remove the blobs no room references now and no upload waits for
    /// (the relay keeps them: `blob get` fetches them again).
    Gc {
        /// Keep blobs younger than this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
        grace: f64,
    },
}

#[derive(Debug, Subcommand)]
enum RemoteAction {
    /// Remember these relay URLs (tried in order).
    Set {
        /// ws://host:port/ws (the path defaults to /ws).
        #[arg(required = true)]
        urls: Vec<String>,
    },
    /// Print the remembered relay URLs (the default).
    Show,
    /// Forget them.
    Clear,
}

#[derive(Debug, Subcommand)]
enum TextAction {
    /// Insert a string at a character position.
    Insert {
        /// Position (characters from the start).
        pos: usize,
        /// What to insert.
        string: String,
    },
    /// Delete characters.
    Delete {
        /// Position (characters from the start).
        pos: usize,
        /// How many characters.
        len: usize,
    },
    /// Print the text.
    Cat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs its work; other commands only problems.
    let default = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNCLINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("syncline: {}", f.message);
            ExitCode::from(f.exit as u8)
        }
    }
}

fn open(cli: &Cli) -> Result<Replica, Failed> {
    Ok(Replica::open(&cli.replica)?)
}

/// Prints `value` as JSON, or `text` otherwise.
fn print(cli: &Cli, value: serde_json::Value, text: impl FnOnce() -> String) {
    if cli.json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

fn run(cli: Cli) -> Outcome {
    match &cli.command {
        Command::Serve {
            data,
            postgres,
            nats,
            nats_prefix,
            fleet_poll,
            listen,
            max_pack_nodes,
            metrics_listen,
            access,
            limits,
        } => serve(
            syncline_relay::Config {
                data_dir: data.clone(),
                postgres: postgres.clone(),
                nats: nats.clone(),
                nats_prefix: nats_prefix.clone(),
                fleet_poll: *fleet_poll,
                listen: *listen,
                metrics_listen: *metrics_listen,
                ..syncline_relay::Config::default()
            },
            *max_pack_nodes,
            access,
            limits,
        ),
        Command::Token { action } => access::token(&cli, action),
        Command::Invite {
            room,
            server,
            token,
            rights,
            write_paths,
            expires,
            lasts,
        } => invite::invite(
            &cli,
            &invite::InviteRequest {
                room,
                server: &servers_or_remote(&open(&cli)?, server.as_slice())?[0],
                token: token.as_deref(),
                rights,
                write_paths,
                expires,
                lasts,
            },
        ),
        Command::Join {
            code,
            room,
            timeout,
        } => invite::join(&cli, code, room.as_deref(), Duration::from_secs(*timeout)),
        Command::Init => {
            let replica = open(&cli)?;
            print(
                &cli,
                json!({"replica": cli.replica, "author": replica.author()}),
                || {
                    format!(
                        "replica {} (author {})",
                        cli.replica.display(),
                        replica.author()
                    )
                },
            );
            Ok(())
        }
        Command::Set {
            room,
            path,
            field,
            value,
        } => {
            let parsed: serde_json::Value = serde_json::from_str(value).map_err(|e| {
                Failed::new(
                    Exit::Usage,
                    format!("the value is not JSON ({e}); quote strings: '\"text\"'"),
                )
            })?;
            let value = from_json(&parsed).map_err(|e| Failed::new(Exit::Usage, e))?;
            edit(&cli, room, |tx| tx.set(path, field, value))
        }
        Command::Get { room, path, field } => get(&cli, room, path, field.as_deref()),
        Command::Ls { room, path } => {
            let entries = open(&cli)?.room(room)?.list(path)?;
            print(
                &cli,
                json!(
                    entries
                        .iter()
                        .map(|e| json!({"name": e.name, "path": e.path, "kind": e.kind.as_str()}))
                        .collect::<Vec<_>>()
                ),
                || {
                    entries
                        .iter()
                        .map(|e| match e.kind {
                            EntryKind::Map => e.path.clone(),
                            kind => format!("{}  ({})", e.path, kind.as_str()),
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
            Ok(())
        }
        Command::Rm { room, path } => edit(&cli, room, |tx| tx.delete(path)),
        Command::Mv {
            room,
            path,
            new_path,
            force,
        } => {
            let exists = open(&cli)?.room(room)?.exists(new_path)?;
            if exists && !*force {
                return Err(Failed::new(
                    Exit::Usage,
                    format!(
                        "{new_path} exists already: move somewhere else, or pass --force to give \
                         both entries the name (a name conflict, see syncline conflicts)"
                    ),
                ));
            }
            edit(&cli, room, |tx| {
                // As `set` does, a move creates the destination's missing
                // parents (a refused move takes them back with it).
                if let Some((parent, _)) = new_path.trim_end_matches('/').rsplit_once('/')
                    && !parent.is_empty()
                {
                    tx.ensure(parent, EntryKind::Map)?;
                }
                tx.mv(path, new_path)
            })
        }
        Command::Text { room, path, action } => match action {
            TextAction::Insert { pos, string } => edit(&cli, room, |tx| {
                tx.ensure(path, EntryKind::Text)?;
                tx.text_insert(path, *pos, string)
            }),
            TextAction::Delete { pos, len } => {
                edit(&cli, room, |tx| tx.text_delete(path, *pos, *len))
            }
            TextAction::Cat => {
                let text = open(&cli)?.room(room)?.text(path)?;
                print(&cli, json!({"path": path, "text": text}), || text.clone());
                Ok(())
            }
        },
        Command::Conflicts { room, path } => resolve::conflicts(&cli, room, path),
        Command::Resolve {
            room,
            path,
            field,
            pick,
            value,
        } => resolve::resolve(&cli, room, path, field.as_deref(), *pick, value.as_deref()),
        Command::Log { room } => history::log(&cli, room),
        Command::Show { room, node } => history::show(&cli, room, node),
        Command::Import { room, file } => import(&cli, room, file),
        Command::Hash { room } => {
            let hash = to_hex(&open(&cli)?.room(room)?.state_hash());
            print(&cli, json!({"room": room, "hash": hash}), || hash.clone());
            Ok(())
        }
        Command::Export { room } => {
            let state = to_json(&open(&cli)?.room(room)?.export());
            // The export is JSON either way.
            println!(
                "{}",
                serde_json::to_string_pretty(&state).unwrap_or_default()
            );
            Ok(())
        }
        Command::Remote { action } => remote::remote(&cli, action.as_ref()),
        Command::Sync {
            server,
            rooms,
            watch,
            timeout,
            token,
            prefetch,
            prefetch_max,
            ..
        } => sync_cmd::sync(
            &cli,
            server,
            token.as_deref(),
            rooms,
            *watch,
            Duration::from_secs(*timeout),
            (!prefetch.is_empty()).then(|| syncline::Prefetch {
                max_bytes: prefetch_max.unwrap_or(16 << 20),
                paths: prefetch.clone(),
            }),
        ),
        Command::Watch {
            room,
            pattern,
            server,
            token,
        } => sync_cmd::watch(&cli, room, pattern.as_deref(), server, token.as_deref()),
        Command::Status { room } => status(&cli, room.as_deref()),
        Command::Blob { action } => match action {
            BlobAction::Put {
                room,
                path,
                field,
                file,
                mime,
            } => blob_cmd::put(&cli, room, path, field, file, mime),
            BlobAction::Get {
                room,
                path,
                field,
                output,
                server,
                timeout,
            } => blob_cmd::get(
                &cli,
                room,
                path,
                field,
                output.as_deref(),
                server,
                Duration::from_secs(*timeout),
            ),
            BlobAction::Status => blob_cmd::status(&cli),
            BlobAction::Gc { grace } => blob_cmd::gc(&cli, *grace),
        },
        Command::Presence {
            room,
            status,
            message,
            server,
            token,
        } => sync_cmd::presence(&cli, room, *status, message, server, token.as_deref()),
        Command::Demo => demo::run(&cli),
    }
}

/// What `syncline serve` lets peers spend (`docs/security.md`); each left
/// out keeps its default.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Limits")]
struct ServeLimits {
    /// Most rooms loaded at once [default: 10000].
    #[arg(long)]
    max_rooms: Option<usize>,
    /// Room steps running at once [default: twice the cores, at least 4].
    #[arg(long)]
    room_workers: Option<usize>,
    /// Most connections open at once [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections open at once from one IP address [default: 256].
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// Most sessions on one connection [default: 256].
    #[arg(long)]
    max_sessions_per_conn: Option<usize>,
    /// Most sessions the connections of one IP address open [default:
    /// 1024].
    #[arg(long)]
    max_sessions_per_ip: Option<usize>,
    /// Seconds a connection has to send its HTTP request [default: 5].
    #[arg(long, value_name = "SECS")]
    upgrade_timeout: Option<f64>,
    /// Seconds a WebSocket connection has to open a session [default: 10].
    #[arg(long, value_name = "SECS")]
    session_wait: Option<f64>,
    /// Seconds a write to a peer may take before it counts as lagging
    /// [default: 5].
    #[arg(long, value_name = "SECS")]
    write_timeout: Option<f64>,
    /// Bytes queued for one connection before it counts as lagging
    /// [default: 16 MiB].
    #[arg(long, value_name = "BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// Frame bytes per second one connection may send [default: 32 MiB].
    #[arg(long, value_name = "BYTES")]
    peer_bytes_per_sec: Option<u64>,
    /// Frame bytes one connection may send at once [default: 64 MiB].
    #[arg(long, value_name = "BYTES")]
    peer_burst_bytes: Option<u64>,
    /// Nodes per second one connection may insert [default: 20000].
    #[arg(long)]
    peer_nodes_per_sec: Option<u64>,
    /// Nodes one connection may insert at once [default: 200000].
    #[arg(long)]
    peer_burst_nodes: Option<u64>,
    /// Bytes of history one room may hold [default: 4 GiB].
    #[arg(long, value_name = "BYTES")]
    max_room_bytes: Option<u64>,
    /// Bytes the server's store may take on disk [default: no limit].
    #[arg(long, value_name = "BYTES")]
    max_store_bytes: Option<u64>,
    /// Bytes of blobs the relay keeps [default: 10 GiB].
    #[arg(long, value_name = "BYTES")]
    max_blob_bytes: Option<u64>,
    /// A key to encrypt blobs with at rest, as ID=HEX (a number from 1 and
    /// 64 hex digits); repeat to rotate: the last encrypts new blobs, the
    /// others still read older ones.
    #[arg(long = "blob-key", value_name = "ID=HEX")]
    blob_keys: Vec<String>,
    /// Seconds a direct blob URL stays valid [default: 60].
    #[arg(long, value_name = "SECS", conflicts_with = "no_blob_urls")]
    blob_url_ttl: Option<f64>,
    /// Serve no direct blob URLs: blobs move over sessions only.
    #[arg(long)]
    no_blob_urls: bool,
    /// Seconds between removals of blobs no room references [default: 3600].
    #[arg(long, value_name = "SECS")]
    blob_gc_every: Option<f64>,
    /// Seconds a blob no room references is kept (an upload whose node is
    /// still to come) [default: 86400].
    #[arg(long, value_name = "SECS")]
    blob_gc_grace: Option<f64>,
    /// Presence updates one session may send at once [default: 10].
    #[arg(long)]
    presence_burst: Option<u32>,
    /// Presence updates one session may send per second [default: 5].
    #[arg(long)]
    presence_per_sec: Option<u32>,
    /// Seconds a room without sessions stays loaded [default: 30].
    #[arg(long, value_name = "SECS")]
    room_idle: Option<f64>,
}

impl ServeLimits {
    fn apply(&self, config: &mut syncline_relay::Config) -> Result<(), Failed> {
        // A bound of 0 would refuse everything: a typo, not a policy.
        let secs = |flag: &str, v: f64| match Duration::try_from_secs_f64(v) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(Failed::new(
                Exit::Usage,
                format!("--{flag} {v}: give a number of seconds above 0"),
            )),
        };
        fn positive<T: PartialEq + Default + std::fmt::Display>(
            flag: &str,
            v: T,
        ) -> Result<T, Failed> {
            if v == T::default() {
                return Err(Failed::new(
                    Exit::Usage,
                    format!("--{flag} 0 would refuse everything: give 1 or more"),
                ));
            }
            Ok(v)
        }
        macro_rules! set {
            ($field:ident, $flag:literal) => {
                if let Some(v) = self.$field {
                    config.$field = positive($flag, v)?;
                }
            };
            ($field:ident, $flag:literal, secs) => {
                if let Some(v) = self.$field {
                    config.$field = secs($flag, v)?;
                }
            };
        }
        set!(max_rooms, "max-rooms");
        set!(room_workers, "room-workers");
        set!(max_connections, "max-connections");
        set!(max_connections_per_ip, "max-connections-per-ip");
        set!(max_sessions_per_conn, "max-sessions-per-conn");
        set!(max_sessions_per_ip, "max-sessions-per-ip");
        set!(outbound_queue_bytes, "outbound-queue-bytes");
        set!(peer_bytes_per_sec, "peer-bytes-per-sec");
        set!(peer_burst_bytes, "peer-burst-bytes");
        set!(max_room_bytes, "max-room-bytes");
        set!(peer_nodes_per_sec, "peer-nodes-per-sec");
        set!(peer_burst_nodes, "peer-burst-nodes");
        set!(max_store_bytes, "max-store-bytes");
        set!(max_blob_bytes, "max-blob-bytes");
        for key in &self.blob_keys {
            config.blob_keys.push(parse_blob_key(key)?);
        }
        set!(presence_burst, "presence-burst");
        set!(presence_per_sec, "presence-per-sec");
        set!(upgrade_timeout, "upgrade-timeout", secs);
        set!(session_wait, "session-wait", secs);
        set!(write_timeout, "write-timeout", secs);
        if let Some(v) = self.blob_url_ttl {
            config.blob_url_ttl = Some(secs("blob-url-ttl", v)?);
        }
        if self.no_blob_urls {
            config.blob_url_ttl = None;
        }
        set!(room_idle, "room-idle", secs);
        set!(blob_gc_every, "blob-gc-every", secs);
        set!(blob_gc_grace, "blob-gc-grace", secs);
        Ok(())
    }
}

fn serve(
    mut config: syncline_relay::Config,
    max_pack_nodes: usize,
    access: &access::ServeAccess,
    limits: &ServeLimits,
) -> Outcome {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Failed::new(Exit::Failure, format!("cannot start the runtime: {e}")))?;
    let served = runtime.block_on(async {
        config.session.max_pack_nodes = max_pack_nodes.max(1);
        access.apply(&mut config)?;
        limits.apply(&mut config)?;
        let open_rooms: Vec<String> = config
            .open_rooms
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect();
        let server = syncline_relay::Server::bind(config).await.map_err(|e| {
            let (exit, hint) = match &e {
                syncline_relay::RelayError::Listen { source, .. }
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    (
                        Exit::Failure,
                        " (another process listens there: stop it, or pick another --listen)",
                    )
                }
                syncline_relay::RelayError::Listen { .. }
                | syncline_relay::RelayError::OpenOnNetwork { .. }
                | syncline_relay::RelayError::MetricsOnNetwork(_)
                | syncline_relay::RelayError::NatsWithoutPostgres
                | syncline_relay::RelayError::Bus(
                    syncline_relay::BusError::Prefix(_) | syncline_relay::BusError::Url { .. },
                ) => (Exit::Usage, ""),
                syncline_relay::RelayError::Bus(syncline_relay::BusError::Connect { .. }) => {
                    (Exit::Sync, "")
                }
                _ => (Exit::Storage, ""),
            };
            Failed::new(exit, format!("{e}{hint}"))
        })?;
        let addr = server
            .local_addr()
            .map_err(|e| Failed::new(Exit::Failure, e.to_string()))?;
        tracing::info!(%addr, "syncline relay listening (ws://{addr}/ws)");
        tracing::info!(key = %server.public_key(), "relay key (the root of the tokens it issues)");
        if open_rooms.is_empty() {
            tracing::info!("every room is locked: clients need a token (syncline token issue)");
        } else {
            tracing::warn!(
                open = open_rooms.join(", "),
                "rooms open to anyone who connects; the rest are locked"
            );
        }
        server
            .run(syncline_relay::shutdown_signal())
            .await
            .map_err(|e| Failed::new(Exit::Failure, e.to_string()))
    });
    // A room step still running on the blocking pool is not waited for:
    // everything acknowledged is durable already.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    served
}

/// Runs one transaction on `room`.
fn edit(
    cli: &Cli,
    room: &str,
    f: impl FnOnce(&mut syncline_core::Transaction<'_>) -> Result<(), syncline_core::room::TxnError>,
) -> Outcome {
    let room: Room = open(cli)?.room(room)?;
    let node = room.transact(f)?;
    print(cli, json!({"node": node}), || match &node {
        Some(id) => format!("committed {id}"),
        None => "nothing changed".to_owned(),
    });
    Ok(())
}

/// A blob key as `--blob-key ID=HEX` gives it.
fn parse_blob_key(given: &str) -> Result<syncline_relay::BlobKey, Failed> {
    let bad = || {
        Failed::new(
            Exit::Usage,
            "--blob-key takes ID=HEX: a number from 1, then 64 hex digits (e.g. 1=$(openssl rand -hex 32))",
        )
    };
    let (id, hex) = given.split_once('=').ok_or_else(bad)?;
    let id: u32 = id.trim().parse().ok().filter(|&i| i > 0).ok_or_else(bad)?;
    let key = syncline_core::ids::from_hex::<32>(hex.trim()).ok_or_else(bad)?;
    Ok(syncline_relay::BlobKey { id, key })
}

/// A presence status as `--status` takes it.
fn parse_status(s: &str) -> Result<syncline::PresenceStatus, String> {
    match syncline::PresenceStatus::from_wire(s) {
        Some(syncline::PresenceStatus::Offline) | None => {
            Err("online, away or busy (leave by stopping the command)".to_owned())
        }
        Some(status) => Ok(status),
    }
}

fn import(cli: &Cli, room: &str, file: &std::path::Path) -> Outcome {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| exit::unreadable(file, &e))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Failed::new(Exit::Usage, format!("{} is not JSON: {e}", file.display())))?;
    let value = from_json(&parsed).map_err(|e| Failed::new(Exit::Usage, e))?;
    let imported = open(cli)?.room(room)?.import(&value)?;
    print(
        cli,
        json!({
            "room": room, "entries": imported.entries, "fields": imported.fields,
            "texts": imported.texts, "nodes": imported.nodes,
        }),
        || {
            format!(
                "imported {} entries, {} fields and {} texts into {room}: {}",
                imported.entries,
                imported.fields,
                imported.texts,
                match imported.nodes {
                    0 => "nothing changed".to_owned(),
                    1 => "1 node".to_owned(),
                    n => format!("{n} nodes"),
                }
            )
        },
    );
    Ok(())
}

fn get(cli: &Cli, room: &str, path: &str, field: Option<&str>) -> Outcome {
    let room = open(cli)?.room(room)?;
    match field {
        Some(field) => {
            let value = room.get(path, field)?.ok_or_else(|| {
                Failed::new(Exit::NotFound, format!("{path} has no field {field:?}"))
            })?;
            let j = to_json(&value);
            print(cli, j.clone(), || match &value {
                Value::Str(s) => s.clone(),
                _ => j.to_string(),
            });
        }
        None => {
            let fields = room.fields(path)?;
            let j: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect();
            print(cli, serde_json::Value::Object(j.clone()), || {
                j.iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

fn status(cli: &Cli, room: Option<&str>) -> Outcome {
    let replica = open(cli)?;
    let names = match room {
        Some(r) => vec![r.to_owned()],
        None => replica.stored_rooms()?,
    };
    let mut rows = Vec::new();
    for name in &names {
        let r = replica.room(name)?;
        rows.push(json!({
            "room": name,
            "nodes": r.node_count(),
            "unacknowledged": r.unacknowledged()?,
            "hash": to_hex(&r.state_hash()),
        }));
    }
    print(
        cli,
        json!({"replica": cli.replica, "author": replica.author(), "rooms": rows}),
        || {
            let mut out = format!(
                "replica {} (author {})",
                cli.replica.display(),
                replica.author()
            );
            for r in &rows {
                out.push_str(&format!(
                    "\n  {}: {} nodes, {} not yet acknowledged by a server",
                    r["room"].as_str().unwrap_or(""),
                    r["nodes"],
                    r["unacknowledged"]
                ));
            }
            out
        },
    );
    Ok(())
}
