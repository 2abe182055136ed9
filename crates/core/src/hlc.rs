//! Hybrid logical clock: the timestamp of last-writer-wins rules.
//!
//! Wall time is passed in by the caller (the core never reads the clock). The
//! clock never runs backwards and orders a local event after every remote
//! event it has observed, even when the wall clock lags.

/// A timestamp: wall milliseconds since the Unix epoch, then a counter that
/// orders events within one millisecond.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Events within the same millisecond.
    pub counter: u32,
}

/// The clock of one replica.
#[derive(Clone, Copy, Debug, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a new local event at wall time `now_ms`, strictly
    /// greater than everything issued or observed before.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else if self.last.counter == u32::MAX {
            // Four billion events in one millisecond: borrow the next one.
            Hlc {
                wall_ms: self.last.wall_ms + 1,
                counter: 0,
            }
        } else {
            Hlc {
                wall_ms: self.last.wall_ms,
                counter: self.last.counter + 1,
            }
        };
        self.last
    }

    /// Records a remote timestamp so later local events order after it
    /// (validated nodes carry at most `MAX_HLC_WALL_MS`, so ticking after
    /// one cannot overflow).
    pub fn observe(&mut self, remote: Hlc) {
        self.last = self.last.max(remote);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing_even_when_time_goes_back() {
        let mut c = HlcClock::new();
        let a = c.tick(100);
        let b = c.tick(90);
        let d = c.tick(100);
        assert!(a < b && b < d);
        assert_eq!(
            c.tick(200),
            Hlc {
                wall_ms: 200,
                counter: 0
            }
        );
    }

    #[test]
    fn observing_orders_later_events_after_remote_ones() {
        let mut c = HlcClock::new();
        c.observe(Hlc {
            wall_ms: 1_000,
            counter: 5,
        });
        assert_eq!(
            c.tick(10),
            Hlc {
                wall_ms: 1_000,
                counter: 6
            }
        );
    }
}
