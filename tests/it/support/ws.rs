//! A minimal RFC 6455 WebSocket client and echo server over real sockets: the opening handshake
//! with `Sec-WebSocket-Key`/`Sec-WebSocket-Accept` checked on both sides, masked client frames,
//! unmasked server frames, text/binary/ping/close. Enough to see frames cross the gateway both
//! ways; no extensions, no fragmentation. Also compiled into `benches/traffic.rs`.
#![allow(dead_code)]

use std::net::SocketAddr;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    b
}

/// Read a message head up to and including the blank line.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Write one frame; client frames are masked (RFC 6455 5.3).
pub async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    opcode: u8,
    payload: &[u8],
    masked: bool,
) -> std::io::Result<()> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xFFFF => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key: [u8; 4] = random();
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    s.write_all(&f).await
}

/// Read one frame: (opcode, unmasked payload, whether it was masked).
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>, bool)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await?;
    if h[0] & 0x80 == 0 {
        return Err(std::io::Error::other("fragmented frames are not supported"));
    }
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7F {
        126 => u64::from(s.read_u16().await?),
        127 => s.read_u64().await?,
        n => u64::from(n),
    };
    if len > 16 << 20 {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut key = [0u8; 4];
    if masked {
        s.read_exact(&mut key).await?;
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok((h[0] & 0x0F, payload, masked))
}

/// A client connection after a successful opening handshake.
pub struct Client {
    stream: TcpStream,
    /// The 101 response head (lowercased), for header checks.
    pub head: String,
}

impl Client {
    /// Open a WebSocket to `path` on `addr` (`Host: host`). `Err` carries the response head when
    /// the server did not switch protocols or the accept key was wrong.
    pub async fn connect(addr: SocketAddr, host: &str, path: &str) -> Result<Client, String> {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let key = base64::engine::general_purpose::STANDARD.encode(random::<16>());
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let head = read_head(&mut stream).await.map_err(|e| e.to_string())?;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        if header(&head, "sec-websocket-accept") != Some(accept_key(&key).as_str()) {
            return Err(format!("wrong Sec-WebSocket-Accept in\n{head}"));
        }
        Ok(Client {
            stream,
            head: head.to_ascii_lowercase(),
        })
    }

    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        write_frame(&mut self.stream, opcode, payload, true).await
    }

    /// The next data frame, answering pings on the way.
    pub async fn recv(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        loop {
            let (op, p, masked) = read_frame(&mut self.stream).await?;
            if masked {
                return Err(std::io::Error::other("server frames must not be masked"));
            }
            match op {
                PING => self.send(PONG, &p).await?,
                PONG => {}
                _ => return Ok((op, p)),
            }
        }
    }

    /// Send a text message and return the text that comes back.
    pub async fn echo(&mut self, text: &str) -> String {
        self.send(TEXT, text.as_bytes()).await.unwrap();
        let (op, p) = self.recv().await.unwrap();
        assert_eq!(op, TEXT, "a text frame back");
        String::from_utf8(p).unwrap()
    }

    /// Close handshake: send a close frame, expect the server's close frame.
    pub async fn close(mut self) -> std::io::Result<()> {
        self.send(CLOSE, &1000u16.to_be_bytes()).await?;
        let (op, _) = self.recv().await?;
        if op != CLOSE {
            return Err(std::io::Error::other(format!("expected close, got {op}")));
        }
        Ok(())
    }
}

/// A WebSocket echo server: answers each text message `m` with `<name>:m` (binary messages are
/// echoed as they are), and after each message also pushes a server-initiated `<name>:tick` when
/// the message is `tick`. A request without a valid handshake gets `426 Upgrade Required`.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    pub async fn start(name: &str) -> EchoServer {
        EchoServer::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_at(name: &str, at: SocketAddr) -> EchoServer {
        let listener = TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = name.to_string();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.set_nodelay(true);
                tokio::spawn(serve(s, name.clone()));
            }
        });
        EchoServer {
            addr,
            accepted,
            task,
        }
    }

    pub fn service(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn serve(mut s: TcpStream, name: String) -> std::io::Result<()> {
    let head = read_head(&mut s).await?;
    let upgrade = header(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = header(&head, "sec-websocket-key").filter(|_| upgrade) else {
        let body = "websocket handshake required\n";
        let resp = format!(
            "HTTP/1.1 426 Upgrade Required\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return s.write_all(resp.as_bytes()).await;
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    s.write_all(resp.as_bytes()).await?;
    loop {
        let (op, p, masked) = read_frame(&mut s).await?;
        if !masked {
            // RFC 6455 5.1: a server closes the connection on an unmasked client frame.
            return write_frame(&mut s, CLOSE, &1002u16.to_be_bytes(), false).await;
        }
        match op {
            TEXT => {
                let mut out = format!("{name}:").into_bytes();
                out.extend_from_slice(&p);
                write_frame(&mut s, TEXT, &out, false).await?;
                if p == b"tick" {
                    write_frame(&mut s, TEXT, format!("{name}:tick").as_bytes(), false).await?;
                }
            }
            BINARY => write_frame(&mut s, BINARY, &p, false).await?,
            PING => write_frame(&mut s, PONG, &p, false).await?,
            CLOSE => {
                write_frame(&mut s, CLOSE, &p, false).await?;
                return Ok(());
            }
            _ => {}
        }
    }
}
