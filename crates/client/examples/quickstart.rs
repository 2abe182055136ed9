//! The SDK end to end: a relay (in this process, on a free loopback port),
//! two replicas that edit offline, sync, see each other's changes live, and
//! agree. Run it with `cargo run -p syncline --example quickstart`.

// An example prints what it does.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use syncline::{Origin, Replica};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;

    // A relay: `syncline serve` runs the same server.
    let runtime = tokio::runtime::Runtime::new()?;
    let config = syncline_relay::Config {
        data_dir: dir.path().join("server"),
        listen: "127.0.0.1:0".parse()?,
        ..syncline_relay::Config::default()
    };
    let server = runtime.block_on(syncline_relay::Server::bind(config))?;
    let url = format!("ws://{}/ws", server.local_addr()?);
    runtime.spawn(server.run(std::future::pending()));

    // Two replicas, each a directory; edits are durable at once, offline.
    let alice = Replica::open(dir.path().join("alice"))?;
    let bob = Replica::open(dir.path().join("bob"))?;
    alice.room("notes")?.transact(|tx| {
        tx.set("/todo/1", "title", "buy milk".into())?;
        tx.text_insert("/todo/1/details", 0, "two litres")
    })?;
    bob.room("notes")?
        .transact(|tx| tx.set("/todo/2", "title", "call mum".into()))?;

    // Sync both; flush returns once the server holds every local edit.
    let a = alice.connect(&[url.as_str()], &["notes"])?;
    let b = bob.connect(&[url.as_str()], &["notes"])?;
    a.flush(Duration::from_secs(10))?;
    b.flush(Duration::from_secs(10))?;

    // Live: bob sees alice's next edit as a remote change, with the
    // field's old and new value.
    let todo = bob.room("notes")?.subscribe("/todo/**")?;
    alice
        .room("notes")?
        .transact(|tx| tx.set("/todo/1", "done", true.into()))?;
    let change = loop {
        let c = todo.recv_timeout(Duration::from_secs(10))?;
        if c.origin == Origin::Remote && !c.fields.is_empty() {
            break c;
        }
    };
    for field in &change.fields {
        println!(
            "bob saw {} {} change: {:?} -> {:?}",
            field.path, field.field, field.old, field.new
        );
    }

    // Both hold both todos and the same state.
    let notes = bob.room("notes")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while notes.node_count() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let titles: Vec<String> = notes
        .list("/todo")?
        .iter()
        .filter_map(|e| notes.get(&e.path, "title").ok().flatten())
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect();
    println!("bob's todos: {}", titles.join(", "));
    let same = alice.room("notes")?.state_hash() == notes.state_hash();
    println!("alice and bob agree: {same}");
    if !same {
        return Err("the replicas did not converge".into());
    }
    Ok(())
}
