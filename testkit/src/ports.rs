//! Loopback ports for tests (and `rim bench --spawn`) that are free now and
//! stay free until the caller binds them.
//!
//! # Why not bind `127.0.0.1:0`?
//!
//! Harnesses pick an address before the node or gateway that will listen on
//! it starts. The usual trick (bind `127.0.0.1:0`, read the port, drop the
//! listener) returns a port from the kernel's *ephemeral* range
//! (`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 by default), the
//! very range the kernel draws from for the local end of every outgoing
//! connection. Tests open many connections, so between the drop and the
//! real bind the kernel may hand the port to one of them, and the node
//! fails with "Address already in use".
//!
//! # What this crate does instead
//!
//! * Ports come from a pool **below** the ephemeral range: `20000` up to the
//!   range's low bound (read from `/proc`, 32768 if unreadable). The kernel
//!   never picks those for outgoing connections, so only an explicit bind can
//!   take one. Ports 7000-7999 (`rim dev`) are never used. If the ephemeral
//!   range starts too low to leave a useful pool, the pool starts at 1024 and
//!   also takes the ports above the range's high bound.
//! * A process-wide atomic counter walks the pool, so one process never hands
//!   out the same port twice (and its parallel tests never share one).
//!   [`free_ports`] takes a block of consecutive ports from the same walk, for
//!   programs that listen on offsets from a base port (`rim dev`).
//! * The walk starts at an offset derived from the process id, so concurrent
//!   test processes (each with its own counter) start far apart and rarely
//!   meet.
//! * Each candidate is checked by binding it (a std listener, which like
//!   tokio's sets `SO_REUSEADDR`, so a port left in `TIME_WAIT` by an earlier
//!   listener counts as free, as it is for the real bind) and dropping the
//!   listener; busy ports are skipped.
//! * When every port of the pool has been handed out or found busy, the call
//!   panics with a clear message (at ~12 000 ports per process, a bug).
//!
//! What remains is a race with *another process* that binds the same port
//! explicitly between the check and the real bind (for instance a concurrent
//! test process whose walk reached the same port): rare, so harnesses may keep
//! a "retry with new ports on address in use" loop as a second line of
//! defence.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where the pool below the ephemeral range starts.
const POOL_START: u32 = 20_000;
/// Where it starts if the ephemeral range leaves less than `MIN_POOL` above
/// `POOL_START` (the privileged ports end below it).
const FALLBACK_START: u32 = 1024;
/// The smallest pool worth having before adding the ports above the range.
const MIN_POOL: u32 = 1000;
/// Ports `rim dev` uses (base port 7100 and its offsets): never handed out.
const DEV_PORTS: Range<u32> = 7000..8000;
/// The ephemeral range assumed when `/proc` cannot tell (Linux's default).
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

/// Indices into the pool handed out so far in this process.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A loopback port that is free now, outside the kernel's ephemeral range,
/// and handed out by no earlier call in this process.
///
/// # Panics
///
/// If every port of the pool has been handed out or is busy.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive loopback ports that are all free now, outside
/// the kernel's ephemeral range, and handed out by no earlier call in this
/// process: for a program that listens on fixed offsets from a base port
/// (`rim dev --base-port`).
///
/// # Panics
///
/// If `n` is 0, or no such block is left in the pool.
pub fn free_ports(n: u16) -> u16 {
    assert!(n > 0, "rim-testkit: free_ports(0)");
    let pool = pool();
    let (len, n) = (pool.len as usize, usize::from(n));
    loop {
        let first = NEXT.fetch_add(n, Ordering::Relaxed);
        if first + n > len {
            panic!(
                "rim-testkit: no {n} more loopback ports left in {:?} (all {len} handed out or busy in this \
                 process; the pool avoids the ephemeral range {}-{})",
                pool.segments, pool.ephemeral.0, pool.ephemeral.1
            );
        }
        let base = pool.port((pool.offset + first) % len);
        let ports = (0..n).map(|k| pool.port((pool.offset + first + k) % len));
        // A block that wraps or straddles a gap of the pool is skipped whole.
        let consecutive = ports.clone().enumerate().all(|(k, p)| usize::from(p) == usize::from(base) + k);
        if consecutive && ports.clone().all(bindable) {
            return base;
        }
    }
}

/// Whether a listener can bind `127.0.0.1:port` now (the listener is dropped).
fn bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// `127.0.0.1` with a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// [`free_addr`] as a string (`127.0.0.1:port`), the form configs take.
pub fn free_addr_string() -> String {
    free_addr().to_string()
}

/// The kernel's ephemeral port range (inclusive), or Linux's default.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// `"low<whitespace>high"` with `low <= high`.
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (it.next()?.ok()?, it.next()?.ok()?);
    (low <= high && it.next().is_none()).then_some((low, high))
}

/// The ports handed out, as disjoint ranges, and where this process starts.
#[derive(Debug)]
struct Pool {
    segments: Vec<Range<u32>>,
    len: u32,
    offset: usize,
    ephemeral: (u16, u16),
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(ephemeral_range(), std::process::id()))
}

