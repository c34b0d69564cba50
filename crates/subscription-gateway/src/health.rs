//! `/healthz` and `/readyz` on a listener and a thread of their own (`HEALTH_LISTEN_ADDR`).
//!
//! The HTTP server's workers are the threads that write fan-out into sockets. Past capacity
//! they are always busy, and a probe queued behind a delivery round answered in seconds: a
//! liveness probe with a 2 s timeout would then restart an overloaded gateway and push its
//! sockets onto the others, which are as loaded. Here a plain thread accepts, reads one request
//! and answers it from two atomics; the operating system schedules it between the workers
//! whatever they do. The main listener still answers both paths, for setups without this one.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use serde_json::{json, Value};

use crate::state::GatewayState;

/// How long one probe may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest request head read; a probe's is a few hundred bytes.
const MAX_HEAD: usize = 4096;

/// Whether the gateway takes new subscribers, and the body that says why (or why not).
pub fn readiness(state: &GatewayState) -> (bool, Value) {
    let redis = if state.shared.hub.is_connected() {
        "ok"
    } else {
        "event connection to Redis is down; reconnecting"
    };
    let revocations = match state.shared.verifier.revocations() {
        Some(list) if !list.is_loaded() => "the logout cutoffs have not been read from Redis yet",
        _ => "ok",
    };
    let draining = state.shared.shutdown.is_cancelled();
    let ready = redis == "ok" && revocations == "ok" && !draining;
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {"redis": redis, "revocations": revocations, "draining": draining},
    });
    (ready, body)
}

/// The health listener's thread; stopping it closes the listener.
pub struct HealthServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl HealthServer {
    /// Serves `listener` on a thread of its own until [`HealthServer::stop`].
    pub fn spawn(
        listener: TcpListener,
        state: web::Data<GatewayState>,
    ) -> std::io::Result<HealthServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("gateway-health".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    // A failed accept (the client gave up, descriptors exhausted) ends nothing.
                    if let Ok(stream) = stream {
                        answer(stream, &state);
                    }
                }
            })?;
        Ok(HealthServer { addr, stop })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Ends the thread: the flag, then a connection that wakes its blocked accept.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, IO_TIMEOUT);
    }
}

/// Reads one request head and answers it; the connection closes after the answer.
fn answer(mut stream: TcpStream, state: &GatewayState) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut words = std::str::from_utf8(line)
        .unwrap_or_default()
        .split_whitespace();
    let (method, path) = (words.next(), words.next());
    let http = words
        .next()
        .is_some_and(|version| version.starts_with("HTTP/"));
    let path = path
        .filter(|_| http)
        .map(|p| p.split('?').next().unwrap_or(p));
    let (status, body) = match (method, path) {
        (Some("GET" | "HEAD"), Some("/healthz")) => ("200 OK", json!({"status": "ok"})),
        (Some("GET" | "HEAD"), Some("/readyz")) => match readiness(state) {
            (true, body) => ("200 OK", body),
            (false, body) => ("503 Service Unavailable", body),
        },
        (Some("GET" | "HEAD"), Some(_)) => (
            "404 Not Found",
            json!({"detail": "this listener serves /healthz and /readyz only", "code": "not_found"}),
        ),
        (Some(_), Some(_)) => (
            "405 Method Not Allowed",
            json!({"detail": "use GET", "code": "method_not_allowed"}),
        ),
        _ => (
            "400 Bad Request",
            json!({"detail": "not an HTTP/1.1 request", "code": "bad_request"}),
        ),
    };
    let body = body.to_string();
    let head_only = method == Some("HEAD");
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { &body }
    );
    let _ = stream.write_all(response.as_bytes());
}
