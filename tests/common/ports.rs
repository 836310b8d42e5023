//! Ports for the processes a test or bench starts on loopback addresses.
//!
//! A port the kernel hands out for `bind(…:0)` lies in its ephemeral
//! range (32768–60999 by default), the same range every outgoing TCP
//! connection and every client-side QUIC socket of a concurrent test
//! draws from: between finding such a port free and the child process
//! binding it, another process can take it ("Address already in use").
//! So these ports come from below that range, from a start that depends
//! on this process's id, and each is checked free for both TCP and UDP
//! before it is handed out. No outgoing connection ever takes one, and
//! two test processes running at once begin far apart.

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest and one past the highest port handed out.
const FIRST: u32 = 12_000;
const END: u32 = 32_000;

/// How many ports this process has looked at so far.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port on `ip` free for both TCP and UDP, outside the kernel's
/// ephemeral range and never the same twice in one process.
pub fn free_port(ip: &str) -> u16 {
    let span = END - FIRST;
    // Processes started one after another get starts 1,009 ports apart
    // (a prime, so the starts cover the whole span before repeating).
    let start = (std::process::id().wrapping_mul(1_009)) % span;
    for _ in 0..span {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + k) % span) as u16;
        let tcp = TcpListener::bind((ip, port));
        let udp = UdpSocket::bind((ip, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} between {FIRST} and {END}");
}
