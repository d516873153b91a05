//! An OCI spec from containerd's bundle, through what the runtime makes of it before anything
//! touches the host: validation, the namespace plan, the cgroup path, the mount options.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::linux::{cgroups, mounts, spec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(s) = spec::parse(text) else {
        return;
    };
    let _ = spec::validate(&s);
    let _ = spec::NsPlan::from_spec(&s);
    if let Some(linux) = s.linux() {
        if let Some(p) = linux.cgroups_path() {
            if let Ok(rel) = cgroups::normalize_path(&p.to_string_lossy(), "fuzz") {
                // Never the root, never outside it.
                assert!(
                    !rel.is_empty() && !rel.split('/').any(|c| c == ".."),
                    "{rel}"
                );
            }
        }
    }
    for m in s.mounts().iter().flatten() {
        if let Some(o) = m.options() {
            let _ = mounts::parse_options(o);
        }
    }
});