impl Pool {
    fn new(ephemeral: (u16, u16), pid: u32) -> Pool {
        let (low, high) = (u32::from(ephemeral.0), u32::from(ephemeral.1));
        let below = if low >= POOL_START + MIN_POOL {
            POOL_START..low
        } else {
            FALLBACK_START..low.max(FALLBACK_START)
        };
        let above = high + 1..65536;
        let wanted = if below.end - below.start >= MIN_POOL { vec![below] } else { vec![below, above] };
        let segments: Vec<Range<u32>> = wanted
            .into_iter()
            .flat_map(|r| [r.start..r.end.min(DEV_PORTS.start), r.start.max(DEV_PORTS.end)..r.end])
            .filter(|r| !r.is_empty())
            .collect();
        let len = size(&segments);
        assert!(len > 0, "rim-testkit: no loopback ports outside the ephemeral range {low}-{high}");
        // Fibonacci hashing spreads nearby pids over the whole pool.
        let offset = ((u64::from(pid).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % u64::from(len)) as usize;
        Pool { segments, len, offset, ephemeral }
    }

    /// The `i`-th port of the pool, `i < len`.
    fn port(&self, mut i: usize) -> u16 {
        for r in &self.segments {
            let n = (r.end - r.start) as usize;
            if i < n {
                return (r.start as usize + i) as u16;
            }
            i -= n;
        }
        unreachable!("port index beyond the pool")
    }
}

fn size(segments: &[Range<u32>]) -> u32 {
    segments.iter().map(|r| r.end - r.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn many_calls_give_distinct_bindable_ports_below_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for &p in &ports {
            assert!(!(low..=high).contains(&p), "port {p} is in the ephemeral range {low}-{high}");
            if low >= 21_000 {
                assert!((20_000..low).contains(&p), "port {p} is not in 20000..{low}");
            }
            assert!(!(7000..8000).contains(&p), "port {p} is a `rim dev` port");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap_or_else(|e| panic!("port {p}: {e}"));
        }
    }

    #[test]
    fn blocks_are_consecutive_free_and_disjoint_from_single_ports() {
        let (low, high) = ephemeral_range();
        let single: Vec<u16> = (0..20).map(|_| free_port()).collect();
        let base = free_ports(302);
        let block = base..=base + 301;
        assert!(!single.iter().any(|p| block.contains(p)));
        for p in block.clone() {
            assert!(!(low..=high).contains(&p) && !(7000..8000).contains(&p), "port {p}");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap_or_else(|e| panic!("port {p}: {e}"));
        }
        let after: Vec<u16> = (0..20).map(|_| free_port()).collect();
        assert!(!after.iter().any(|p| block.contains(p) || single.contains(p)));
    }

    #[test]
    fn addresses_are_loopback() {
        let a = free_addr();
        assert_eq!(a.ip(), Ipv4Addr::LOCALHOST);
        let s = free_addr_string();
        let parsed: SocketAddr = s.parse().unwrap();
        assert!(parsed.ip().is_loopback() && parsed.port() != a.port());
    }

    #[test]
    fn parses_the_proc_file() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("32768"), None);
        assert_eq!(parse_range("a b"), None);
        assert_eq!(parse_range("1 2 3"), None);
    }

    #[test]
    fn the_default_pool_is_below_the_range() {
        let p = Pool::new((32768, 60999), 4242);
        assert_eq!(p.segments.len(), 1);
        assert_eq!(p.segments[0], 20_000..32768);
        assert_eq!(p.len, 12768);
        assert!(p.offset < 12768);
        assert_eq!(p.port(0), 20_000);
        assert_eq!(p.port(12767), 32767);
    }

    #[test]
    fn a_low_range_falls_back_and_skips_the_dev_ports() {
        let p = Pool::new((10_000, 60_999), 1);
        assert_eq!(p.segments, vec![1024..7000, 8000..10_000]);
        let all: Vec<u16> = (0..p.len as usize).map(|i| p.port(i)).collect();
        assert!(all.iter().all(|&x| !(7000..8000).contains(&x) && (1024..10_000).contains(&x)));
        assert_eq!(all.len(), all.iter().copied().collect::<HashSet<_>>().len());
        assert_eq!(all.len(), (7000 - 1024) + (10_000 - 8000));
    }

    #[test]
    fn a_tiny_pool_below_adds_the_ports_above() {
        let p = Pool::new((1500, 60_999), 1);
        assert_eq!(p.segments, vec![1024..1500, 61_000..65536]);
        assert_eq!(p.port(p.len as usize - 1), 65535);
    }

    #[test]
    fn a_range_starting_at_1024_uses_the_ports_above_it() {
        let p = Pool::new((1024, 50_000), 1);
        assert_eq!(p.segments.len(), 1);
        assert_eq!(p.segments[0], 50_001..65536);
    }

    #[test]
    fn nearby_pids_start_far_apart() {
        let a = Pool::new((32768, 60999), 1000).offset as i64;
        let b = Pool::new((32768, 60999), 1001).offset as i64;
        assert!((a - b).abs() > 100, "offsets {a} and {b}");
    }
}
