//! The CRI part of `hack/soak.sh`: many pod lifecycles through containerd's CRI plugin, as
//! kubelet drives them, then proof that nothing was left behind ([`Cri::assert_no_leaks`]:
//! CRI objects, containerd containers, shims and container processes, mounts, cgroups, netns,
//! CNI state and bridge ports, bundles, shim sockets).
//!
//! Ignored in the plain test run (it is a soak, sized by the caller):
//! `JANUS_SOAK_PODS=N JANUS_SOAK_VM_PODS=M cargo test -p janus-tests --test soak -- --ignored`
//! (defaults 100 and 10). Each cycle: RunPodSandbox, a sleeping container, an ExecSync that
//! must print `ok`, StopPodSandbox, RemovePodSandbox. Two workers per handler.

use std::time::{Duration, Instant};

use janus_tests::cri::{self, Cri};

const WORKERS: usize = 2;

fn count(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{var}={v:?}: not a count: {e}")),
        Err(_) => default,
    }
}

/// One pod's whole life; returns the ids it used (pod and container).
fn cycle(c: &Cri, name: &str) -> [String; 2] {
    let pod = c.run_pod(c.pod_config(name));
    let id = c.run_container(&pod, c.container_config("sleeper", &["sleep", "100000"]));
    c.wait_running(&id);
    assert_eq!(c.exec_ok(&id, &["echo", "ok"]), "ok\n", "exec in {name}");
    c.stop_remove_pod(&pod);
    [pod.id.clone(), id]
}

fn soak(handler: &str, pods: usize) {
    let c = Cri::start(handler);
    let t = Instant::now();
    let ids: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let c = &c;
                s.spawn(move || {
                    (w..pods)
                        .step_by(WORKERS)
                        .flat_map(|i| cycle(c, &format!("soak-{w}-{i}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| h.join().expect("soak worker"))
            .collect()
    });
    let wall = t.elapsed();
    c.assert_no_leaks(&ids, Duration::from_secs(30));
    eprintln!(
        "soak (CRI): handler {handler}: {pods} pods in {:.1} s ({:.2} pods/s, {WORKERS} workers), nothing left",
        wall.as_secs_f64(),
        pods as f64 / wall.as_secs_f64()
    );
}

#[test]
#[ignore = "a soak: run by hack/soak.sh"]
fn cri_pods_namespace_mode() {
    soak(cri::JANUS_HANDLER, count("JANUS_SOAK_PODS", 100));
}

#[test]
#[ignore = "a soak: run by hack/soak.sh"]
fn cri_pods_vm_mode() {
    soak(cri::JANUS_VM_HANDLER, count("JANUS_SOAK_VM_PODS", 10));
}
