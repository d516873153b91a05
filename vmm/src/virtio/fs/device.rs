//! virtio-fs (device id 26) as a vhost-user frontend: the queues are served by a backend
//! process (virtiofsd) that maps guest RAM from the memfd (`--shared-memory`) and reads and
//! writes the rings itself. The VMM keeps the register file and config space (tag, number of
//! request queues), connects to the backend's socket at start, and hands it the memory table
//! and the rings when the driver sets DRIVER_OK.
//!
//! Notifications: each queue's kick eventfd is the ioeventfd KVM signals on the guest's
//! QueueNotify write, so a request reaches virtiofsd without a VMM exit. Completions do not go
//! to the irqfd directly: a virtio-mmio driver only looks at the rings when InterruptStatus
//! says so, so the backend signals a call eventfd per queue, which the device event loop turns
//! into the interrupt status bit and the irqfd (see `events.rs`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::virtio::{read_config_bytes, BackendQueues, VirtioDevice, VIRTIO_F_VERSION_1};

pub const DEVICE_ID: u32 = 26;
/// The tag the guest mounts by (`mount -t virtiofs TAG`): up to 36 bytes, NUL padded.
pub const TAG_LEN: usize = 36;
/// virtiofsd serves one request queue (plus the high-priority queue).
pub const REQUEST_QUEUES: usize = 1;
/// libvhost-user's largest queue.
const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; 1 + REQUEST_QUEUES];

/// Ring features the backend implements and the transport need not know about; anything
/// else a backend offers is not passed on to the driver.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const PASS_THROUGH: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Checks `--fs` settings: tags non-empty, at most 36 bytes, distinct; guest RAM shared.
pub fn check_config(fs: &[(String, PathBuf)], shared_memory: bool) -> Result<()> {
    if fs.is_empty() {
        return Ok(());
    }
    if !shared_memory {
        return Err(Error::Config(
            "--fs needs --shared-memory: the vhost-user backend maps guest RAM from a memfd".into(),
        ));
    }
    for (i, (tag, _)) in fs.iter().enumerate() {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(Error::Config(format!(
                "virtio-fs tag {tag:?}: 1 to {TAG_LEN} bytes"
            )));
        }
        if fs[..i].iter().any(|(t, _)| t == tag) {
            return Err(Error::Config(format!("virtio-fs tag {tag:?} given twice")));
        }
    }
    Ok(())
}

/// The config space: tag, then `num_request_queues` (le32).
fn config_space(tag: &str) -> [u8; TAG_LEN + 4] {
    let mut c = [0u8; TAG_LEN + 4];
    for (d, s) in c.iter_mut().zip(tag.bytes()) {
        *d = s;
    }
    c[TAG_LEN..].copy_from_slice(&(REQUEST_QUEUES as u32).to_le_bytes());
    c
}

pub struct Fs {
    config: [u8; TAG_LEN + 4],
    socket: PathBuf,
    frontend: Frontend,
    /// What the backend offered (`PROTOCOL_FEATURES` included).
    backend_features: u64,
    kick: Vec<EventFd>,
    call: Vec<EventFd>,
    /// Queues handed to the backend since the last DRIVER_OK.
    started: Vec<usize>,
}

impl Fs {
    /// Connects to the backend at `socket` and negotiates what does not depend on the
    /// driver (ownership, protocol features).
    pub fn connect(tag: &str, socket: &Path) -> Result<Fs> {
        let frontend = Frontend::connect(socket, QUEUE_SIZES.len() as u64).map_err(|e| {
            Error::Config(format!(
                "virtio-fs {tag}: vhost-user backend {}: connect: {e}",
                socket.display()
            ))
        })?;
        Fs::negotiate(tag, socket, frontend)
    }

    /// As `connect`, on a stream already connected to the backend (`name` is what errors
    /// call it); the fuzz target `vhost_user_frontend` plays the backend on a socketpair.
    pub fn from_stream(tag: &str, name: &Path, stream: UnixStream) -> Result<Fs> {
        let frontend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
        Fs::negotiate(tag, name, frontend)
    }

