//! The simulated network between the relay and its clients: every frame
//! gets a delay, and while faults are on it may be lost, duplicated,
//! reordered past frames sent before it, or cut by a partition (each
//! direction of each client's link separately, so partitions can be
//! asymmetric).
//!
//! Without faults a link is FIFO, as a WebSocket or QUIC stream is: a frame
//! never arrives before one sent earlier on the same connection.

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Which way a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Direction {
    ToRelay,
    ToClient,
}

/// How badly the network behaves while faults are on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weather {
    pub(crate) loss: f64,
    pub(crate) duplication: f64,
    pub(crate) reorder: f64,
    pub(crate) min_delay_ms: u64,
    pub(crate) max_delay_ms: u64,
}

/// How many faults of each kind fired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Frames lost.
    pub lost: u64,
    /// Frames delivered twice.
    pub duplicated: u64,
    /// Frames delivered before a frame sent earlier on their connection.
    pub reordered: u64,
    /// Frames cut by a partition.
    pub partitioned: u64,
    /// Partitions started (symmetric or one-way).
    pub partitions: u64,
    /// Client crashes (unsynced writes dropped).
    pub client_crashes: u64,
    /// Relay crashes.
    pub relay_crashes: u64,
    /// Injected storage write failures.
    pub write_failures: u64,
    /// Long offline stretches of a client.
    pub offline: u64,
    /// Connections the relay closed as lagging (too much in flight).
    pub lagging: u64,
}

impl FaultCounts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &FaultCounts) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.partitioned += other.partitioned;
        self.partitions += other.partitions;
        self.client_crashes += other.client_crashes;
        self.relay_crashes += other.relay_crashes;
        self.write_failures += other.write_failures;
        self.offline += other.offline;
        self.lagging += other.lagging;
    }
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost {}, duplicated {}, reordered {}, partitioned {} (in {} partitions), \
             client crashes {}, relay crashes {}, write failures {}, offline stretches {}, \
             lagging closes {}",
            self.lost,
            self.duplicated,
            self.reordered,
            self.partitioned,
            self.partitions,
            self.client_crashes,
            self.relay_crashes,
            self.write_failures,
            self.offline,
            self.lagging
        )
    }
}

/// The links and their state.
#[derive(Debug)]
pub(crate) struct Network {
    weather: Weather,
    faults_on: bool,
    /// Per client: (to relay cut, to client cut).
    cuts: Vec<(bool, bool)>,
    /// Latest scheduled arrival per (connection, direction), for FIFO.
    last_arrival: BTreeMap<(u64, Direction), u64>,
}

impl Network {
    pub(crate) fn new(weather: Weather, clients: usize) -> Network {
        Network {
            weather,
            faults_on: true,
            cuts: vec![(false, false); clients],
            last_arrival: BTreeMap::new(),
        }
    }

    /// Ends every fault: no more loss, duplication, reordering or cuts.
    pub(crate) fn heal(&mut self) {
        self.faults_on = false;
        self.cuts.iter_mut().for_each(|c| *c = (false, false));
    }

    /// Cuts (or restores) each direction of one client's link.
    pub(crate) fn set_cut(&mut self, client: usize, to_relay: bool, to_client: bool) {
        if self.faults_on {
            self.cuts[client] = (to_relay, to_client);
        }
    }

    /// Whether either direction of a client's link is cut (a connection
    /// attempt then fails).
    pub(crate) fn is_cut(&self, client: usize) -> bool {
        let (a, b) = self.cuts[client];
        a || b
    }

    /// Forgets a closed connection.
    pub(crate) fn forget(&mut self, conn: u64) {
        self.last_arrival.remove(&(conn, Direction::ToRelay));
        self.last_arrival.remove(&(conn, Direction::ToClient));
    }

    /// A delay for a control event (a connection reset noticed, say).
    pub(crate) fn delay(&self, rng: &mut ChaCha8Rng) -> u64 {
        rng.random_range(self.weather.min_delay_ms..=self.weather.max_delay_ms)
    }

    /// The arrival times of one frame sent at `now` (none if lost, two if
    /// duplicated).
    pub(crate) fn send(
        &mut self,
        now: u64,
        client: usize,
        conn: u64,
        dir: Direction,
        rng: &mut ChaCha8Rng,
        faults: &mut FaultCounts,
    ) -> Vec<u64> {
        let cut = match dir {
            Direction::ToRelay => self.cuts[client].0,
            Direction::ToClient => self.cuts[client].1,
        };
        if cut {
            faults.partitioned += 1;
            return Vec::new();
        }
        if self.faults_on && rng.random_bool(self.weather.loss) {
            faults.lost += 1;
            return Vec::new();
        }
        let copies = if self.faults_on && rng.random_bool(self.weather.duplication) {
            faults.duplicated += 1;
            2
        } else {
            1
        };
        let (lo, hi) = (self.weather.min_delay_ms, self.weather.max_delay_ms);
        let reorder_p = if self.faults_on {
            self.weather.reorder
        } else {
            0.0
        };
        let last = self.last_arrival.entry((conn, dir)).or_insert(0);
        (0..copies)
            .map(|_| {
                let at = now + rng.random_range(lo..=hi);
                if at < *last && rng.random_bool(reorder_p) {
                    faults.reordered += 1;
                    return at;
                }
                *last = (*last).max(at);
                *last
            })
            .collect()
    }
}
