//! A WebSocket carrying MQTT, as the byte stream the broker's sessions
//! read and write (`AsyncRead` + `AsyncWrite`).
//!
//! MQTT over WebSocket is the MQTT byte stream in binary frames: a packet
//! may span frames and a frame may hold several packets, so frames are
//! only a transport here and the session frames packets itself. The
//! reader hands out the bytes of the binary frames in order, as many
//! frames per read as have arrived; the writer sends each write as one
//! binary frame of at most [`MAX_OUT_FRAME`] bytes.
//!
//! tokio-util's `StreamReader` and `SinkWriter` do most of this for any
//! stream and sink, but not what a peer must see at the end: a close frame
//! with a code saying why (1003 for a text frame, 1009 for a message over
//! the limit, 1002 for a broken frame), a close frame at all when the
//! session drops its streams after refusing a connection (which happens
//! before any shutdown), and the peer's own close frame read before the
//! socket closes (else the peer sees a reset). Nor do they bound the size
//! of outgoing frames whatever the session writes at once. Hence this
//! module.
//!
//! Memory is bounded by the WebSocket layer's limits: the reader holds at
//! most one frame (`max_message_size`), and the writer one frame beyond
//! tungstenite's write buffer, which only grows while the socket does not
//! take what it is given, and then stops taking writes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest binary frame the writer sends: a long write goes out as
/// several frames, so no peer needs a buffer of the session's whole
/// backlog to read one.
pub const MAX_OUT_FRAME: usize = 64 * 1024;

/// Close codes (RFC 6455, 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_TOO_BIG: u16 = 1009;

/// Once the session has let go of a half: how long our close frame may
/// take to go out, and the peer's to come in.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Splits an upgraded WebSocket into the session's reader and writer.
/// Both halves are `Sync` (the session needs it), which the WebSocket
/// itself is not; its split halves are.
pub fn split(socket: WebSocket, peer: SocketAddr) -> (WsReader, WsWriter) {
    let (sink, stream) = futures_util::StreamExt::split(socket);
    let close = Arc::new(AtomicU16::new(CLOSE_NORMAL));
    (
        WsReader {
            stream: Some(stream),
            pending: Bytes::new(),
            state: ReadState::Open,
            failed: None,
            close: close.clone(),
            peer,
        },
        WsWriter {
            sink: Some(sink),
            closing: false,
            close,
        },
    )
}

/// The incoming MQTT byte stream: the payloads of the binary frames, in
/// order. A close frame or the end of the connection is the end of the
/// stream; a text frame is an error (MQTT is binary), and the writer then
/// closes with 1003.
pub struct WsReader {
    /// `None` only once dropped.
    stream: Option<SplitStream<WebSocket>>,
    /// What is left of the current frame.
    pending: Bytes,
    state: ReadState,
    /// Why the stream ended, for the read after the data before it.
    failed: Option<io::Error>,
    /// The close code the writer sends (shared with it).
    close: Arc<AtomicU16>,
    peer: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// A text frame came: the stream has ended for the session, but the
    /// peer has not closed yet.
    Refused,
    /// The peer closed, or the connection failed: nothing more will come.
    Done,
}

