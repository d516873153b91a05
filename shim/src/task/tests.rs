//! The Task service's state machine over a fake sandbox: every call's preconditions, error
//! codes and events, without containerd or a container.

use std::sync::atomic::AtomicI32;
use std::sync::Mutex;

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::ttrpc::Code;

use super::*;
use crate::events::Event;
use crate::process::ProcessOps;
use crate::sandbox::{ContainerOps, Isolation, Sandbox};

/// What the fake did, in order.
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Log {
    fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

struct FakeSandbox {
    isolation: Isolation,
    log: Arc<Log>,
    events: Events,
    next_pid: AtomicI32,
}

/// A fake process: SIGKILL and SIGTERM end it at once (exit reported through the events,
/// as a sandbox does); a container named "oom..." reports an OOM kill with its init's exit.
struct FakeProcess {
    container_id: String,
    proc: std::sync::Weak<Proc>,
    log: Arc<Log>,
    events: Events,
}

#[async_trait]
impl ProcessOps for FakeProcess {
    async fn signal(&self, sig: u32, all: bool) -> Result<()> {
        self.log.push(format!("signal {sig} all={all}"));
        let Some(p) = self.proc.upgrade() else {
            return Ok(());
        };
        if sig == libc::SIGKILL as u32 || sig == libc::SIGTERM as u32 {
            let oom = self.container_id.starts_with("oom") && p.exec_id.is_empty();
            let code = 128 + sig as i32;
            self.events.exited(&self.container_id, &p, code, oom).await;
        }
        Ok(())
    }
    async fn resize_pty(&self, w: u32, h: u32) -> Result<()> {
        self.log.push(format!("resize {w}x{h}"));
        Ok(())
    }
    async fn close_stdin(&self) -> Result<()> {
        self.log.push("close stdin");
        Ok(())
    }
    fn exited(&self) {
        self.log.push("exited");
    }
}

struct FakeContainer {
    id: String,
    sandbox: Arc<FakeSandbox>,
}

impl FakeSandbox {
    fn attach(&self, container_id: &str, p: &Arc<Proc>) -> i32 {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        p.set_pid(pid);
        let ops = FakeProcess {
            container_id: container_id.to_string(),
            proc: Arc::downgrade(p),
            log: self.log.clone(),
            events: self.events.clone(),
        };
        p.attach(Arc::new(ops)).unwrap();
        pid
    }
}

#[async_trait]
impl ContainerOps for FakeContainer {
    async fn start(&self) -> Result<u32> {
        self.sandbox.log.push(format!("start {}", self.id));
        Ok(100)
    }
    async fn exec(&self, p: &Arc<Proc>) -> Result<u32> {
        self.sandbox.log.push(format!("exec {}", p.exec_id));
        Ok(self.sandbox.attach(&self.id, p) as u32)
    }
    async fn pause(&self) -> Result<()> {
        self.sandbox.log.push(format!("pause {}", self.id));
        Ok(())
    }
    async fn resume(&self) -> Result<()> {
        self.sandbox.log.push(format!("resume {}", self.id));
        Ok(())
    }
    async fn update(&self, res: LinuxResources, _raw: Vec<u8>) -> Result<()> {
        let pids = res.pids().as_ref().map(|p| p.limit()).unwrap_or_default();
        self.sandbox.log.push(format!("update pids={pids}"));
        Ok(())
    }
    async fn stats(&self) -> Result<Any> {
        Ok(Any {
            type_url: "fake".into(),
            ..Default::default()
        })
    }
    async fn pids(&self) -> Result<Vec<i32>> {
        Ok(vec![100, 101, 102])
    }
    async fn delete(&self) -> Result<()> {
        self.sandbox.log.push(format!("delete {}", self.id));
        Ok(())
    }
}

#[async_trait]
impl Sandbox for Arc<FakeSandbox> {
    fn isolation(&self) -> Isolation {
        self.isolation
    }
    async fn create(
        &self,
        req: &CreateTaskRequest,
        _spec: Spec,
        init: Arc<Proc>,
    ) -> Result<Arc<dyn ContainerOps>> {
        if req.id.starts_with("bad") {
            return Err(ShimError::InvalidArgument("the fake refuses".into()));
        }
        self.log.push(format!("create {}", req.id));
        self.attach(&req.id, &init);
        Ok(Arc::new(FakeContainer {
            id: req.id.clone(),
            sandbox: self.clone(),
        }))
    }
}

/// Hands out one sandbox per pod (or per plain container); logs whether a pod was joined.
struct FakeSandboxes {
    log: Arc<Log>,
    events: Events,
}

#[async_trait]
impl Sandboxes for FakeSandboxes {
    async fn open(
        &self,
        req: &CreateTaskRequest,
        _spec: &Spec,
        pod: Option<Arc<dyn Sandbox>>,
    ) -> Result<Arc<dyn Sandbox>> {
        if let Some(pod) = pod {
            self.log.push(format!("{} joins its pod", req.id));
            return Ok(pod);
        }
        let isolation = if req.id.contains("vm") {
            Isolation::Vm
        } else {
            Isolation::Namespaces
        };
        Ok(Arc::new(Arc::new(FakeSandbox {
            isolation,
            log: self.log.clone(),
            events: self.events.clone(),
            next_pid: AtomicI32::new(100),
        })))
    }
}

struct Harness {
    svc: TaskService,
    log: Arc<Log>,
    events: tokio::sync::mpsc::Receiver<Event>,
    dir: tempfile::TempDir,
    ctx: TtrpcContext,
}

fn harness() -> Harness {
    let (events, rx) = Events::channel();
    let log = Arc::new(Log::default());
    let sandboxes = FakeSandboxes {
        log: log.clone(),
        events: events.clone(),
    };
    let svc = TaskService::new(Arc::new(sandboxes), events, Arc::new(ExitSignal::default()));
    Harness {
        svc,
        log,
        events: rx,
        dir: tempfile::tempdir().unwrap(),
        ctx: TtrpcContext::default(),
    }
}

fn code<T: std::fmt::Debug>(r: TResult<T>) -> Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

impl Harness {
    /// A bundle for `id`; `pod`: the CRI sandbox it is a container of.
    fn bundle(&self, id: &str, pod: Option<&str>) -> String {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        });
        if let Some(sb) = pod {
            spec["annotations"] = serde_json::json!({
                CONTAINER_TYPE_ANNOTATION: "container",
                SANDBOX_ID_ANNOTATION: sb,
            });
        }
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        dir.display().to_string()
    }

    async fn create(&self, id: &str, pod: Option<&str>) -> TResult<CreateTaskResponse> {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, pod),
            ..Default::default()
        };
        self.svc.create(&self.ctx, req).await
    }

    async fn start(&self, id: &str, exec_id: &str) -> TResult<StartResponse> {
        let req = StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.svc.start(&self.ctx, req).await
    }

    async fn status(&self, id: &str, exec_id: &str) -> TResult<api::Status> {
        let req = StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = self.svc.state(&self.ctx, req).await?;
        Ok(r.status.enum_value().unwrap())
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> TResult<Empty> {
        let req = KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.svc.kill(&self.ctx, req).await
    }

    async fn exec(&self, id: &str, exec_id: &str, spec: &str) -> TResult<Empty> {
        let req = ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: MessageField::some(Any {
                value: spec.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.svc.exec(&self.ctx, req).await
    }

    async fn delete(&self, id: &str, exec_id: &str) -> TResult<DeleteResponse> {
        let req = DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.svc.delete(&self.ctx, req).await
    }

    async fn pause(&self, id: &str) -> TResult<Empty> {
        let req = PauseRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.pause(&self.ctx, req).await
    }

    async fn resume(&self, id: &str) -> TResult<Empty> {
        let req = ResumeRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.resume(&self.ctx, req).await
    }

    /// The topics raised since the last call, in order.
    fn topics(&mut self) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok((topic, _)) = self.events.try_recv() {
            out.push(topic);
        }
        out
    }
}

const EXEC_SPEC: &str = r#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#;

#[tokio::test]
async fn create_start_exit_delete_in_order() {
    let mut h = harness();
    let pid = h.create("c1", None).await.unwrap().pid;
    assert_eq!(pid, 100);
    assert_eq!(h.status("c1", "").await.unwrap(), api::Status::CREATED);
    assert_eq!(h.start("c1", "").await.unwrap().pid, 100);
    assert_eq!(h.status("c1", "").await.unwrap(), api::Status::RUNNING);
    h.kill("c1", "", libc::SIGTERM as u32, false).await.unwrap();
    assert_eq!(h.status("c1", "").await.unwrap(), api::Status::STOPPED);
    let d = h.delete("c1", "").await.unwrap();
    assert_eq!((d.pid, d.exit_status), (100, 128 + libc::SIGTERM as u32));
    assert_eq!(
        h.topics(),
        [
            TASK_CREATE_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
            TASK_EXIT_EVENT_TOPIC,
            TASK_DELETE_EVENT_TOPIC
        ]
    );
    assert_eq!(
        h.log.take(),
        [
            "create c1",
            "start c1",
            "signal 15 all=false",
            "exited",
            "delete c1"
        ]
    );
    assert_eq!(code(h.status("c1", "").await), Code::NOT_FOUND);
}

#[tokio::test]
async fn create_refusals_have_their_codes() {
    let h = harness();
    assert_eq!(code(h.create("", None).await), Code::INVALID_ARGUMENT);
    h.create("c1", None).await.unwrap();
    assert_eq!(code(h.create("c1", None).await), Code::ALREADY_EXISTS);
    let req = CreateTaskRequest {
        id: "c2".into(),
        bundle: h.bundle("c2", None),
        checkpoint: "/some/checkpoint".into(),
        ..Default::default()
    };
    assert_eq!(code(h.svc.create(&h.ctx, req).await), Code::UNIMPLEMENTED);
    // The sandbox's own refusal reaches containerd with its code, and nothing is kept.
    assert_eq!(code(h.create("bad1", None).await), Code::INVALID_ARGUMENT);
    assert_eq!(code(h.status("bad1", "").await), Code::NOT_FOUND);
    let req = CreateTaskRequest {
        id: "c3".into(),
        bundle: h.dir.path().join("nowhere").display().to_string(),
        ..Default::default()
    };
    assert_ne!(code(h.svc.create(&h.ctx, req).await), Code::OK);
}

#[tokio::test]
async fn start_twice_is_a_failed_precondition() {
    let h = harness();
    h.create("c1", None).await.unwrap();
    h.start("c1", "").await.unwrap();
    assert_eq!(code(h.start("c1", "").await), Code::FAILED_PRECONDITION);
    assert_eq!(code(h.start("nope", "").await), Code::NOT_FOUND);
    assert_eq!(code(h.start("c1", "nope").await), Code::NOT_FOUND);
}

#[tokio::test]
async fn exec_lifecycle_and_its_preconditions() {
    let mut h = harness();
    h.create("c1", None).await.unwrap();
    // Not running yet.
    assert_eq!(
        code(h.exec("c1", "e1", EXEC_SPEC).await),
        Code::FAILED_PRECONDITION
    );
    h.start("c1", "").await.unwrap();
    assert_eq!(
        code(h.exec("c1", "", EXEC_SPEC).await),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(h.exec("c1", "e1", "{not json").await),
        Code::INVALID_ARGUMENT
    );
    h.exec("c1", "e1", EXEC_SPEC).await.unwrap();
    assert_eq!(
        code(h.exec("c1", "e1", EXEC_SPEC).await),
        Code::ALREADY_EXISTS
    );
    assert_eq!(h.status("c1", "e1").await.unwrap(), api::Status::CREATED);
    // An exec that has not started has nothing to signal.
    assert_eq!(
        code(h.kill("c1", "e1", libc::SIGTERM as u32, false).await),
        Code::FAILED_PRECONDITION
    );
    let pid = h.start("c1", "e1").await.unwrap().pid;
    assert_eq!(pid, 101);
    assert_eq!(code(h.start("c1", "e1").await), Code::FAILED_PRECONDITION);
    // Pids name the exec.
    let r = h
        .svc
        .pids(
            &h.ctx,
            PidsRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let with_info: Vec<u32> = r
        .processes
        .iter()
        .filter(|p| p.info.is_some())
        .map(|p| p.pid)
        .collect();
    assert_eq!(with_info, [101]);
    assert_eq!(code(h.delete("c1", "e1").await), Code::FAILED_PRECONDITION);
    h.kill("c1", "e1", libc::SIGKILL as u32, false)
        .await
        .unwrap();
    assert_eq!(h.delete("c1", "e1").await.unwrap().exit_status, 137);
    assert_eq!(code(h.status("c1", "e1").await), Code::NOT_FOUND);
    assert_eq!(
        h.topics(),
        [
            TASK_CREATE_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
            TASK_EXEC_ADDED_EVENT_TOPIC,
            TASK_EXEC_STARTED_EVENT_TOPIC,
            TASK_EXIT_EVENT_TOPIC
        ]
    );
}

#[tokio::test]
async fn oom_is_reported_before_the_exit() {
    let mut h = harness();
    h.create("oom1", None).await.unwrap();
    h.start("oom1", "").await.unwrap();
    h.topics();
    h.kill("oom1", "", libc::SIGKILL as u32, false)
        .await
        .unwrap();
    assert_eq!(h.topics(), [TASK_OOM_EVENT_TOPIC, TASK_EXIT_EVENT_TOPIC]);
    // A second report of the same exit changes nothing.
    let c = h.svc.get("oom1").unwrap();
    h.svc.inner.events.exited("oom1", &c.init, 0, true).await;
    assert!(h.topics().is_empty());
    let w = h
        .svc
        .wait(
            &h.ctx,
            WaitRequest {
                id: "oom1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(w.exit_status, 137);
}

#[tokio::test]
async fn kill_after_exit_is_not_found_but_kill_all_still_reaches_the_sandbox() {
    let h = harness();
    h.create("c1", None).await.unwrap();
    h.start("c1", "").await.unwrap();
    h.kill("c1", "", libc::SIGKILL as u32, false).await.unwrap();
    h.log.take();
    assert_eq!(
        code(h.kill("c1", "", libc::SIGKILL as u32, false).await),
        Code::NOT_FOUND
    );
    h.kill("c1", "", libc::SIGKILL as u32, true).await.unwrap();
    assert_eq!(h.log.take(), ["signal 9 all=true"]);
}

#[tokio::test]
async fn delete_refuses_a_running_init_and_kills_a_created_one() {
    let h = harness();
    h.create("c1", None).await.unwrap();
    h.create("c2", None).await.unwrap();
    h.start("c1", "").await.unwrap();
    assert_eq!(code(h.delete("c1", "").await), Code::FAILED_PRECONDITION);
    h.log.take();
    let d = h.delete("c2", "").await.unwrap();
    assert_eq!(d.exit_status, 137);
    assert_eq!(h.log.take(), ["signal 9 all=false", "exited", "delete c2"]);
}

#[tokio::test]
async fn pause_is_per_container() {
    let mut h = harness();
    h.create("sb", None).await.unwrap();
    assert_eq!(code(h.pause("sb").await), Code::FAILED_PRECONDITION);
    h.start("sb", "").await.unwrap();
    h.create("app", Some("sb")).await.unwrap();
    h.start("app", "").await.unwrap();
    assert_eq!(code(h.resume("app").await), Code::FAILED_PRECONDITION);
    h.topics();
    h.pause("app").await.unwrap();
    assert_eq!(h.status("app", "").await.unwrap(), api::Status::PAUSED);
    assert_eq!(h.status("sb", "").await.unwrap(), api::Status::RUNNING);
    h.resume("app").await.unwrap();
    assert_eq!(h.status("app", "").await.unwrap(), api::Status::RUNNING);
    assert_eq!(
        h.topics(),
        [TASK_PAUSED_EVENT_TOPIC, TASK_RESUMED_EVENT_TOPIC]
    );
}

#[tokio::test]
async fn pod_members_join_their_sandbox_and_others_do_not() {
    let h = harness();
    h.create("vm-sb", None).await.unwrap();
    h.create("app", Some("vm-sb")).await.unwrap();
    // A container naming a pod that is not in this shim gets a sandbox of its own.
    h.create("stray", Some("elsewhere")).await.unwrap();
    let log = h.log.take();
    assert_eq!(
        log,
        [
            "create vm-sb",
            "app joins its pod",
            "create app",
            "create stray"
        ]
    );
    let app = h.svc.get("app").unwrap();
    let sb = h.svc.get("vm-sb").unwrap();
    assert!(Arc::ptr_eq(&app.sandbox, &sb.sandbox));
    assert_eq!(app.sandbox.isolation(), Isolation::Vm);
    let stray = h.svc.get("stray").unwrap();
    assert!(!Arc::ptr_eq(&stray.sandbox, &sb.sandbox));
}

#[tokio::test]
async fn io_calls_reach_the_process_and_update_is_validated() {
    let h = harness();
    h.create("c1", None).await.unwrap();
    h.exec_after_start_noop().await;
    h.log.take();
    let r = ResizePtyRequest {
        id: "c1".into(),
        width: 80,
        height: 24,
        ..Default::default()
    };
    h.svc.resize_pty(&h.ctx, r).await.unwrap();
    let r = CloseIORequest {
        id: "c1".into(),
        stdin: true,
        ..Default::default()
    };
    h.svc.close_io(&h.ctx, r).await.unwrap();
    let bad = UpdateTaskRequest {
        id: "c1".into(),
        resources: MessageField::some(Any {
            value: b"[1,2".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        code(h.svc.update(&h.ctx, bad).await),
        Code::INVALID_ARGUMENT
    );
    let ok = UpdateTaskRequest {
        id: "c1".into(),
        resources: MessageField::some(Any {
            value: br#"{"pids":{"limit":42}}"#.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    h.svc.update(&h.ctx, ok).await.unwrap();
    assert_eq!(
        h.log.take(),
        ["resize 80x24", "close stdin", "update pids=42"]
    );
    let s = h
        .svc
        .stats(
            &h.ctx,
            StatsRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(s.stats.type_url, "fake");
}

impl Harness {
    async fn exec_after_start_noop(&self) {
        self.start("c1", "").await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_only_when_empty() {
    let h = harness();
    h.create("c1", None).await.unwrap();
    h.svc
        .shutdown(&h.ctx, ShutdownRequest::default())
        .await
        .unwrap();
    assert!(!h.svc.is_empty());
}
