//! A QMP (QEMU Machine Protocol) connection: JSON lines on QEMU's control socket. The QEMU
//! driver uses it to know when QEMU's devices exist; [`ProcessVm::qmp`](super::ProcessVm::qmp)
//! runs later commands.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub(super) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    pub(super) fn new(s: UnixStream) -> Self {
        let (r, w) = s.into_split();
        Qmp {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Sends a command and returns its `return` value; skips the greeting and events.
    pub(super) async fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> std::io::Result<serde_json::Value> {
        let mut req = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let mut buf = String::new();
            if self.reader.read_line(&mut buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let v: serde_json::Value = serde_json::from_str(&buf).map_err(std::io::Error::other)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("QMP {command}: {e}")));
            }
            // {"QMP": ...} greeting or {"event": ...}: keep reading.
        }
    }
}
