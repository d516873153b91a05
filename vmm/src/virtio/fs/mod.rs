//! virtio-fs: a vhost-user frontend. A backend process serves the queues, so the device has
//! no host fds of its own to watch; its call eventfds are transport events (see `events.rs`).

pub mod device;

pub use device::{check_config, Fs, DEVICE_ID};