    fn negotiate(tag: &str, socket: &Path, mut frontend: Frontend) -> Result<Fs> {
        let fail = |what: &str, e: vhost::Error| {
            Error::Config(format!(
                "virtio-fs {tag}: vhost-user backend {}: {what}: {e}",
                socket.display()
            ))
        };
        let n = QUEUE_SIZES.len();
        frontend.set_owner().map_err(|e| fail("SET_OWNER", e))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| fail("GET_FEATURES", e))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::Config(format!(
                "virtio-fs {tag}: vhost-user backend {} does not offer VIRTIO_F_VERSION_1",
                socket.display()
            )));
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| fail("GET_PROTOCOL_FEATURES", e))?;
            let want =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(want)
                .map_err(|e| fail("SET_PROTOCOL_FEATURES", e))?;
            if want.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is acknowledged: a failure shows up at the message that
                // caused it, and the rings are set up before the first kick is looked at.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if want.contains(VhostUserProtocolFeatures::MQ) {
                let max = frontend
                    .get_queue_num()
                    .map_err(|e| fail("GET_QUEUE_NUM", e))?;
                if max < n as u64 {
                    return Err(Error::Config(format!(
                        "virtio-fs {tag}: vhost-user backend {} serves {max} queues, {n} needed",
                        socket.display()
                    )));
                }
            }
        }
        let eventfds = || -> Result<Vec<EventFd>> {
            (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK).map_err(crate::error::io("eventfd")))
                .collect()
        };
        Ok(Fs {
            config: config_space(tag),
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            kick: eventfds()?,
            call: eventfds()?,
            started: Vec::new(),
        })
    }

    fn protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn start(
        &mut self,
        features: u64,
        queues: &[Queue],
        mem: &GuestMemory,
    ) -> std::result::Result<(), String> {
        fn ctx(what: &'static str) -> impl Fn(vhost::Error) -> String {
            move |e| format!("{what}: {e}")
        }
        // A handle on the same connection (the frontend is shared state behind a lock).
        let mut f = self.frontend.clone();
        // PROTOCOL_FEATURES is between frontend and backend: keep it, or the protocol
        // features negotiated at connect (and SET_VRING_ENABLE) would not apply.
        let proto = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        f.set_features(features | proto)
            .map_err(ctx("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(ctx("guest memory without a memfd"))?;
        f.set_mem_table(&regions).map_err(ctx("SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            // The backend finds the rings by our mapping's addresses (translated through
            // the memory table it just got), not by guest physical ones.
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {i}: ring at {gpa:#x}: {e}"))
            };
            let rings = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            f.set_vring_num(i, q.size()).map_err(ctx("SET_VRING_NUM"))?;
            f.set_vring_addr(i, &rings).map_err(ctx("SET_VRING_ADDR"))?;
            f.set_vring_base(i, 0).map_err(ctx("SET_VRING_BASE"))?;
            f.set_vring_call(i, &self.call[i])
                .map_err(ctx("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &self.kick[i])
                .map_err(ctx("SET_VRING_KICK"))?;
            self.started.push(i);
            if self.protocol_features() {
                f.set_vring_enable(i, true)
                    .map_err(ctx("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Takes the rings back from the backend (GET_VRING_BASE stops a ring in vhost-user).
    fn stop(&mut self) {
        for i in std::mem::take(&mut self.started) {
            if self.protocol_features() {
                if let Err(e) = self.frontend.set_vring_enable(i, false) {
                    log::warn!(
                        "virtio-fs {}: disable queue {i}: {e}",
                        self.socket.display()
                    );
                }
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                log::warn!("virtio-fs {}: stop queue {i}: {e}", self.socket.display());
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend_features & PASS_THROUGH
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// Only reached when a notification did not match an ioeventfd: pass it on.
    fn process_queue(&mut self, index: usize, _: &mut Queue, _: &GuestMemory) -> bool {
        if let Some(k) = self.kick.get(index) {
            let _ = k.write(1);
        }
        false
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[Queue],
        mem: &GuestMemory,
    ) -> std::result::Result<(), String> {
        self.stop();
        self.start(features, queues, mem).map_err(|e| {
            format!(
                "virtio-fs: vhost-user backend {}: {e}",
                self.socket.display()
            )
        })
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn backend_queues(&self) -> Option<BackendQueues<'_>> {
        Some(BackendQueues {
            kick: &self.kick,
            call: &self.call,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_tag_then_request_queues() {
        let c = config_space("myfs");
        assert_eq!(&c[..4], b"myfs");
        assert!(c[4..TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 1);
        // A tag of exactly 36 bytes has no NUL.
        let long = "t".repeat(TAG_LEN);
        let c = config_space(&long);
        assert_eq!(&c[..TAG_LEN], long.as_bytes());
        let mut b = [0u8; 4];
        read_config_bytes(&c, TAG_LEN as u64, &mut b);
        assert_eq!(u32::from_le_bytes(b), REQUEST_QUEUES as u32);
    }

    #[test]
    fn fs_needs_shared_memory_and_sane_tags() {
        let s = PathBuf::from("/run/fs.sock");
        assert!(check_config(&[], false).is_ok());
        let e = check_config(&[("myfs".into(), s.clone())], false).unwrap_err();
        assert!(e.to_string().contains("--shared-memory"), "{e}");
        assert!(check_config(&[("myfs".into(), s.clone())], true).is_ok());
        assert!(check_config(&[(String::new(), s.clone())], true).is_err());
        assert!(check_config(&[("t".repeat(TAG_LEN + 1), s.clone())], true).is_err());
        assert!(check_config(&[("t".repeat(TAG_LEN), s.clone())], true).is_ok());
        let twice = [("a".into(), s.clone()), ("a".into(), s)];
        assert!(check_config(&twice, true).is_err());
    }

    /// A stand-in backend that records the requests it gets (in order) and answers as
    /// virtiofsd would: VERSION_1, EVENT_IDX, a device feature we do not pass on, and
    /// protocol features MQ and REPLY_ACK with two queues.
    mod recorder {
        use std::fs::File;
        use std::sync::{Arc, Mutex};

        use vhost::vhost_user::message::*;
        use vhost::vhost_user::{
            Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut,
        };
        use vhost::VhostUserMemoryRegionBase;

        pub const OFFERED: u64 = (1 << 32) | (1 << 30) | (1 << 29) | 1;

        #[derive(Default)]
        pub struct Recorder {
            pub log: Vec<String>,
            /// (guest address, size, our address, file offset) per region that came with an fd.
            pub regions: Vec<(u64, u64, u64, u64)>,
            /// Ring addresses per SET_VRING_ADDR: (index, desc, used, avail).
            pub rings: Vec<(u32, u64, u64, u64)>,
        }

        pub type Shared = Arc<Mutex<Recorder>>;

        fn no<T>() -> Result<T> {
            Err(Error::InvalidOperation("not in this test"))
        }

        impl Recorder {
            fn note(&mut self, s: String) -> Result<()> {
                self.log.push(s);
                Ok(())
            }
        }

        impl VhostUserBackendReqHandlerMut for Recorder {
            fn set_owner(&mut self) -> Result<()> {
                self.note("SET_OWNER".into())
            }
            fn reset_owner(&mut self) -> Result<()> {
                self.note("RESET_OWNER".into())
            }
            fn reset_device(&mut self) -> Result<()> {
                no()
            }
            fn get_features(&mut self) -> Result<u64> {
                self.note("GET_FEATURES".into())?;
                Ok(OFFERED)
            }
            fn set_features(&mut self, f: u64) -> Result<()> {
                self.note(format!("SET_FEATURES {f:#x}"))
            }
            fn set_mem_table(
                &mut self,
                ctx: &[VhostUserMemoryRegion],
                files: Vec<File>,
                _: Option<bool>,
            ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
                for (r, _) in ctx.iter().zip(files.iter()) {
                    let r = *r;
                    let (g, n, u, o) =
                        (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
                    self.regions.push((g, n, u, o));
                }
                self.note(format!("SET_MEM_TABLE {} {}", ctx.len(), files.len()))?;
                Ok(None)
            }
            fn set_vring_num(&mut self, i: u32, n: u32) -> Result<()> {
                self.note(format!("SET_VRING_NUM {i} {n}"))
            }
            fn set_vring_addr(
                &mut self,
                i: u32,
                _: VhostUserVringAddrFlags,
                desc: u64,
                used: u64,
                avail: u64,
                _: u64,
            ) -> Result<()> {
                self.rings.push((i, desc, used, avail));
                self.note(format!("SET_VRING_ADDR {i}"))
            }
            fn set_vring_base(&mut self, i: u32, b: u32) -> Result<()> {
                self.note(format!("SET_VRING_BASE {i} {b}"))
            }
            fn get_vring_base(&mut self, i: u32) -> Result<VhostUserVringState> {
                self.note(format!("GET_VRING_BASE {i}"))?;
                Ok(VhostUserVringState::new(i, 0))
            }
            fn set_vring_kick(&mut self, i: u8, fd: Option<File>) -> Result<()> {
                self.note(format!("SET_VRING_KICK {i} {}", fd.is_some()))
            }
            fn set_vring_call(&mut self, i: u8, fd: Option<File>) -> Result<()> {
                self.note(format!("SET_VRING_CALL {i} {}", fd.is_some()))
            }
            fn set_vring_err(&mut self, _: u8, _: Option<File>) -> Result<()> {
                no()
            }
            fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
                self.note("GET_PROTOCOL_FEATURES".into())?;
                Ok(VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIG)
            }
            fn set_protocol_features(&mut self, f: u64) -> Result<()> {
                self.note(format!("SET_PROTOCOL_FEATURES {f:#x}"))
            }
            fn get_queue_num(&mut self) -> Result<u64> {
                self.note("GET_QUEUE_NUM".into())?;
                Ok(2)
            }
            fn set_vring_enable(&mut self, i: u32, on: bool) -> Result<()> {
                self.note(format!("SET_VRING_ENABLE {i} {on}"))
            }
            fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> Result<Vec<u8>> {
                no()
            }
            fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> Result<()> {
                no()
            }
            fn set_backend_req_fd(&mut self, _: Backend) {}
            fn set_gpu_socket(&mut self, _: GpuBackend) -> Result<()> {
                no()
            }
            fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> Result<File> {
                no()
            }
            fn get_inflight_fd(
                &mut self,
                _: &VhostUserInflight,
            ) -> Result<(VhostUserInflight, File)> {
                no()
            }
            fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> Result<()> {
                no()
            }
            fn get_max_mem_slots(&mut self) -> Result<u64> {
                no()
            }
            fn add_mem_region(
                &mut self,
                _: &VhostUserSingleMemoryRegion,
                _: File,
                _: Option<bool>,
            ) -> Result<Option<VhostUserMemoryRegionBase>> {
                no()
            }
            fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> Result<()> {
                no()
            }
            fn set_device_state_fd(
                &mut self,
                _: VhostTransferStateDirection,
                _: VhostTransferStatePhase,
                _: File,
            ) -> Result<Option<File>> {
                no()
            }
            fn check_device_state(&mut self) -> Result<()> {
                no()
            }
            fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
                no()
            }
            fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> Result<()> {
                no()
            }
        }
    }

    /// Serves one session on a socket in `dir` on a thread; the recorder it fills.
    fn recording_backend(dir: &Path) -> (PathBuf, recorder::Shared, std::thread::JoinHandle<()>) {
        let sock = dir.join("backend.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let rec = recorder::Shared::default();
        let backend = std::sync::Arc::new(std::sync::Mutex::new(Default::default()));
        let shared = rec.clone();
        let t = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut h = vhost::vhost_user::BackendReqHandler::<
                std::sync::Mutex<recorder::Recorder>,
            >::from_stream(stream, backend.clone());
            // Until the frontend hangs up.
            while h.handle_request().is_ok() {}
            let mut b = backend.lock().unwrap();
            *shared.lock().unwrap() = std::mem::take(&mut *b);
        });
        (sock, rec, t)
    }

    #[test]
    fn vhost_user_sequence_against_a_recording_backend() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, rec, backend) = recording_backend(dir.path());
        let mut fs = Fs::connect("myfs", &sock).unwrap();
        // Ring features pass, the device's own bit 0 and PROTOCOL_FEATURES do not.
        assert_eq!(fs.features(), VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert!(fs
            .backend_queues()
            .is_some_and(|b| b.kick.len() == 2 && b.call.len() == 2));

        let (mem, _memfd) = crate::memory::create(32 << 20, true).unwrap();
        let mut queues: Vec<Queue> = QUEUE_SIZES
            .iter()
            .map(|&n| Queue::new(n).unwrap())
            .collect();
        for (i, q) in queues.iter_mut().enumerate() {
            let base = 0x10_0000 * (i as u32 + 1);
            q.set_size(8);
            q.set_desc_table_address(Some(base), Some(0));
            q.set_avail_ring_address(Some(base + 0x1000), Some(0));
            q.set_used_ring_address(Some(base + 0x2000), Some(0));
            q.set_ready(true);
        }
        fs.activate(VIRTIO_F_VERSION_1, &queues, &mem).unwrap();
        fs.reset();
        // A reset with nothing started sends nothing.
        fs.reset();
        drop(fs);
        backend.join().unwrap();

        let r = rec.lock().unwrap();
        let mut want: Vec<String> = [
            "SET_OWNER",
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES 0x9",
            "GET_QUEUE_NUM",
            "SET_FEATURES 0x140000000",
            "SET_MEM_TABLE 1 1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for i in 0..2 {
            want.extend([
                format!("SET_VRING_NUM {i} 8"),
                format!("SET_VRING_ADDR {i}"),
                format!("SET_VRING_BASE {i} 0"),
                format!("SET_VRING_CALL {i} true"),
                format!("SET_VRING_KICK {i} true"),
                format!("SET_VRING_ENABLE {i} true"),
            ]);
        }
        for i in 0..2 {
            want.extend([
                format!("SET_VRING_ENABLE {i} false"),
                format!("GET_VRING_BASE {i}"),
            ]);
        }
        assert_eq!(r.log, want);
        // Guest RAM by its memfd: guest address, size, where we mapped it, file offset.
        let region = mem.iter().next().unwrap();
        let host = region.as_ptr() as u64;
        assert_eq!(r.regions, vec![(0, 32 << 20, host, 0)]);
        // Rings by our addresses, not guest physical ones.
        assert_eq!(
            r.rings,
            vec![
                (0, host + 0x10_0000, host + 0x10_2000, host + 0x10_1000),
                (1, host + 0x20_0000, host + 0x20_2000, host + 0x20_1000),
            ]
        );
    }

    #[test]
    fn connect_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nobody-listens.sock");
        let e = Fs::connect("myfs", &sock).err().unwrap().to_string();
        assert!(
            e.contains("nobody-listens.sock") && e.contains("myfs"),
            "{e}"
        );
    }
}
