//! The runtime options containerd hands the shim with a task's Create (an `Any` holding
//! `runtimeoptions.v1.Options`, or another runtime's options): decoded by the shim's own
//! protobuf wire reader (shim::options).
//!
//! Input: one byte choosing the type URL (the Janus one, or another runtime's), then the
//! message bytes.
#![no_main]

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use libfuzzer_sys::fuzz_target;
use shim::options;

fuzz_target!(|data: &[u8]| {
    let Some((&which, value)) = data.split_first() else {
        return;
    };
    let type_url = match which % 3 {
        0 => "runtimeoptions.v1.Options",
        1 => "type.googleapis.com/runtimeoptions.v1.Options",
        _ => "containerd.runc.v1.Options",
    };
    let any = Any {
        type_url: type_url.into(),
        value: value.to_vec(),
        ..Default::default()
    };
    match options::decode(&any) {
        Ok(Some(o)) => assert_eq!(options::decode_bytes(value), Ok(o)),
        Ok(None) => assert!(!type_url.ends_with("runtimeoptions.v1.Options")),
        Err(_) => assert!(options::decode_bytes(value).is_err()),
    }
});
