//! The relay unloads a room nobody uses and loads it again on demand (its
//! own test binary: the metrics it reads are process-wide).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use syncline::Replica;
use syncline_relay::{Config, Server};

fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_rooms_unload_and_load_again_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = Config {
        data_dir: dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        room_idle: Duration::from_millis(200),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    let server = runtime.block_on(Server::bind(config)).unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let addr = server.metrics_addr().unwrap();
    runtime.spawn(server.run(std::future::pending()));

    let a = Replica::open(dir.path().join("a")).unwrap();
    a.room("r")
        .unwrap()
        .transact(|tx| tx.set("/x", "v", 7i64.into()))
        .unwrap();
    let sync = a.connect(&[url.as_str()], &["r"]).unwrap();
    sync.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(metric(addr, "syncline_rooms_loaded"), Some(1.0));
    drop(sync);
    wait_for(|| metric(addr, "syncline_rooms_loaded") == Some(0.0));

    // Loaded again from disk for the next session.
    let b = Replica::open(dir.path().join("b")).unwrap();
    let sync = b.connect(&[url.as_str()], &["r"]).unwrap();
    sync.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(
        b.room("r").unwrap().get("/x", "v").unwrap(),
        Some(7i64.into())
    );
    assert_eq!(metric(addr, "syncline_rooms_loaded"), Some(1.0));
}
