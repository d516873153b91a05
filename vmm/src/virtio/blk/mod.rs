//! virtio-blk: all of its work happens on queue notifications, so it has no event handler of
//! its own (the transport's queue events reach it).

pub mod device;

pub use device::{Block, DEVICE_ID};
