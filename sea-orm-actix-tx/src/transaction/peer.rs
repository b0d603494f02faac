//! Whether the client is still connected, asked just before a commit.
//!
//! actix-web 4 keeps running a handler after its client has gone away, and nothing tells the
//! handler. So that work nobody will hear about is not committed, the server keeps a duplicate
//! of each connection's socket ([`on_connect`]) and the middleware peeks at it before `COMMIT`
//! ([`client_gone`]). Peeking consumes nothing, so actix's own reading is undisturbed. A
//! transaction whose end changes nothing (a read whose `COMMIT` is not awaited,
//! `Slot::end_changes_nothing`) is not checked: committing it or not is the same.
//!
//! A client that half-closes its side of the connection (shuts down writing) while it waits for
//! the answer counts as gone; HTTP clients do not do that. A client that leaves after the check
//! and before the commit completes cannot be told apart from one that leaves just after it.

use std::any::Any;
use std::io::ErrorKind;
use std::net::TcpStream;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;

/// A duplicate of the connection's socket, kept in the connection's data; closed with it.
struct ClientSocket(TcpStream);

/// Register with `HttpServer::on_connect(transaction::on_connect)`. Without it the middleware
/// cannot see a client leave and commits as if it were still there.
pub fn on_connect(connection: &dyn Any, data: &mut Extensions) {
    #[cfg(unix)]
    if let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsFd;
        match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                data.insert(ClientSocket(TcpStream::from(fd)));
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the client's connection"),
        }
    }
    #[cfg(not(unix))]
    let _ = (connection, data);
}

/// `true` when the client has closed or reset its connection. The socket is non-blocking (it
/// shares its file description with the server's), so the peek never waits: "nothing to read"
/// or pipelined bytes both mean the client is there.
pub fn client_gone(req: &HttpRequest) -> bool {
    let Some(ClientSocket(socket)) = req.conn_data::<ClientSocket>() else {
        return false;
    };
    let mut byte = [0u8; 1];
    match socket.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    }
}
