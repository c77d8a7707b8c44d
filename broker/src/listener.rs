//! Where client connections come from: TCP ports and, optionally, a Unix
//! domain socket.
//!
//! The socket exists for local clients. `axion serve`'s own queue owner,
//! bridge and heartbeat exchange several messages per queued task with the
//! broker; over a Unix socket each skips the loopback TCP stack. Operators
//! get it too (`mosquitto_sub --unix PATH`). A session does not care which
//! kind it got: both give it a byte stream and a peer address for logs.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// The peer address a Unix socket connection is logged and counted under.
/// It is a loopback address: such a client is on this machine.
pub const UNIX_PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// A bound listener of either kind.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection of either kind.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    pub(crate) async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| (Stream::Tcp(s), peer)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| (Stream::Unix(s), UNIX_PEER)),
        }
    }
}

/// Binds a Unix socket at `path`. A socket file left by a broker that died
/// (nothing answers on it) is replaced; a live one, or a file that is not
/// a socket, is an error rather than something to delete.
pub(crate) async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ))
            }
            Err(_) => std::fs::remove_file(path)?,
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not replacing it",
            ))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    UnixListener::bind(path)
}
