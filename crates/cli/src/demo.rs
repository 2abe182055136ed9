//! `syncline demo`: a relay and three replicas in one process edit one
//! room concurrently while offline, reconnect, and converge.

use std::time::Duration;

use serde_json::json;
use syncline::Replica;
use syncline_core::ids::to_hex;

use crate::json::to_json;
use crate::{Cli, Exit, Failed, Outcome, print};

/// One replica's offline edit.
type Edit = fn(&Replica) -> Result<(), syncline::Error>;

pub(crate) fn run(cli: &Cli) -> Outcome {
    let base = std::env::temp_dir().join(format!("syncline-demo-{}", std::process::id()));
    let result = demo(cli, &base);
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn fail(e: impl std::fmt::Display) -> Failed {
    Failed::new(Exit::Failure, e.to_string())
}

fn demo(cli: &Cli, base: &std::path::Path) -> Outcome {
    let runtime = tokio::runtime::Runtime::new().map_err(fail)?;
    let config = syncline_relay::Config {
        data_dir: base.join("server"),
        listen: "127.0.0.1:0".parse().map_err(fail)?,
        ..syncline_relay::Config::default()
    };
    let server = runtime
        .block_on(syncline_relay::Server::bind(config))
        .map_err(fail)?;
    let url = format!("ws://{}/ws", server.local_addr().map_err(fail)?);
    runtime.spawn(server.run(std::future::pending()));
    let say = |line: &str| {
        if !cli.json {
            println!("{line}");
        }
    };
    say(&format!("relay listening at {url}"));

    let names = ["ada", "bo", "cy"];
    let replicas: Vec<Replica> = names
        .iter()
        .map(|n| Replica::open(base.join(n)))
        .collect::<Result<_, _>>()?;
    // A shared starting point, synced once.
    let first = replicas[0].room("plan")?;
    first.transact(|tx| {
        tx.set("/trip", "title", "Lisbon".into())?;
        tx.set("/trip/day1", "todo", "museum".into())?;
        tx.set("/trip/day2", "todo", "beach".into())?;
        tx.text_insert("/trip/notes", 0, "pack light")
    })?;
    for r in &replicas {
        r.connect(&[url.as_str()], &["plan"])?
            .flush(Duration::from_secs(10))?;
    }
    for r in &replicas {
        r.connect(&[url.as_str()], &["plan"])?
            .flush(Duration::from_secs(10))?;
    }
    say("three replicas share /trip; now each edits it offline:");

    let edits: [(&str, Edit); 3] = [
        ("ada sets the title and moves day2 to day3", |r| {
            r.room("plan")?.transact(|tx| {
                tx.set("/trip", "title", "Lisbon & Porto".into())?;
                tx.mv("/trip/day2", "/trip/day3")?;
                tx.text_insert("/trip/notes", 0, "ADA: ")
            })?;
            Ok(())
        }),
        ("bo sets the title too and deletes day1", |r| {
            r.room("plan")?.transact(|tx| {
                tx.set("/trip", "title", "Porto".into())?;
                tx.delete("/trip/day1")?;
                tx.text_insert("/trip/notes", 10, " (bo agrees)")
            })?;
            Ok(())
        }),
        ("cy edits day2 and the notes", |r| {
            r.room("plan")?.transact(|tx| {
                tx.set("/trip/day2", "todo", "surf lesson".into())?;
                tx.text_insert("/trip/notes", 4, " really")
            })?;
            Ok(())
        }),
    ];
    for ((what, f), r) in edits.iter().zip(&replicas) {
        f(r)?;
        say(&format!("  {what}"));
    }
    say("reconnecting...");
    let syncs: Vec<_> = replicas
        .iter()
        .map(|r| r.connect(&[url.as_str()], &["plan"]))
        .collect::<Result<_, _>>()?;
    for s in &syncs {
        s.flush(Duration::from_secs(10))?;
    }
    // The shared start and one offline edit per replica.
    let total = 1 + replicas.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| {
        r.room("plan")
            .map_or(true, |room| room.node_count() < total)
    }) {
        if std::time::Instant::now() > deadline {
            return Err(Failed::new(
                Exit::Sync,
                "the replicas did not receive each other's edits in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rows = Vec::new();
    for (n, r) in names.iter().zip(&replicas) {
        let room = r.room("plan")?;
        rows.push(
            json!({"replica": n, "hash": to_hex(&room.state_hash()), "nodes": room.node_count()}),
        );
    }
    let converged = rows.windows(2).all(|w| w[0]["hash"] == w[1]["hash"]);
    let state = to_json(&replicas[0].room("plan")?.export());
    print(
        cli,
        json!({"replicas": rows, "converged": converged, "state": state}),
        || {
            let mut out = String::new();
            for r in &rows {
                out.push_str(&format!(
                    "{:>4}: hash {}\n",
                    r["replica"].as_str().unwrap_or(""),
                    r["hash"].as_str().unwrap_or("")
                ));
            }
            let room = replicas[0].room("plan").ok();
            let title = room
                .as_ref()
                .and_then(|r| r.get("/trip", "title").ok().flatten())
                .map_or(serde_json::Value::Null, |v| to_json(&v));
            let notes = room
                .as_ref()
                .and_then(|r| r.text("/trip/notes").ok())
                .unwrap_or_default();
            let conflicts = room
                .as_ref()
                .and_then(|r| r.conflicts("/").ok())
                .map_or(0, |c| c.len());
            let days: Vec<String> = room
                .as_ref()
                .and_then(|r| r.list("/trip").ok())
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.name)
                .collect();
            out.push_str(&format!("title: {title} (concurrent writes: one wins, the other is kept as a conflict; {conflicts} conflicts in all)\n"));
            out.push_str(&format!("/trip now holds: {} (day2 moved to day3, day1 deleted, cy's day2 edit kept on the moved entry)\n", days.join(", ")));
            out.push_str(&format!("notes: {notes:?} (all three text edits merged)\n"));
            out.push_str(if converged {
                "converged: all three replicas are identical"
            } else {
                "NOT converged"
            });
            out
        },
    );
    drop(syncs);
    if converged {
        Ok(())
    } else {
        Err(Failed::new(Exit::Failure, "the replicas did not converge"))
    }
}
