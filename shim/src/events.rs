//! What the shim tells containerd, in the order it happened: a bounded queue drained by one
//! publisher task. A full queue makes the sender wait (backpressure), it never grows memory.
//!
//! Exits are reported here, for every mode, so TaskOOM always precedes its TaskExit.

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::topics::{TASK_EXIT_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC};
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

use crate::process::{timestamp, Proc};

pub type Event = (&'static str, Box<dyn MessageDyn>);

/// Events in flight before senders wait: enough for a burst of exits of a large pod.
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
}

impl Events {
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (events, mut rx) = Events::channel();
        tokio::spawn(async move {
            while let Some((topic, ev)) = rx.recv().await {
                if let Err(e) = publisher
                    .publish(Context::default(), topic, &namespace, ev)
                    .await
                {
                    log::warn!("publish {topic}: {e}");
                }
            }
        });
        events
    }

    /// The queue and its receiving end (the publisher, or a test).
    pub fn channel() -> (Events, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Events { tx }, rx)
    }

    pub async fn send(&self, topic: &'static str, ev: impl MessageDyn) {
        // Fails only once the publisher is gone (the shim is exiting).
        let _ = self.tx.send((topic, Box::new(ev))).await;
    }

    /// For threads outside the runtime (the OOM watcher).
    pub fn send_blocking(&self, topic: &'static str, ev: impl MessageDyn) {
        let _ = self.tx.blocking_send((topic, Box::new(ev)));
    }

    pub async fn oom(&self, container_id: &str) {
        self.send(TASK_OOM_EVENT_TOPIC, oom_event(container_id))
            .await;
    }

    /// A process of `container_id` ended with `code`: records it once (a second report of the
    /// same exit is ignored), then TaskOOM if the sandbox saw an OOM kill with it, then
    /// TaskExit (CRI derives the OOMKilled reason from that order).
    pub async fn exited(&self, container_id: &str, p: &Proc, code: i32, oom: bool) {
        if !p.set_exited(code) {
            return;
        }
        if oom {
            self.oom(container_id).await;
        }
        let ev = {
            let st = p.lock();
            TaskExit {
                container_id: container_id.to_string(),
                id: if p.exec_id.is_empty() {
                    container_id.to_string()
                } else {
                    p.exec_id.clone()
                },
                pid: st.pid as u32,
                exit_status: st.exit_status,
                exited_at: MessageField::from_option(st.exited_at.map(timestamp)),
                ..Default::default()
            }
        };
        self.send(TASK_EXIT_EVENT_TOPIC, ev).await;
    }
}

pub fn oom_event(container_id: &str) -> TaskOOM {
    TaskOOM {
        container_id: container_id.to_string(),
        ..Default::default()
    }
}
