//! cgroup statistics in containerd's metrics types (v1 on v1 hosts, v2 on v2 hosts).

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use runtime::linux::cgroups::{Mode, Stats};

use crate::error::{Result, ShimError};

pub const V1_TYPE: &str = "io.containerd.cgroups.v1.Metrics";
pub const V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_any(mode: Mode, s: &Stats) -> Result<Any> {
    let (type_url, value) = match mode {
        Mode::V1 => (V1_TYPE, v1_metrics(s).write_to_bytes()),
        Mode::V2 => (V2_TYPE, v2_metrics(s).write_to_bytes()),
    };
    Ok(Any {
        type_url: type_url.into(),
        value: value.map_err(|e| ShimError::failed("encode metrics", e))?,
        ..Default::default()
    })
}

pub fn v1_metrics(s: &Stats) -> v1::Metrics {
    let m = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    let memory = v1::MemoryStat {
        cache: m("cache"),
        rss: m("rss"),
        rss_huge: m("rss_huge"),
        mapped_file: m("mapped_file"),
        dirty: m("dirty"),
        writeback: m("writeback"),
        pg_pg_in: m("pgpgin"),
        pg_pg_out: m("pgpgout"),
        pg_fault: m("pgfault"),
        pg_maj_fault: m("pgmajfault"),
        inactive_anon: m("inactive_anon"),
        active_anon: m("active_anon"),
        inactive_file: m("inactive_file"),
        active_file: m("active_file"),
        unevictable: m("unevictable"),
        hierarchical_memory_limit: m("hierarchical_memory_limit"),
        hierarchical_swap_limit: m("hierarchical_memsw_limit"),
        total_cache: m("total_cache"),
        total_rss: m("total_rss"),
        total_rss_huge: m("total_rss_huge"),
        total_mapped_file: m("total_mapped_file"),
        total_dirty: m("total_dirty"),
        total_writeback: m("total_writeback"),
        total_pg_pg_in: m("total_pgpgin"),
        total_pg_pg_out: m("total_pgpgout"),
        total_pg_fault: m("total_pgfault"),
        total_pg_maj_fault: m("total_pgmajfault"),
        total_inactive_anon: m("total_inactive_anon"),
        total_active_anon: m("total_active_anon"),
        total_inactive_file: m("total_inactive_file"),
        total_active_file: m("total_active_file"),
        total_unevictable: m("total_unevictable"),
        usage: MessageField::some(v1::MemoryEntry {
            limit: s.memory_limit,
            usage: s.memory_usage,
            max: s.memory_max_usage,
            failcnt: s.memory_failcnt,
            ..Default::default()
        }),
        swap: MessageField::some(v1::MemoryEntry {
            limit: s.swap_limit,
            usage: s.swap_usage,
            ..Default::default()
        }),
        ..Default::default()
    };
    v1::Metrics {
        pids: MessageField::some(v1::PidsStat {
            current: s.pids_current,
            limit: if s.pids_limit == u64::MAX {
                0
            } else {
                s.pids_limit
            },
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: s.cpu_usage_ns,
                kernel: s.cpu_system_ns,
                user: s.cpu_user_ns,
                per_cpu: s.cpu_percpu_ns.clone(),
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                periods: s.cpu_nr_periods,
                throttled_periods: s.cpu_nr_throttled,
                throttled_time: s.cpu_throttled_ns,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(memory),
        blkio: MessageField::some(v1::BlkIOStat {
            io_service_bytes_recursive: s
                .io_bytes
                .iter()
                .map(|(ma, mi, op, v)| v1::BlkIOEntry {
                    op: op.clone(),
                    major: *ma,
                    minor: *mi,
                    value: *v,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        memory_oom_control: MessageField::some(v1::MemoryOomControl {
            oom_kill: s.oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn v2_metrics(s: &Stats) -> v2::Metrics {
    let m = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    let e = |k: &str| s.memory_events.get(k).copied().unwrap_or(0);
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: if s.pids_limit == u64::MAX {
                0
            } else {
                s.pids_limit
            },
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_ns / 1000,
            user_usec: s.cpu_user_ns / 1000,
            system_usec: s.cpu_system_ns / 1000,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_ns / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: m("anon"),
            file: m("file"),
            kernel_stack: m("kernel_stack"),
            slab: m("slab"),
            sock: m("sock"),
            shmem: m("shmem"),
            file_mapped: m("file_mapped"),
            file_dirty: m("file_dirty"),
            file_writeback: m("file_writeback"),
            anon_thp: m("anon_thp"),
            inactive_anon: m("inactive_anon"),
            active_anon: m("active_anon"),
            inactive_file: m("inactive_file"),
            active_file: m("active_file"),
            unevictable: m("unevictable"),
            slab_reclaimable: m("slab_reclaimable"),
            slab_unreclaimable: m("slab_unreclaimable"),
            pgfault: m("pgfault"),
            pgmajfault: m("pgmajfault"),
            usage: s.memory_usage,
            usage_limit: if s.memory_limit == u64::MAX {
                0
            } else {
                s.memory_limit
            },
            swap_usage: s.swap_usage,
            swap_limit: if s.swap_limit == u64::MAX {
                0
            } else {
                s.swap_limit
            },
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            low: e("low"),
            high: e("high"),
            max: e("max"),
            oom: e("oom"),
            oom_kill: e("oom_kill"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_encode() {
        let mut s = Stats {
            memory_usage: 100,
            memory_limit: 200,
            cpu_usage_ns: 5_000,
            pids_current: 2,
            pids_limit: u64::MAX,
            ..Default::default()
        };
        s.memory_stat.insert("cache".into(), 7);
        s.memory_events.insert("oom_kill".into(), 1);
        let a = to_any(Mode::V1, &s).unwrap();
        assert_eq!(a.type_url, V1_TYPE);
        let back = v1::Metrics::parse_from_bytes(&a.value).unwrap();
        assert_eq!(back.memory.usage.usage, 100);
        assert_eq!(back.memory.cache, 7);
        assert_eq!(back.pids.limit, 0);
        let a = to_any(Mode::V2, &s).unwrap();
        assert_eq!(a.type_url, V2_TYPE);
        let back = v2::Metrics::parse_from_bytes(&a.value).unwrap();
        assert_eq!(back.cpu.usage_usec, 5);
        assert_eq!(back.memory_events.oom_kill, 1);
    }
}
