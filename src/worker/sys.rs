//! The one place the driver calls into libc directly.

use crate::shard::Shut;
use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

/// Lets any task of this core shut down a socket whose read and write halves
/// are owned by two other tasks (a session's reader and writer, or a backend
/// stream's reader and writer).
///
/// Ownership: the descriptor belongs to the halves; it is closed when the last
/// of them is dropped. Each owning task holds a [`HalfGuard`] declared
/// before its half, so the guard is released in the same synchronous step in
/// which the half is dropped; once both guards are gone, `shutdown` does
/// nothing. A shutdown therefore only ever reaches the descriptor while it is
/// open and still this socket's: never a closed or reused number.
pub(crate) struct SocketShutdown {
    fd: RawFd,
    /// Halves still alive.
    halves: Cell<u8>,
}

impl SocketShutdown {
    /// A handle on `sock`, which is about to be split into two owned halves.
    pub(crate) fn new(sock: &impl AsRawFd) -> Rc<SocketShutdown> {
        Rc::new(SocketShutdown { fd: sock.as_raw_fd(), halves: Cell::new(2) })
    }

    /// A handle on `sock`, which one task owns whole (an HTTP/2 connection).
    pub(crate) fn single(sock: &impl AsRawFd) -> Rc<SocketShutdown> {
        Rc::new(SocketShutdown { fd: sock.as_raw_fd(), halves: Cell::new(1) })
    }

    /// Shuts down one or both directions; wakes the tasks blocked on them.
    pub(crate) fn shutdown(&self, how: Shut) {
        if self.halves.get() == 0 {
            return;
        }
        let how = match how {
            Shut::Read => libc::SHUT_RD,
            Shut::Both => libc::SHUT_RDWR,
            // The writer half-closes itself once its queue is written.
            Shut::Write => return,
        };
        // SAFETY: `halves > 0`, so at least one owned half of the socket is
        // alive and `fd` is open and refers to this socket (see the type's
        // docs). shutdown(2) takes no pointers; its failure (ENOTCONN after
        // the peer left) needs no handling.
        unsafe { libc::shutdown(self.fd, how) };
    }
}

/// Held by a task for as long as it owns one half of the socket.
pub(crate) struct HalfGuard(pub(crate) Rc<SocketShutdown>);

impl Drop for HalfGuard {
    fn drop(&mut self) {
        self.0.halves.set(self.0.halves.get().saturating_sub(1));
    }
}

/// shutdown(2) on a socket the caller holds: the reference proves the
/// descriptor is open and this socket's.
pub(crate) fn shutdown(sock: &impl AsRawFd, how: std::net::Shutdown) -> std::io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: `sock` is borrowed for the call, so its descriptor is open;
    // shutdown(2) takes no pointers.
    if unsafe { libc::shutdown(sock.as_raw_fd(), how) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_LINGER` {on, 0} on a client socket the overload manager sheds: its
/// close resets the connection and the kernel frees the bytes it queued for a
/// client that does not read, at once, instead of holding them behind a FIN.
/// `fd` is the socket of a `ClientIo` the caller holds.
pub(crate) fn set_linger_zero(fd: std::os::fd::RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `fd` is open for the call (its owner is borrowed by the
    // caller); `l` is a valid linger value for the option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// `SO_SNDBUF` on a new client socket (`limits.client_send_buffer`): bounds
/// what the kernel queues for a client that does not read (the kernel's own
/// sizing grows it to megabytes). `fd` is the socket of a `ClientIo` the
/// caller holds.
pub(crate) fn set_send_buffer(fd: std::os::fd::RawFd, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `fd` is open for the call; `v` is a valid int option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
