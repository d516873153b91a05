//! Runtime types in the agent API's messages (`protocols::agent`), both ways: the agent
//! encodes what it measured in the guest, the host decodes it, with one mapping.

use protocols::agent::{CgroupStats, IoStat};

use crate::linux::cgroups::Stats;

impl Stats {
    /// The agent's Stats answer.
    pub fn into_proto(self) -> CgroupStats {
        CgroupStats {
            memory_usage: self.memory_usage,
            memory_max_usage: self.memory_max_usage,
            memory_limit: self.memory_limit,
            memory_failcnt: self.memory_failcnt,
            swap_usage: self.swap_usage,
            swap_limit: self.swap_limit,
            memory_stat: self.memory_stat.into_iter().collect(),
            cpu_usage_ns: self.cpu_usage_ns,
            cpu_user_ns: self.cpu_user_ns,
            cpu_system_ns: self.cpu_system_ns,
            cpu_percpu_ns: self.cpu_percpu_ns,
            cpu_nr_periods: self.cpu_nr_periods,
            cpu_nr_throttled: self.cpu_nr_throttled,
            cpu_throttled_ns: self.cpu_throttled_ns,
            pids_current: self.pids_current,
            pids_limit: self.pids_limit,
            io: self
                .io_bytes
                .into_iter()
                .map(|(major, minor, op, value)| IoStat {
                    major,
                    minor,
                    op,
                    value,
                    ..Default::default()
                })
                .collect(),
            oom_kills: self.oom_kills,
            memory_events: self.memory_events.into_iter().collect(),
            ..Default::default()
        }
    }

    /// The host's reading of that answer.
    pub fn from_proto(p: &CgroupStats) -> Stats {
        Stats {
            memory_usage: p.memory_usage,
            memory_max_usage: p.memory_max_usage,
            memory_limit: p.memory_limit,
            memory_failcnt: p.memory_failcnt,
            swap_usage: p.swap_usage,
            swap_limit: p.swap_limit,
            memory_stat: p.memory_stat.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            cpu_usage_ns: p.cpu_usage_ns,
            cpu_user_ns: p.cpu_user_ns,
            cpu_system_ns: p.cpu_system_ns,
            cpu_percpu_ns: p.cpu_percpu_ns.clone(),
            cpu_nr_periods: p.cpu_nr_periods,
            cpu_nr_throttled: p.cpu_nr_throttled,
            cpu_throttled_ns: p.cpu_throttled_ns,
            pids_current: p.pids_current,
            pids_limit: p.pids_limit,
            io_bytes: p
                .io
                .iter()
                .map(|i| (i.major, i.minor, i.op.clone(), i.value))
                .collect(),
            oom_kills: p.oom_kills,
            memory_events: p
                .memory_events
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_round_trip() {
        let mut s = Stats {
            memory_usage: 1,
            memory_max_usage: 2,
            memory_limit: u64::MAX,
            memory_failcnt: 3,
            swap_usage: 4,
            swap_limit: 5,
            cpu_usage_ns: 6,
            cpu_user_ns: 7,
            cpu_system_ns: 8,
            cpu_percpu_ns: vec![9, 10],
            cpu_nr_periods: 11,
            cpu_nr_throttled: 12,
            cpu_throttled_ns: 13,
            pids_current: 14,
            pids_limit: 15,
            io_bytes: vec![(8, 0, "Read".into(), 16)],
            oom_kills: 17,
            ..Default::default()
        };
        s.memory_stat.insert("anon".into(), 18);
        s.memory_events.insert("oom_kill".into(), 19);
        let back = Stats::from_proto(&s.clone().into_proto());
        assert_eq!(format!("{back:?}"), format!("{s:?}"));
    }
}
