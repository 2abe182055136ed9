//! A deterministic simulator of Syncline: one relay and two to eight
//! clients run the real sync sessions ([`syncline_core::proto::session`])
//! and durable rooms ([`syncline_store::DurableRoom`]) on fault-injecting
//! stores, over a simulated network, on a virtual clock. Every run follows
//! from its seed alone, so a failing seed replays exactly.
//!
//! `cargo run --release -p syncline-sim -- --seeds 1000` runs seeds
//! `0..1000`; `--seed N` replays one. See `world` for what a run does and
//! checks.

mod net;
mod world;

pub use net::FaultCounts;
pub use world::{Outcome, Strategies};

/// Runs the simulation for `seed`. A panic inside the code under test is
/// caught and reported as a failure of the seed.
pub fn run(seed: u64) -> Outcome {
    let result = std::panic::catch_unwind(|| world::World::new(seed).run(seed));
    result.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".to_owned());
        Outcome {
            seed,
            trace_hash: [0; 32],
            faults: FaultCounts::default(),
            strategies: Strategies::default(),
            nodes: 0,
            clients: 0,
            opened_from_checkpoint: 0,
            locked: false,
            refused_edits: 0,
            revocations: 0,
            result: Err(format!("panicked: {message}")),
        }
    })
}

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("cargo run --release -p syncline-sim -- --seed {seed}")
}
