//! systemd's readiness protocol (sd_notify): a datagram to $NOTIFY_SOCKET.
//! `READY=1` once the service serves; during a hand-over the process that
//! leaves says `MAINPID=<successor>`, so that systemd follows the new
//! process (the unit has `Type=notify` and `NotifyAccess=all`). Without
//! systemd the variable is unset and nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `MAINPID=1234`, `STATUS=...`); failures are
/// only logged: a service runs the same with or without a supervisor.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket: '@' stands for the leading NUL.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(err) = sent {
        tracing::warn!("telling the service manager '{state}': {err}");
    }
}
