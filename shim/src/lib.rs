//! The shim's decoding of what containerd hands it as a library: the
//! `containerd-shim-janus-v2` binary and the fuzz targets share it (`options`: the runtime
//! options of a task's Create).

pub mod options;
