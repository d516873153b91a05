//! The host end of the stdio data plane: every process stream of a VM multiplexed as frames
//! (`protocols::stdio_frame`) on one channel, routed here to one receiver per stream.
//!
//! Subscribe to a stream before the process that writes it is created: frames for a stream
//! nobody listens to are dropped.
//!
//! Each stream's queue is bounded ([`STREAM_QUEUE`] frames). A consumer that stops taking its
//! stream's data (containerd no longer reading a FIFO) makes the reader wait once that queue
//! is full: backpressure, as a host process blocks on a full pipe, rather than memory growth.
//! The streams of one VM share the channel, so that wait holds the VM's other streams too
//! until the consumer reads again; the guest side (agent, VMM) bounds its queues the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use protocols::stdio_frame::{decode_header, encode_header, FLAG_EOF, HEADER, MAX_PAYLOAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Frames queued per stream before the reader waits for its consumer.
pub const STREAM_QUEUE: usize = 256;

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>>;

/// Cheap to clone; the reader task ends when the channel closes (VM gone).
#[derive(Clone)]
pub struct StdioPlane {
    routes: Routes,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    next: Arc<AtomicU32>,
}

impl StdioPlane {
    pub fn new(stream: UnixStream) -> StdioPlane {
        let (mut rd, wr) = stream.into_split();
        let routes: Routes = Arc::default();
        let r2 = routes.clone();
        tokio::spawn(async move {
            let mut h = [0u8; HEADER];
            loop {
                if rd.read_exact(&mut h).await.is_err() {
                    break;
                }
                let Some((stream, flags, len)) = decode_header(&h) else {
                    log::warn!("stdio plane: malformed frame header; channel closed");
                    break;
                };
                let mut data = vec![0u8; len];
                if rd.read_exact(&mut data).await.is_err() {
                    break;
                }
                let route = r2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&stream)
                    .cloned();
                if let (false, Some(tx)) = (data.is_empty(), route) {
                    // Waits while the stream's queue is full; fails only if the consumer is
                    // gone, and then the data has nobody to go to.
                    let _ = tx.send(data).await;
                }
                if flags & FLAG_EOF != 0 {
                    r2.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
                }
            }
            // The VM is gone: every stream ends.
            r2.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        StdioPlane {
            routes,
            writer: Arc::new(tokio::sync::Mutex::new(wr)),
            next: Arc::new(AtomicU32::new(1)),
        }
    }

    /// A fresh stream id (never 0, which means "no stream").
    pub fn alloc(&self) -> u32 {
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// The stream's data, in order; the receiver ends at the stream's EOF frame.
    pub fn subscribe(&self, stream: u32) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stream, tx);
        rx
    }

    /// Stops routing a stream (its receiver ends).
    pub fn unsubscribe(&self, stream: u32) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream);
    }

    /// Sends data to a process's stdin stream.
    pub async fn write(&self, stream: u32, data: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        for chunk in data.chunks(MAX_PAYLOAD) {
            let mut frame = Vec::with_capacity(HEADER + chunk.len());
            frame.extend_from_slice(&encode_header(stream, 0, chunk.len()));
            frame.extend_from_slice(chunk);
            w.write_all(&frame).await?;
        }
        Ok(())
    }

    /// Ends a stdin stream after the data sent before it.
    pub async fn close(&self, stream: u32) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(&encode_header(stream, FLAG_EOF, 0)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn routes_frames_and_eof() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let plane = StdioPlane::new(a);
        let s1 = plane.alloc();
        let s2 = plane.alloc();
        assert_ne!(s1, s2);
        let mut r1 = plane.subscribe(s1);
        let mut r2 = plane.subscribe(s2);
        let mut raw = Vec::new();
        for (s, f, d) in [
            (s1, 0, &b"one"[..]),
            (s2, 0, b"two"),
            (99, 0, b"lost"),
            (s1, FLAG_EOF, b""),
        ] {
            raw.extend_from_slice(&encode_header(s, f, d.len()));
            raw.extend_from_slice(d);
        }
        b.write_all(&raw).await.unwrap();
        assert_eq!(r1.recv().await.unwrap(), b"one");
        assert!(r1.recv().await.is_none(), "EOF ends the stream");
        assert_eq!(r2.recv().await.unwrap(), b"two");
        drop(b);
        assert!(r2.recv().await.is_none(), "channel close ends every stream");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_stream_holds_the_reader_until_its_consumer_reads() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let plane = StdioPlane::new(a);
        let (s1, s2) = (plane.alloc(), plane.alloc());
        let mut r1 = plane.subscribe(s1);
        let mut r2 = plane.subscribe(s2);
        let mut raw = Vec::new();
        for i in 0..STREAM_QUEUE + 1 {
            let d = (i as u32).to_le_bytes();
            raw.extend_from_slice(&encode_header(s1, 0, d.len()));
            raw.extend_from_slice(&d);
        }
        raw.extend_from_slice(&encode_header(s2, 0, 3));
        raw.extend_from_slice(b"two");
        b.write_all(&raw).await.unwrap();
        // s1's queue fills; the frame after it (and s2's) wait, nothing is dropped.
        tokio::task::yield_now().await;
        let pending = tokio::time::timeout(std::time::Duration::from_millis(200), r2.recv());
        assert!(pending.await.is_err(), "s2 got data past a full s1 queue");
        for i in 0..STREAM_QUEUE + 1 {
            assert_eq!(r1.recv().await.unwrap(), (i as u32).to_le_bytes());
        }
        assert_eq!(r2.recv().await.unwrap(), b"two");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_are_framed_and_chunked() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let plane = StdioPlane::new(a);
        let big = vec![7u8; MAX_PAYLOAD + 10];
        plane.write(5, &big).await.unwrap();
        plane.close(5).await.unwrap();
        let mut got = Vec::new();
        loop {
            let mut h = [0u8; HEADER];
            b.read_exact(&mut h).await.unwrap();
            let (s, f, len) = decode_header(&h).unwrap();
            assert_eq!(s, 5);
            let mut d = vec![0u8; len];
            b.read_exact(&mut d).await.unwrap();
            got.push((f, len));
            if f & FLAG_EOF != 0 {
                break;
            }
        }
        assert_eq!(got, vec![(0, MAX_PAYLOAD), (0, 10), (FLAG_EOF, 0)]);
    }
}
