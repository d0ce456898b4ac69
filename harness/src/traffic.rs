//! Echo servers and probes that run inside namespaces, with no external tools.
//!
//! A server answers every line (TCP) or datagram (UDP) with the peer address it saw, which is
//! how a test proves whether the backend sees the client or the proxy. `setns` moves only the
//! calling thread, so each server and probe starts on a thread of its own, enters the
//! namespace, and creates its socket there; the socket stays in that namespace afterwards.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::{LabError, Netns};

/// Probes give up after this long: a missing forward fails fast instead of hanging.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

type EnterFn = Box<dyn FnOnce() -> Result<(), LabError> + Send>;

/// An echo server running in a namespace until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts a server bound to `bind` inside `ns`; returns once it listens.
    pub fn start(ns: &Netns, proto: Proto, bind: SocketAddr) -> Result<Server, LabError> {
        Server::spawn(Some(Box::new(ns.enterer())), ns.name(), proto, bind, None)
    }

    /// Like [`Server::start`], answering `PEER NAME`, so a test can tell which of two
    /// targets a flow reached.
    pub fn start_named(
        ns: &Netns,
        proto: Proto,
        bind: SocketAddr,
        name: &str,
    ) -> Result<Server, LabError> {
        Server::spawn(
            Some(Box::new(ns.enterer())),
            ns.name(),
            proto,
            bind,
            Some(name.to_string()),
        )
    }

    /// Starts a server in the calling process's own namespace (`portfwd-lab serve`).
    pub fn start_here(proto: Proto, bind: SocketAddr) -> Result<Server, LabError> {
        Server::spawn(None, "this namespace", proto, bind, None)
    }

    fn spawn(
        enter: Option<EnterFn>,
        ns_name: &str,
        proto: Proto,
        bind: SocketAddr,
        name: Option<String>,
    ) -> Result<Server, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let ns_name = ns_name.to_string();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            if let Some(Err(e)) = enter.map(|enter| enter()) {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
            match proto {
                Proto::Tcp => match TcpListener::bind(bind)
                    .and_then(|l| l.set_nonblocking(true).map(|_| l))
                {
                    Ok(listener) => {
                        let _ = ready_tx.send(Ok(()));
                        serve_tcp(listener, &flag, name);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind tcp {bind} in {ns_name}: {e}")));
                    }
                },
                Proto::Udp => match UdpSocket::bind(bind).and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(50)))
                        .map(|_| s)
                }) {
                    Ok(socket) => {
                        let _ = ready_tx.send(Ok(()));
                        serve_udp(socket, &flag, name.as_deref());
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind udp {bind} in {ns_name}: {e}")));
                    }
                },
            }
        });
        match ready_rx.recv_timeout(PROBE_TIMEOUT) {
            Ok(Ok(())) => Ok(Server {
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => Err(LabError::Traffic(e)),
            Err(_) => Err(LabError::Traffic(format!("server on {bind} did not start"))),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// What a server answers: the peer address, then its name when it has one.
fn answer(peer: IpAddr, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{peer} {n}"),
        None => peer.to_string(),
    }
}

fn serve_tcp(listener: TcpListener, stop: &AtomicBool, name: Option<String>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let text = answer(peer.ip().to_canonical(), name.as_deref());
                std::thread::spawn(move || answer_lines(stream, text));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Replies to each line with `text`, until EOF or 30 s of silence.
fn answer_lines(stream: TcpStream, text: String) {
    let _ = stream.set_nonblocking(false);
    // One small answer per request: without NODELAY, Nagle and delayed ACKs add ~40 ms.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        if line.is_err() || writeln!(writer, "{text}").is_err() {
            return;
        }
    }
}

fn serve_udp(socket: UdpSocket, stop: &AtomicBool, name: Option<&str>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let text = answer(peer.ip().to_canonical(), name);
            let _ = socket.send_to(text.as_bytes(), peer);
        }
    }
}

