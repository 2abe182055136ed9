//! `syncline-sim`: runs the deterministic simulator over many seeds and
//! prints one summary line (seeds run, faults of each kind that fired), or
//! the replay command of every failing seed.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use syncline_sim::{FaultCounts, Outcome, Strategies, replay_command, run};

/// Runs the Syncline fault simulator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// How many seeds to run, starting at `--start`.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replays this one seed (twice, comparing trace hashes) and prints
    /// what it did.
    #[arg(long, conflicts_with_all = ["seeds", "start"])]
    seed: Option<u64>,
    /// Worker threads (default: the available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also replays every seed and compares trace hashes.
    #[arg(long)]
    replay_check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (first, count, replay) = match args.seed {
        Some(seed) => (seed, 1, true),
        None => (args.start, args.seeds, args.replay_check),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = AtomicU64::new(first);
    let outcomes: Mutex<Vec<(Outcome, Option<[u8; 32]>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + count {
                        break;
                    }
                    let outcome = run(seed);
                    let again = replay.then(|| run(seed).trace_hash);
                    outcomes
                        .lock()
                        .expect("no worker panics holding the lock")
                        .push((outcome, again));
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().expect("workers finished");
    outcomes.sort_by_key(|(o, _)| o.seed);
    report(&outcomes, args.seed.is_some())
}

fn report(outcomes: &[(Outcome, Option<[u8; 32]>)], verbose: bool) -> std::process::ExitCode {
    let mut out = std::io::stdout().lock();
    let mut totals = FaultCounts::default();
    let mut strategies = Strategies::default();
    let mut failed = 0;
    let mut nodes = 0;
    let mut from_checkpoint = 0;
    let (mut locked, mut refused, mut revoked) = (0, 0, 0);
    for (o, again) in outcomes {
        from_checkpoint += o.opened_from_checkpoint;
        locked += u64::from(o.locked);
        refused += o.refused_edits;
        revoked += o.revocations;
        totals.add(&o.faults);
        strategies.add(&o.strategies);
        nodes += o.nodes;
        let mismatch = again.is_some_and(|h| h != o.trace_hash);
        if verbose {
            let _ = writeln!(
                out,
                "seed {}: {} clients, {} nodes, trace {}, faults: {}",
                o.seed,
                o.clients,
                o.nodes,
                hex(&o.trace_hash),
                o.faults
            );
        }
        let failure = match (&o.result, mismatch) {
            (Err(why), _) => Some(why.as_str()),
            (Ok(()), true) => Some("a replay gave a different trace hash (nondeterminism)"),
            (Ok(()), false) => None,
        };
        if let Some(why) = failure {
            failed += 1;
            let _ = writeln!(
                out,
                "seed {} FAILED: {why}\n  replay: {}",
                o.seed,
                replay_command(o.seed)
            );
        }
    }
    let _ = writeln!(
        out,
        "syncline-sim: {} seeds, {} passed, {} failed; {} nodes in all; \
         handshakes by strategy: heads {}, ibf {}, mst {}; restarts opened from a \
         checkpoint: {}; locked rooms: {} ({} edits refused, {} revocations); faults fired: {}",
        outcomes.len(),
        outcomes.len() - failed,
        failed,
        nodes,
        strategies.heads,
        strategies.ibf,
        strategies.mst,
        from_checkpoint,
        locked,
        refused,
        revoked,
        totals
    );
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}
