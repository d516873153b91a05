//! virtio-net: the device model (`device`), its tap (`tap`), and the tap on the event loop
//! (`event_handler`).

pub mod device;
pub mod event_handler;
pub mod tap;

pub use device::{Net, DEVICE_ID, MAX_FRAME};
pub use event_handler::NetHandler;
pub use tap::open_tap;
