//! A fault-injecting TCP proxy: a stack's processes connect to the proxy's port instead of
//! the real service, and a scenario degrades the link while traffic flows:
//!
//! - **latency**: every chunk is held this long before it is forwarded (each direction);
//! - **reset**: every open connection is closed with a TCP RST (`SO_LINGER 0`), as a crashed
//!   middlebox or a NAT timeout does;
//! - **refuse**: new connections are accepted and reset at once (the service "drops" them);
//! - **stall**: open connections stay open but no byte moves (a black hole), until resumed.
//!
//! The upstream address can change ([`Proxy::set_upstream`]), so a restarted service that
//! came back on another port is reachable at the same proxy port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CHUNK: usize = 16 * 1024;

#[derive(Debug)]
struct State {
    upstream: Mutex<SocketAddr>,
    latency_ms: AtomicU64,
    refuse: AtomicBool,
    stalled: watch::Sender<bool>,
    /// Cancelled (and replaced) by [`Proxy::reset_all`]; every connection holds a child.
    generation: Mutex<CancellationToken>,
    connections: AtomicU64,
}

/// A running proxy; stops when dropped or when its parent token is cancelled.
#[derive(Debug)]
pub struct Proxy {
    pub name: String,
    addr: SocketAddr,
    state: Arc<State>,
    cancel: CancellationToken,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(
        name: &str,
        upstream: SocketAddr,
        parent: &CancellationToken,
    ) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream: Mutex::new(upstream),
            latency_ms: AtomicU64::new(0),
            refuse: AtomicBool::new(false),
            stalled: watch::channel(false).0,
            generation: Mutex::new(parent.child_token()),
            connections: AtomicU64::new(0),
        });
        let cancel = parent.child_token();
        tokio::spawn(accept_loop(listener, Arc::clone(&state), cancel.clone()));
        Ok(Proxy {
            name: name.to_owned(),
            addr,
            state,
            cancel,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .state
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = upstream;
    }

    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.state.latency_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_refuse(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::Relaxed);
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled.send_replace(stalled);
    }

    /// Resets every open connection; new ones are served as usual.
    pub fn reset_all(&self) {
        let mut gen_ = self
            .state
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        gen_.cancel();
        *gen_ = self.cancel.child_token();
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// All faults off.
    pub fn heal(&self) {
        self.set_latency(Duration::ZERO);
        self.set_refuse(false);
        self.set_stalled(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Closes with RST rather than FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        if state.refuse.load(Ordering::Relaxed) {
            reset(&client);
            drop(client);
            continue;
        }
        let conn_cancel = state
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .child_token();
        tokio::spawn(serve(client, Arc::clone(&state), conn_cancel));
    }
}

async fn serve(client: TcpStream, state: Arc<State>, cancel: CancellationToken) {
    let upstream = *state
        .upstream
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let server = tokio::select! {
        () = cancel.cancelled() => None,
        s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)) => {
            s.ok().and_then(Result::ok)
        }
    };
    let Some(server) = server else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    reset(&client);
    reset(&server);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, Arc::clone(&state));
    let down = pump(sr, cw, Arc::clone(&state));
    tokio::select! {
        // Dropping the halves (linger 0) sends the RST.
        () = cancel.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copies one direction, honouring stall and latency. Linger was set to 0 up front so a
/// reset drops with RST; a clean end of stream is forwarded as a shutdown (FIN) first.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: Arc<State>) {
    let mut buf = vec![0u8; CHUNK];
    let mut stalled = state.stalled.subscribe();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let ms = state.latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn forwards_then_resets_refuses_and_stalls_on_demand() {
        let cancel = CancellationToken::new();
        let proxy = Proxy::start("echo", echo_server().await, &cancel)
            .await
            .expect("proxy");
        let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut a, b"hello").await.expect("echo"), b"hello");

        proxy.reset_all();
        let after = roundtrip(&mut a, b"again").await;
        assert!(
            after.is_err(),
            "a reset connection must fail, got {after:?}"
        );

        let mut b = TcpStream::connect(proxy.addr()).await.expect("connect");
        proxy.set_stalled(true);
        b.write_all(b"held").await.expect("write");
        let mut buf = [0u8; 4];
        let held = tokio::time::timeout(Duration::from_millis(300), b.read_exact(&mut buf)).await;
        assert!(held.is_err(), "nothing moves while stalled");
        proxy.set_stalled(false);
        b.read_exact(&mut buf).await.expect("resumed");
        assert_eq!(&buf, b"held");

        proxy.set_refuse(true);
        let mut c = TcpStream::connect(proxy.addr()).await.expect("accepts");
        assert!(roundtrip(&mut c, b"x").await.is_err(), "refused");
        proxy.heal();
        let mut d = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut d, b"ok").await.expect("echo"), b"ok");
        assert_eq!(proxy.connections(), 4);
    }
}
