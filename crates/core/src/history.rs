//! Each agent's recent samples, in memory: a ring of the samples that changed something
//! (24 bytes each), read back as one point per sampling interval. The sampler sends an
//! unchanged sample only while someone watches, so an idle agent costs one point, not one
//! per interval; a point holds until the next one, which is what reading fills in. A run's
//! end is a point with nothing running, so the gap before a restart reads as such.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state::TreeSample;

/// One sample, as kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryPoint {
    /// Wall-clock time of the sample, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub cpu_percent: f32,
    pub memory_kib: u32,
    pub num_threads: u32,
    pub num_processes: u32,
}

impl HistoryPoint {
    pub fn new(at: SystemTime, sample: &TreeSample) -> HistoryPoint {
        HistoryPoint {
            at_ms: millis(at),
            cpu_percent: sample.cpu_percent as f32,
            memory_kib: u32::try_from(sample.memory_bytes / 1024).unwrap_or(u32::MAX),
            num_threads: sample.num_threads,
            num_processes: sample.num_processes,
        }
    }

    /// The moment a run ended: no process, nothing used.
    pub fn ended(at: SystemTime) -> HistoryPoint {
        HistoryPoint {
            at_ms: millis(at),
            cpu_percent: 0.0,
            memory_kib: 0,
            num_threads: 0,
            num_processes: 0,
        }
    }

    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.at_ms)
    }

    fn same_figures(&self, other: &HistoryPoint) -> bool {
        (
            self.cpu_percent,
            self.memory_kib,
            self.num_threads,
            self.num_processes,
        ) == (
            other.cpu_percent,
            other.memory_kib,
            other.num_threads,
            other.num_processes,
        )
    }
}

pub(crate) fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An agent's kept samples. At most `capacity` changes are kept, which covers the whole
/// window even for an agent whose figures change at every sample.
#[derive(Debug, Default)]
pub(crate) struct History {
    points: VecDeque<HistoryPoint>,
}

impl History {
    pub fn record(&mut self, point: HistoryPoint, capacity: usize) {
        if self
            .points
            .back()
            .is_some_and(|last| last.same_figures(&point))
        {
            return;
        }
        while self.points.len() >= capacity.max(1) {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }

    /// One point per `interval` from `from` on: each kept sample, then the same figures
    /// again at each interval until the next one; the last holds until `until` (now while
    /// the agent runs, else when its run ended).
    pub fn read(
        &self,
        from: SystemTime,
        until: SystemTime,
        interval: Duration,
    ) -> Vec<HistoryPoint> {
        let (from, until) = (millis(from), millis(until));
        let step = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut read = Vec::new();
        for (i, point) in self.points.iter().enumerate() {
            // A repeat closer than half a step to the next sample would be a duplicate of it:
            // rounds take a little longer than the interval.
            let end = match self.points.get(i + 1) {
                Some(next) => next.at_ms.saturating_sub(step / 2),
                None => until.saturating_add(1),
            };
            let mut at = point.at_ms;
            if at < from {
                at += (from - at).div_ceil(step) * step;
            }
            while (at < end || at == point.at_ms) && at <= until {
                read.push(HistoryPoint {
                    at_ms: at,
                    ..*point
                });
                at += step;
            }
        }
        read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(at_ms: u64, cpu: f32) -> HistoryPoint {
        HistoryPoint {
            at_ms,
            cpu_percent: cpu,
            memory_kib: 1024,
            num_threads: 1,
            num_processes: 1,
        }
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn times(points: &[HistoryPoint]) -> Vec<(u64, f32)> {
        points.iter().map(|p| (p.at_ms, p.cpu_percent)).collect()
    }

    #[test]
    fn unchanged_samples_are_kept_once_and_read_back_at_each_interval() {
        let mut history = History::default();
        for (ms, cpu) in [(1000, 5.0), (2010, 5.0), (3020, 5.0), (4030, 50.0)] {
            history.record(point(ms, cpu), 10);
        }
        assert_eq!(history.points.len(), 2);
        let read = history.read(at(0), at(5000), Duration::from_secs(1));
        assert_eq!(
            times(&read),
            vec![(1000, 5.0), (2000, 5.0), (3000, 5.0), (4030, 50.0)],
            "no repeat within half a step of the next sample, none after `until`"
        );
        let read = history.read(at(0), at(6100), Duration::from_secs(1));
        assert_eq!(times(&read).last(), Some(&(6030, 50.0)));
        let ended = history.read(at(0), at(4100), Duration::from_secs(1));
        assert_eq!(
            times(&ended).last(),
            Some(&(4030, 50.0)),
            "not past `until`"
        );
    }

    #[test]
    fn reading_from_a_time_starts_on_the_sample_grid() {
        let mut history = History::default();
        history.record(point(1000, 1.0), 10);
        history.record(point(5000, 2.0), 10);
        let read = history.read(at(2500), at(6000), Duration::from_secs(1));
        assert_eq!(
            times(&read),
            vec![(3000, 1.0), (4000, 1.0), (5000, 2.0), (6000, 2.0)]
        );
        assert!(
            history
                .read(at(7000), at(6500), Duration::from_secs(1))
                .is_empty()
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_changes() {
        let mut history = History::default();
        for i in 0..10u64 {
            history.record(point(i * 1000, i as f32), 3);
        }
        let read = history.read(at(0), at(9000), Duration::from_secs(1));
        assert_eq!(times(&read), vec![(7000, 7.0), (8000, 8.0), (9000, 9.0)]);
        assert!(
            history
                .read(at(0), at(6000), Duration::from_secs(1))
                .is_empty()
        );
    }
}
