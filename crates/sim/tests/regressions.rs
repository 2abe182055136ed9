//! Seeds that once failed, kept as regression tests, and the replay
//! guarantee: one seed, one trace.

use syncline_sim::{replay_command, run};

/// Each seed found a real bug, fixed since:
/// - 0, 1: a node that arrived again while it still waited for its parents
///   counted as already held, so the relay acknowledged a whole pack whose
///   nodes were only in memory, and lost them in a crash.
/// - 10, 31: a relayed pack was lost while later ones were acknowledged;
///   each acknowledgement restarted the response timer, so the stall was
///   never noticed and the client kept nodes waiting for parents forever.
/// - 58, 91: nodes inserted before a refused node of the same pack were
///   persisted but never relayed to the room's other sessions.
/// - 1720: after a failed write the relay reloaded its room from a store
///   that still served the failed write from its cache, acknowledged those
///   nodes, and lost them in a crash (the relay now makes what it reads
///   back durable before loading: `DurableRoom::load_after_failure`).
/// - 95 (a locked room): two clients created one path concurrently; the
///   relay remembered one creation of the entry and refused the other
///   client's later writes to it as touching an entry not created in their
///   history, while that client, remembering its own, had allowed them.
///   Write authority now accepts any creation in a node's causal past.
/// - 947 (a locked room): a storage failure reloaded a replica's room
///   without its write-authority checks (the admin's revocation then waited
///   forever for a policy it no longer saw); reloads keep them now.
const REGRESSION_SEEDS: [u64; 9] = [0, 1, 10, 31, 58, 91, 95, 947, 1720];

#[test]
fn regression_seeds_pass() {
    for seed in REGRESSION_SEEDS {
        let outcome = run(seed);
        assert!(
            outcome.result.is_ok(),
            "seed {seed}: {:?}\nreplay: {}",
            outcome.result,
            replay_command(seed)
        );
    }
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [3, 1_000_003] {
        let first = run(seed);
        let second = run(seed);
        assert!(
            first.faults.lost + first.faults.duplicated > 0,
            "seed {seed} fired no network fault"
        );
        assert_eq!(
            first.trace_hash, second.trace_hash,
            "seed {seed} replayed differently"
        );
        assert_eq!(first.faults, second.faults);
    }
}

#[test]
fn different_seeds_give_different_traces() {
    assert_ne!(run(5).trace_hash, run(6).trace_hash);
}
