//! virtio-console: the device model (`device`) and its host side on the event loop, the
//! ports' unix sockets (`event_handler`).

pub mod device;
pub mod event_handler;

pub use device::{Console, HostEvent, DEVICE_ID, MAX_PORTS};
pub use event_handler::ConsoleHandler;