impl AsyncRead for WsReader {
    /// Fills `buf` with as many frames as have already arrived, not just
    /// one: clients send one packet per frame, and the session handles
    /// what one read gave it in one go, as it does a TCP read.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut filled = false;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                filled = true;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // What came before an error or the end is handed over first.
            if filled && this.failed.is_some() {
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = this.failed.take() {
                return Poll::Ready(Err(error));
            }
            let Some(stream) = this
                .stream
                .as_mut()
                .filter(|_| this.state == ReadState::Open)
            else {
                return Poll::Ready(Ok(()));
            };
            let next = match Pin::new(stream).poll_next(cx) {
                Poll::Ready(next) => next,
                Poll::Pending if filled => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            };
            match next {
                Some(Ok(Message::Binary(bytes))) => this.pending = bytes,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.state = ReadState::Done,
                Some(Ok(Message::Text(_))) => {
                    this.state = ReadState::Refused;
                    this.close.store(CLOSE_UNSUPPORTED_DATA, Ordering::Relaxed);
                    tracing::info!(peer = %this.peer, "text frame on MQTT over WebSocket; closing the connection (1003)");
                    this.failed = Some(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame: MQTT over WebSocket takes binary frames only",
                    ));
                }
                Some(Err(error)) => {
                    this.state = ReadState::Done;
                    let error = error.into_inner();
                    let code = match error.downcast_ref::<tungstenite::Error>() {
                        Some(tungstenite::Error::Capacity(_)) => Some(CLOSE_TOO_BIG),
                        Some(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => {
                            Some(CLOSE_PROTOCOL_ERROR)
                        }
                        // The connection failed: no close frame will get through.
                        _ => None,
                    };
                    if let Some(code) = code {
                        this.close.store(code, Ordering::Relaxed);
                        tracing::info!(peer = %this.peer, code, %error, "MQTT over WebSocket: bad frame; closing the connection");
                    }
                    this.failed = Some(io::Error::other(error));
                }
            }
        }
    }
}

impl Drop for WsReader {
    /// The session drops its reader when it ends, usually right after the
    /// writer sent the close frame. Closing the socket with the peer's
    /// close frame (or anything else) unread would reset the connection,
    /// and the peer would see an error instead of a clean close: what
    /// still comes is read and discarded until the peer closes, within
    /// [`CLOSE_GRACE`], from a task of its own since a drop cannot wait.
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        if self.state == ReadState::Done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                while let Some(Ok(message)) = futures_util::StreamExt::next(&mut stream).await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// The outgoing MQTT byte stream, in binary frames. Shutting it down sends
/// a close frame; so does dropping it without a shutdown.
pub struct WsWriter {
    /// `None` once closed.
    sink: Option<SplitSink<WebSocket, Message>>,
    /// The close frame has been queued.
    closing: bool,
    close: Arc<AtomicU16>,
}

impl WsWriter {
    fn sink(&mut self) -> io::Result<&mut SplitSink<WebSocket, Message>> {
        self.sink
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

fn close_frame(code: u16) -> Message {
    let reason = match code {
        CLOSE_UNSUPPORTED_DATA => "MQTT over WebSocket takes binary frames only",
        CLOSE_TOO_BIG => "message over the size limit",
        CLOSE_PROTOCOL_ERROR => "WebSocket protocol error",
        _ => "",
    };
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

impl AsyncWrite for WsWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let sink = self.sink()?;
        ready!(Pin::new(&mut *sink).poll_ready(cx)).map_err(io::Error::other)?;
        let n = buf.len().min(MAX_OUT_FRAME);
        Pin::new(sink)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(sink) = self.sink.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        Pin::new(sink).poll_flush(cx).map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let code = self.close.load(Ordering::Relaxed);
        let closing = self.closing;
        let Some(sink) = self.sink.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if !closing {
            ready!(Pin::new(&mut *sink).poll_ready(cx)).map_err(io::Error::other)?;
            let queued = Pin::new(&mut *sink).start_send(close_frame(code));
            // Tried once: a peer that closed first takes no close frame.
            self.closing = true;
            queued.map_err(io::Error::other)?;
        }
        let Some(sink) = self.sink.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let closed = ready!(Pin::new(sink).poll_close(cx));
        self.sink = None;
        Poll::Ready(closed.map_err(io::Error::other))
    }
}

impl Drop for WsWriter {
    /// The session drops its streams without a shutdown when it refuses a
    /// connection before the CONNACK (malformed first packet, no CONNECT
    /// in time): the peer still gets a close frame rather than a bare TCP
    /// close, sent from a task of its own since a drop cannot wait.
    fn drop(&mut self) {
        let Some(mut sink) = self.sink.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let frame = (!self.closing).then(|| close_frame(self.close.load(Ordering::Relaxed)));
        runtime.spawn(async move {
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                if let Some(frame) = frame {
                    sink.send(frame).await?;
                }
                sink.close().await
            })
            .await;
        });
    }
}
