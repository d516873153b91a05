//! Ordered event publishing to containerd.

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

pub type Event = (&'static str, Box<dyn MessageDyn>);

/// Sends events in the order they were raised, off the request path.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Event>,
}

impl Events {
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
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
        Events { tx }
    }

    pub fn send(&self, topic: &'static str, ev: impl MessageDyn) {
        let _ = self.tx.send((topic, Box::new(ev)));
    }
}
