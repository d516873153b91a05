//! A request to the in-guest agent as the host could send it: the ttrpc payload decoded as
//! the request type (protobuf), then the agent's own checks and plan for it
//! (vm_agent::requests, which the service runs before it spawns, mounts or configures
//! anything): CreateContainer with any OCI spec, storages and stdio; ExecProcess with any
//! process JSON; SignalProcess; UpdateContainer's resources; CreateSandbox's storages;
//! UpdateInterface and AddRoutes' addresses; ForwardPort.
//!
//! Input: one byte choosing the request type, then the request's protobuf bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use protocols::agent::*;
use vm_agent::requests;

fuzz_target!(|data: &[u8]| {
    let Some((&which, msg)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            let Ok(req) = CreateContainerRequest::parse_from_bytes(msg) else {
                return;
            };
            if let Ok(plan) = requests::create_plan(&req) {
                // What create goes on with: an id that is a path component, a rootfs and
                // a cgroup inside the guest's.
                assert!(!plan.id.is_empty() && !plan.id.contains('/'));
                assert!(plan.root.is_absolute());
                assert!(
                    !plan.cgroup.is_empty() && !plan.cgroup.split('/').any(|c| c == ".."),
                    "{}",
                    plan.cgroup
                );
                assert_eq!(plan.terminal, plan.stdio.terminal);
            }
        }
        1 => {
            let Ok(req) = ExecProcessRequest::parse_from_bytes(msg) else {
                return;
            };
            if let Ok(plan) = requests::exec_plan(&req) {
                assert_eq!(plan.terminal, plan.stdio.terminal);
            }
        }
        2 => {
            let Ok(req) = SignalRequest::parse_from_bytes(msg) else {
                return;
            };
            if requests::check_signal(req.signal).is_ok() {
                assert!((1..=64).contains(&req.signal));
            }
        }
        3 => {
            let Ok(req) = UpdateRequest::parse_from_bytes(msg) else {
                return;
            };
            let _ = requests::parse_resources(&req.linux_resources);
        }
        4 => {
            let Ok(req) = CreateSandboxRequest::parse_from_bytes(msg) else {
                return;
            };
            for s in &req.storages {
                if let Ok((mp, _, _)) = requests::storage_plan(s) {
                    assert!(mp.is_absolute());
                }
            }
        }
        5 => {
            let Ok(req) = Interface::parse_from_bytes(msg) else {
                return;
            };
            let _ = requests::interface_addresses(&req);
        }
        6 => {
            let Ok(req) = Routes::parse_from_bytes(msg) else {
                return;
            };
            for r in &req.routes {
                if let Ok((ip, n)) = requests::parse_cidr(&r.destination) {
                    assert!(n <= if ip.is_ipv4() { 32 } else { 128 });
                }
            }
        }
        _ => {
            let Ok(req) = ForwardPortRequest::parse_from_bytes(msg) else {
                return;
            };
            if let Ok(p) = requests::forward_port(req.port) {
                assert_ne!(p, 0);
            }
        }
    }
});
