//! What the SDK's tests share: an in-process relay on a free loopback
//! port, and waiting for a condition.

// Each test file uses what it needs of this.
#![allow(dead_code)]

use std::time::Duration;

use syncline_relay::{Config, Server};

/// Starts a relay on a free loopback port; returns its URL and the runtime
/// keeping it alive.
pub(crate) fn relay(dir: &std::path::Path) -> (String, tokio::runtime::Runtime) {
    relay_with(dir, |_| {})
}

/// [`relay`] with its configuration adjusted by `adjust`.
pub(crate) fn relay_with(
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut Config),
) -> (String, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    adjust(&mut config);
    let server = runtime.block_on(Server::bind(config)).unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    runtime.spawn(server.run(std::future::pending()));
    (url, runtime)
}

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Polls `done` until it holds, failing after `WAIT`.
pub(crate) fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(5));
    }
}
