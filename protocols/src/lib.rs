//! The Janus agent API (`proto/agent.proto`): messages and async ttrpc client/server code,
//! generated at build time, shared by `runtime::vm` (host) and `vm-agent` (guest).

#[allow(
    clippy::all,
    nonstandard_style,
    unused_imports,
    unused_mut,
    unused_qualifications,
    dead_code,
    missing_docs
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    nonstandard_style,
    unused_imports,
    unused_mut,
    unused_qualifications,
    dead_code,
    missing_docs
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use agent_ttrpc::{create_agent, Agent, AgentClient};

/// Frame header on the stdio channel: stream id (u32 LE), flags (u32 LE), payload length
/// (u32 LE), then the payload. One channel carries every process stream of a VM.
pub mod stdio_frame {
    pub const HEADER: usize = 12;
    /// The sender closed this stream (EOF); no payload.
    pub const FLAG_EOF: u32 = 1;
    /// Largest payload per frame; bigger writes are split.
    pub const MAX_PAYLOAD: usize = 64 * 1024;

    pub fn encode_header(stream: u32, flags: u32, len: usize) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..4].copy_from_slice(&stream.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        h
    }

    /// Returns (stream, flags, payload length), or None for a malformed header.
    pub fn decode_header(h: &[u8; HEADER]) -> Option<(u32, u32, usize)> {
        let stream = u32::from_le_bytes(h[0..4].try_into().ok()?);
        let flags = u32::from_le_bytes(h[4..8].try_into().ok()?);
        let len = u32::from_le_bytes(h[8..12].try_into().ok()?) as usize;
        (len <= MAX_PAYLOAD && stream != 0).then_some((stream, flags, len))
    }
}

#[cfg(test)]
mod tests {
    use super::agent::*;
    use super::stdio_frame::*;
    use protobuf::Message;

    #[test]
    fn messages_round_trip() {
        let req = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec: b"{}".to_vec(),
            stdio: protobuf::MessageField::some(StdioStreams {
                stdout: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = req.write_to_bytes().unwrap();
        let back = CreateContainerRequest::parse_from_bytes(&b).unwrap();
        assert_eq!(back.container_id, "c1");
        assert_eq!(back.stdio.stdout, 3);
    }

    #[test]
    fn frames() {
        let h = encode_header(7, FLAG_EOF, 0);
        assert_eq!(decode_header(&h), Some((7, FLAG_EOF, 0)));
        assert_eq!(decode_header(&encode_header(0, 0, 1)), None);
        assert_eq!(decode_header(&encode_header(1, 0, MAX_PAYLOAD + 1)), None);
    }
}
