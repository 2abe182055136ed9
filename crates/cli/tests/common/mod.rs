//! Shared by the end-to-end tests: a `syncline serve` process and the
//! `syncline` command line, both the built binary.

// Each test binary uses part of this.
#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_syncline");
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A port nothing listens on, for a server to bind. Taken below Linux's
/// ephemeral range (32768 and up), so that no outgoing connection of the
/// tests takes it between now and the server's bind, and never handed out
/// twice by one test binary (its tests run in parallel).
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread test binaries apart; each then counts up.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 2_000) as u16 * 5,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (port - 20_000) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
}

/// A `syncline serve` process.
pub(crate) struct Server {
    pub(crate) child: Option<Child>,
    pub(crate) port: u16,
    /// Where `/metrics` is served without a token (`--metrics-listen`).
    pub(crate) metrics_port: u16,
    pub(crate) data: PathBuf,
    pub(crate) extra: Vec<String>,
}

impl Server {
    pub(crate) fn start(data: &Path, extra: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            port: free_port(),
            metrics_port: free_port(),
            data: data.to_path_buf(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        s.spawn();
        s
    }

    pub(crate) fn spawn(&mut self) {
        let child = Command::new(BIN)
            .args(["serve", "--data"])
            .arg(&self.data)
            .args(
                (!self.extra.iter().any(|a| a == "--listen"))
                    .then(|| ["--listen".to_owned(), format!("127.0.0.1:{}", self.port)])
                    .into_iter()
                    .flatten(),
            )
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            // SYNCLINE_TEST_LOG_DIR=DIR keeps each server's log there
            // (PORT.log), to see why a test failed.
            .stderr(match std::env::var_os("SYNCLINE_TEST_LOG_DIR") {
                Some(dir) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(Path::new(&dir).join(format!("{}.log", self.port)))
                        .unwrap(),
                ),
                None => Stdio::null(),
            })
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.get("/healthz").as_deref() != Some("ok") {
            assert!(Instant::now() < deadline, "the server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// A plain HTTP GET on the main address; the body, if the server
    /// answered.
    pub(crate) fn get(&self, path: &str) -> Option<String> {
        http_get(self.port, path, None).map(|(_, body)| body)
    }

    /// The value of an unlabelled metric (0 if absent), from the metrics
    /// address.
    pub(crate) fn metric(&self, name: &str) -> f64 {
        let text = http_get(self.metrics_port, "/metrics", None)
            .map(|(_, body)| body)
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A long-running `syncline` process whose stdout lines arrive on a
/// channel; killed when dropped.
pub(crate) struct Running {
    pub(crate) child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    pub(crate) fn start(replica: &std::path::Path, args: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .arg("--replica")
            .arg(replica)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// The first line holding `words`, within `wait`.
    pub(crate) fn line_with(&self, words: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(words) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `syncline --replica DIR args...`; returns (exit code, stdout).
pub(crate) fn cli(replica: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("--replica")
        .arg(replica)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

pub(crate) fn ok(replica: &Path, args: &[&str]) -> String {
    let (code, out) = cli(replica, args);
    assert_eq!(code, 0, "syncline {args:?} failed: {out}");
    out
}

/// Runs `syncline --replica DIR args...` with `env` set; returns (exit
/// code, stdout, stderr).
pub(crate) fn run(replica: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--replica")
        .arg(replica)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// A plain HTTP GET of `path` on 127.0.0.1:`port`, with a bearer token if
/// given: the status code and the body, if the server answered.
pub(crate) fn http_get(port: u16, path: &str, bearer: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let auth = bearer.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1)?;
    Some((status, body.trim().to_owned()))
}

/// A fresh database on the test server; `None` (skipped, and said) when
/// none was started outside CI.
pub(crate) fn fresh_database() -> Option<String> {
    let Ok(url) = std::env::var("SYNCLINE_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this with PostgreSQL: start it with scripts/services.sh"
        );
        eprintln!("no SYNCLINE_TEST_POSTGRES: skipped");
        return None;
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "fleet_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let created = Command::new("psql")
        .arg(&url)
        .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
        .status()
        .unwrap();
    assert!(created.success(), "psql could not create {name}");
    let (base, _) = url.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

/// The test's NATS server (`scripts/services.sh start` runs it beside
/// PostgreSQL).
pub(crate) fn nats_url() -> String {
    std::env::var("SYNCLINE_TEST_NATS")
        .expect("scripts/services.sh starts NATS beside PostgreSQL: SYNCLINE_TEST_NATS")
}

/// The author key of `replica` (made on first use).
pub(crate) fn author(replica: &Path) -> String {
    let out = ok(replica, &["--json", "init"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["author"].as_str().unwrap().to_owned()
}

/// `syncline token issue --subject SUBJECT EXTRA...`, signed with the key
/// of the relay whose data directory is `data`.
pub(crate) fn issue_token(data: &Path, subject: &str, extra: &[&str]) -> String {
    let data = data.to_str().unwrap().to_owned();
    let mut args = vec!["token", "issue", "--data", &data, "--subject", subject];
    args.extend_from_slice(extra);
    ok(Path::new("/nonexistent-replica"), &args)
}