/// Connects from inside `ns` to `target` and returns the address the server saw.
pub fn probe(ns: &Netns, proto: Proto, target: SocketAddr) -> Result<IpAddr, LabError> {
    match proto {
        Proto::Tcp => TcpSession::connect(ns, target)?.ask(),
        Proto::Udp => {
            let enter = ns.enterer();
            let unspecified: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .map_err(|_| LabError::Traffic("bad bind".into()))?;
            let socket = std::thread::spawn(move || {
                enter()?;
                UdpSocket::bind(unspecified)
                    .map_err(|e| LabError::Traffic(format!("udp bind: {e}")))
            })
            .join()
            .map_err(|_| LabError::Traffic("probe thread panicked".into()))??;
            let io = |e: std::io::Error| LabError::Traffic(format!("udp probe to {target}: {e}"));
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(io)?;
            let mut buf = [0u8; 256];
            // UDP may lose the first datagram while neighbours resolve: try a few times.
            for _ in 0..6 {
                socket.send_to(b"probe", target).map_err(io)?;
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    return parse_seen(&String::from_utf8_lossy(&buf[..n]));
                }
            }
            Err(LabError::Traffic(format!(
                "udp probe to {target}: no answer"
            )))
        }
    }
}

fn parse_seen(text: &str) -> Result<IpAddr, LabError> {
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| LabError::Traffic(format!("server answered {text:?}, not an address")))
}

/// A TCP connection made from inside a namespace, kept open to ask several times (to show a
/// connection survives a change).
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    target: SocketAddr,
}

impl TcpSession {
    pub fn connect(ns: &Netns, target: SocketAddr) -> Result<TcpSession, LabError> {
        let enter = ns.enterer();
        let stream = std::thread::spawn(move || {
            enter()?;
            TcpStream::connect_timeout(&target, PROBE_TIMEOUT)
                .map_err(|e| LabError::Traffic(format!("tcp connect to {target}: {e}")))
        })
        .join()
        .map_err(|_| LabError::Traffic("probe thread panicked".into()))??;
        let io = |e: std::io::Error| LabError::Traffic(format!("tcp to {target}: {e}"));
        stream.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(TcpSession {
            reader: BufReader::new(stream),
            writer,
            target,
        })
    }

    /// Sends one line; returns the address the server saw.
    pub fn ask(&mut self) -> Result<IpAddr, LabError> {
        parse_seen(&self.ask_text()?)
    }

    /// Sends one line; returns the server's answer (`PEER [NAME]`: which server of several
    /// answered, see [`Server::start_named`]).
    pub fn ask_text(&mut self) -> Result<String, LabError> {
        let target = self.target;
        let io = |e: std::io::Error| LabError::Traffic(format!("tcp to {target}: {e}"));
        writeln!(self.writer, "probe").map_err(io)?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(io)?;
        if n == 0 {
            return Err(LabError::Traffic(format!(
                "tcp to {target}: connection closed"
            )));
        }
        Ok(line.trim_end().to_string())
    }
}

/// One long-lived UDP flow: a socket bound to a fixed source port inside a namespace, talking
/// to one target, the way a game client, a VPN or a syslog sender keeps one flow alive.
pub struct UdpFlow {
    socket: UdpSocket,
    target: SocketAddr,
}

impl UdpFlow {
    pub fn open(ns: &Netns, bind: SocketAddr, target: SocketAddr) -> Result<UdpFlow, LabError> {
        let enter = ns.enterer();
        let socket = std::thread::spawn(move || {
            enter()?;
            UdpSocket::bind(bind).map_err(|e| LabError::Traffic(format!("udp bind {bind}: {e}")))
        })
        .join()
        .map_err(|_| LabError::Traffic("probe thread panicked".into()))??;
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .map_err(|e| LabError::Traffic(format!("udp {bind}: {e}")))?;
        Ok(UdpFlow { socket, target })
    }

    /// Sends one datagram and returns the answer (`PEER [NAME]`), or None when none came
    /// within a second. Stale answers of earlier datagrams are drained first.
    pub fn ask(&self) -> Result<Option<String>, LabError> {
        let mut buf = [0u8; 256];
        let _ = self.socket.set_nonblocking(true);
        while self.socket.recv_from(&mut buf).is_ok() {}
        let _ = self.socket.set_nonblocking(false);
        let io = |e: std::io::Error| LabError::Traffic(format!("udp to {}: {e}", self.target));
        for _ in 0..3 {
            self.socket.send_to(b"probe", self.target).map_err(io)?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, _)) => return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                // ICMP port unreachable from an earlier datagram: nobody answered.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(io(e)),
            }
        }
        Ok(None)
    }
}
