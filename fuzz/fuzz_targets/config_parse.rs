//! The Janus config file, as the shim and `janus check` read it: any text either parses into a
//! config that passed the rules or is an error naming the file; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/janus/fuzz.toml");
    match janus_config::Config::parse(text, path) {
        Ok(c) => {
            // What parsed passed the rules: a VM config a VM can have.
            assert!(c.vm.vcpus.is_none_or(|v| v >= 1));
            let rt = janus_config::RuntimeName::JanusVm;
            let _ = janus_config::decide(rt, Some(path), c.mode);
        }
        Err(e) => assert!(e.to_string().contains("/etc/janus/fuzz.toml")),
    }
});
