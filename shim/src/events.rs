//! What the shim tells containerd, in the order it happened: a bounded queue drained by one
//! publisher task. A full queue makes the sender wait (backpressure), it never grows memory.
//!
//! Exits are reported here, for every mode, so TaskOOM always precedes its TaskExit.
//!
//! containerd may restart while the shim runs: a forward that fails for want of a connection
//! reconnects and retries the same event (in order) until containerd is back, for up to
//! [`RETRY_FOR`]. (containerd-shim's `RemotePublisher` reconnects only on some errors; a dead
//! connection answers with others, so after a restart it lost every event, TaskExit included,
//! and containerd never learnt that a task had exited.)

use std::time::{Duration, Instant};

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::topics::{TASK_EXIT_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC};
use containerd_shim_protos::ttrpc;
use tokio::sync::mpsc;

use crate::process::{timestamp, Proc};

/// Topic and the event, packed.
pub type Event = (&'static str, Any);

/// An event message with its protobuf type name, which is the type URL of the `Any` that
/// carries it. Written out, and the message encoded through the typed `Message` API, to stay
/// clear of protobuf reflection: `descriptor_dyn()` (which `MessageDyn` encoding calls too)
/// builds the descriptors of the whole proto file and its imports on first use, some 350 KiB
/// of heap and much code, kept for the shim's life.
pub trait EventMessage: Message {
    const TYPE_NAME: &'static str;
}

macro_rules! event_messages {
    ($($t:ident),* $(,)?) => {
        $(impl EventMessage for $t {
            const TYPE_NAME: &'static str = concat!("containerd.events.", stringify!($t));
        })*
    };
}
event_messages!(
    TaskCreate,
    TaskStart,
    TaskDelete,
    TaskExecAdded,
    TaskExecStarted,
    TaskExit,
    TaskOOM,
    TaskPaused,
    TaskResumed,
);

/// Events in flight before senders wait: enough for a burst of exits of a large pod.
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
}

/// How long one event is retried while containerd cannot be reached (a restart).
const RETRY_FOR: Duration = Duration::from_secs(300);
/// Longest one Forward call may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// containerd's event service at `address` (its ttrpc socket): one connection, made again
/// when it breaks.
pub struct Publisher {
    address: String,
    client: Option<EventsClient>,
}

impl Publisher {
    /// Connects to `address` (fails if containerd does not answer there now).
    pub fn connect(address: &str) -> anyhow::Result<Publisher> {
        let mut p = Publisher {
            address: address.to_string(),
            client: None,
        };
        p.client = Some(p.dial()?);
        Ok(p)
    }

    fn dial(&self) -> anyhow::Result<EventsClient> {
        let fd = containerd_shim::util::connect(&self.address)?;
        // SAFETY: `fd` is the connected unix socket just returned, owned by the client now.
        let client = unsafe { Client::from_raw_unix_socket_fd(fd) };
        Ok(EventsClient::new(client))
    }

    /// Sends one event. An answer of containerd's (accepted or refused) ends it; a broken or
    /// missing connection is made again and the event sent again, with backoff, for up to
    /// [`RETRY_FOR`].
    async fn publish(&mut self, topic: &str, namespace: &str, ev: Any) {
        let req = match envelope(topic, namespace, ev) {
            Ok(e) => {
                let mut req = ForwardRequest::new();
                req.set_envelope(e);
                req
            }
            Err(e) => {
                log::error!("publish {topic}: {e}");
                return;
            }
        };
        let start = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            let client = match self.client.take() {
                Some(c) => Some(c),
                None => self
                    .dial()
                    .map_err(|e| log::debug!("publish {topic}: reconnect: {e:#}"))
                    .ok(),
            };
            if let Some(c) = client {
                let ctx = ttrpc::context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64);
                match c.forward(ctx, &req).await {
                    Ok(_) => {
                        self.client = Some(c);
                        return;
                    }
                    Err(ttrpc::error::Error::RpcStatus(st)) => {
                        // containerd answered: sending it again would not change that.
                        self.client = Some(c);
                        log::warn!("publish {topic}: containerd refused it: {st:?}");
                        return;
                    }
                    Err(e) => log::warn!("publish {topic}: {e:?}; reconnecting"),
                }
            }
            if start.elapsed() >= RETRY_FOR {
                log::error!(
                    "publish {topic}: containerd unreachable at {} for {:?}: event dropped",
                    self.address,
                    RETRY_FOR
                );
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn envelope(topic: &str, namespace: &str, ev: Any) -> anyhow::Result<Envelope> {
    let mut e = Envelope::new();
    e.set_topic(topic.to_string());
    e.set_namespace(namespace.to_string());
    e.set_timestamp(containerd_shim::util::timestamp()?);
    e.set_event(ev);
    Ok(e)
}

fn pack<M: EventMessage>(topic: &str, ev: &M) -> Option<Any> {
    match ev.write_to_bytes() {
        Ok(value) => Some(Any {
            type_url: M::TYPE_NAME.to_string(),
            value,
            ..Default::default()
        }),
        Err(e) => {
            log::error!("publish {topic}: encode: {e}");
            None
        }
    }
}

impl Events {
    pub fn start(mut publisher: Publisher, namespace: String) -> Events {
        let (events, mut rx) = Events::channel();
        tokio::spawn(async move {
            while let Some((topic, ev)) = rx.recv().await {
                publisher.publish(topic, &namespace, ev).await;
            }
        });
        events
    }

    /// The queue and its receiving end (the publisher, or a test).
    pub fn channel() -> (Events, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Events { tx }, rx)
    }

    pub async fn send<M: EventMessage>(&self, topic: &'static str, ev: M) {
        if let Some(ev) = pack(topic, &ev) {
            // Fails only once the publisher is gone (the shim is exiting).
            let _ = self.tx.send((topic, ev)).await;
        }
    }

    /// For threads outside the runtime (the OOM watcher).
    pub fn send_blocking<M: EventMessage>(&self, topic: &'static str, ev: M) {
        if let Some(ev) = pack(topic, &ev) {
            let _ = self.tx.blocking_send((topic, ev));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::MessageFull;

    fn name_matches<M: EventMessage + MessageFull>() {
        assert_eq!(M::TYPE_NAME, M::descriptor().full_name());
    }

    #[test]
    fn type_names_are_the_protobuf_names() {
        name_matches::<TaskCreate>();
        name_matches::<TaskStart>();
        name_matches::<TaskDelete>();
        name_matches::<TaskExecAdded>();
        name_matches::<TaskExecStarted>();
        name_matches::<TaskExit>();
        name_matches::<TaskOOM>();
        name_matches::<TaskPaused>();
        name_matches::<TaskResumed>();
    }
}
