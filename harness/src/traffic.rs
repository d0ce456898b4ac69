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
        Server::spawn(Some(Box::new(ns.enterer())), ns.name(), proto, bind)
    }

    /// Starts a server in the calling process's own namespace (`portfwd-lab serve`).
    pub fn start_here(proto: Proto, bind: SocketAddr) -> Result<Server, LabError> {
        Server::spawn(None, "this namespace", proto, bind)
    }

    fn spawn(
        enter: Option<EnterFn>,
        ns_name: &str,
        proto: Proto,
        bind: SocketAddr,
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
                        serve_tcp(listener, &flag);
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
                        serve_udp(socket, &flag);
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

fn serve_tcp(listener: TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                std::thread::spawn(move || answer_lines(stream, peer.ip().to_canonical()));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Replies to each line with the peer address, until EOF or 30 s of silence.
fn answer_lines(stream: TcpStream, peer: IpAddr) {
    let _ = stream.set_nonblocking(false);
    // One small answer per request: without NODELAY, Nagle and delayed ACKs add ~40 ms.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        if line.is_err() || writeln!(writer, "{peer}").is_err() {
            return;
        }
    }
}

fn serve_udp(socket: UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(peer.ip().to_canonical().to_string().as_bytes(), peer);
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
    text.trim()
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
        parse_seen(&line)
    }
}
