//! `durable-postgres`: commits through [`PgStore`] (what a relay on
//! PostgreSQL does per batch) against the cheapest durable insert of the
//! same bytes with the plain `postgres` client: one prepared `INSERT` per
//! commit in its own implicit transaction (one round trip), one row in a
//! table with no index but its key. Both run against the same server, each
//! round in a fresh database, alternating.

use std::time::Instant;

use anyhow::{Context, Result};
use syncline_postgres::{PgOptions, PgStore};

use crate::{Args, Report, segments};

/// A fresh database on the server at `url`; its URL.
pub(crate) fn fresh(url: &str, tag: &str) -> Result<String> {
    let mut admin = postgres::Client::connect(url, postgres::NoTls)?;
    let name = format!("bench_{tag}_{}", std::process::id());
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))?;
    admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
    let (base, _) = url.rsplit_once('/').context("a URL ends in /DATABASE")?;
    Ok(format!("{base}/{name}"))
}

fn store_round(url: &str, batch: usize, commits: usize) -> Result<f64> {
    let store = PgStore::open(&fresh(url, "store")?, PgOptions::default())?;
    crate::commit_segments(&store, batch, commits)
}

fn raw_round(url: &str, batch: usize, commits: usize) -> Result<f64> {
    let mut client = postgres::Client::connect(&fresh(url, "raw")?, postgres::NoTls)?;
    client.batch_execute(
        "CREATE TABLE segments (room BIGINT NOT NULL, start BIGINT NOT NULL, pack BYTEA NOT NULL, \
         PRIMARY KEY (room, start))",
    )?;
    let insert = client.prepare("INSERT INTO segments (room, start, pack) VALUES (1, $1, $2)")?;
    let segments = segments(batch, commits);
    let start = Instant::now();
    // One prepared statement per commit, committed on its own (no
    // explicit transaction: a round trip each).
    for segment in segments {
        client.execute(&insert, &[&i64::from(segment.start), &&segment.pack[..]])?;
    }
    Ok((commits * batch) as f64 / start.elapsed().as_secs_f64())
}

/// The PostgreSQL server `bench` runs against: `--postgres`, else
/// `SYNCLINE_TEST_POSTGRES`.
pub(crate) fn server_url(args: &Args, bench: &str) -> Result<String> {
    args.postgres
        .clone()
        .or_else(|| std::env::var("SYNCLINE_TEST_POSTGRES").ok())
        .with_context(|| {
            format!(
                "{bench} needs a PostgreSQL server: --postgres URL \
                 (eval \"$(bash scripts/services.sh start DIR)\" sets SYNCLINE_TEST_POSTGRES)"
            )
        })
}

pub(super) fn bench(args: &Args, report: &Report) -> Result<()> {
    let url = server_url(args, "durable-postgres")?;
    let url = url.as_str();
    crate::durable_series(
        args,
        report,
        (
            "durable-postgres",
            "syncline on PostgreSQL nodes/s",
            "raw PostgreSQL inserts nodes/s",
        ),
        |batch, commits| store_round(url, batch, commits),
        |batch, commits| raw_round(url, batch, commits),
    )
}
