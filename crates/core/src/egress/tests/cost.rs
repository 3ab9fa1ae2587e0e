//! What the proxy costs, printed and never asserted (run with `--nocapture`; timings on a
//! shared machine are no test's business): 100 MB downloads directly and through a tunnel,
//! taken in turns, with the CPU time the proxy's thread spent on them; and how long a new
//! connection takes to deliver its first byte each way. The proxy runs on a current-thread
//! runtime of its own, as in agentd; both ends are plain threads with blocking sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::super::proxy::ESTABLISHED;
use super::super::{Egress, EgressResolve, serve};
use super::rules;

const TOTAL: usize = 100 * 1024 * 1024;
const ROUNDS: usize = 5;
const CONNECTIONS: u32 = 200;

/// A proxy for `source.test` (127.0.0.1) on a thread of its own.
struct BenchProxy {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<Duration>,
}

impl BenchProxy {
    fn start() -> BenchProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let address = listener.local_addr().expect("its address");
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let resolve =
                    EgressResolve::parse(&["source.test=127.0.0.1".to_string()]).expect("valid");
                let (denials, _kept) = mpsc::unbounded_channel();
                let rules = rules(&["source.test"]);
                let resolve = Arc::new(resolve);
                let task = serve(
                    listener,
                    "bench".into(),
                    Egress::within(rules, None),
                    resolve,
                    denials,
                )
                .expect("serving");
                let _ = stopped.await;
                task.abort();
            });
            thread_cpu()
        });
        BenchProxy {
            address,
            stop,
            thread,
        }
    }

    /// Stops the proxy; the CPU time its thread used.
    fn stop(self) -> Duration {
        let _ = self.stop.send(());
        self.thread.join().expect("the proxy's thread")
    }

    /// A tunnel to `source.test:port`, past the proxy's answer.
    fn tunnel(&self, port: u16) -> TcpStream {
        let mut stream = TcpStream::connect(self.address).expect("connecting to the proxy");
        stream
            .write_all(format!("CONNECT source.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .expect("sending");
        let mut answer = [0; ESTABLISHED.len()];
        stream.read_exact(&mut answer).expect("the answer");
        assert_eq!(answer, ESTABLISHED, "{}", String::from_utf8_lossy(&answer));
        stream
    }
}

/// The CPU time of the calling thread so far (`/proc/thread-self/schedstat`).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let nanos = text
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(nanos)
}

/// The CPU time of the whole process so far, ended threads included.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<nix::libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into memory we own, zeroed beforehand.
    let usage = unsafe {
        nix::libc::getrusage(nix::libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A server on 127.0.0.1 that writes `bytes` bytes on each connection, then closes; its
/// port. One byte is written at once; more on a thread per connection.
fn source(bytes: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
    let port = listener.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if bytes == 1 {
                let _ = stream.write_all(b"!");
                continue;
            }
            std::thread::spawn(move || {
                let chunk = vec![7u8; bytes.min(256 * 1024)];
                let mut left = bytes;
                while left > 0 {
                    let piece = left.min(chunk.len());
                    if stream.write_all(&chunk[..piece]).is_err() {
                        return;
                    }
                    left -= piece;
                }
            });
        }
    });
    port
}

/// One download of `TOTAL` bytes from the connection `open` makes: MB/s, and the CPU time
/// the process spent on it.
fn download(open: impl Fn() -> TcpStream) -> (f64, Duration) {
    let cpu = process_cpu();
    let started = Instant::now();
    let mut stream = open();
    let mut buf = vec![0; 256 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).expect("reading") {
            0 => break,
            read => total += read,
        }
    }
    assert_eq!(total, TOTAL);
    let rate = TOTAL as f64 / 1e6 / started.elapsed().as_secs_f64();
    (rate, process_cpu().saturating_sub(cpu))
}

/// The mean time from connecting to the first byte, over `CONNECTIONS` connections.
fn first_byte(open: impl Fn() -> TcpStream) -> Duration {
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        let mut byte = [0];
        open().read_exact(&mut byte).expect("the first byte");
    }
    started.elapsed() / CONNECTIONS
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
fn throughput_and_latency_are_printed() {
    let bulk = source(TOTAL);
    let direct = |port: u16| TcpStream::connect(("127.0.0.1", port)).expect("connecting");

    let proxy = BenchProxy::start();
    let (mut straight, mut tunnelled) = (Vec::new(), Vec::new());
    let (mut straight_cpu, mut tunnelled_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let (rate, cpu) = download(|| direct(bulk));
        straight.push(rate);
        straight_cpu += cpu;
        let (rate, cpu) = download(|| proxy.tunnel(bulk));
        tunnelled.push(rate);
        tunnelled_cpu += cpu;
    }
    let proxy_cpu = proxy.stop();
    let (straight, tunnelled) = (median(straight), median(tunnelled));
    let per_gigabyte = |cpu: Duration| cpu.as_secs_f64() * 1e3 / ((ROUNDS * TOTAL) as f64 / 1e9);
    println!(
        "100 MB downloads, median of {ROUNDS} taken in turns: direct {straight:.0} MB/s, \
         through the proxy {tunnelled:.0} MB/s ({:.0}%)",
        100.0 * tunnelled / straight,
    );
    println!(
        "CPU per GB, both ends and the proxy: direct {:.0} ms, through the proxy {:.0} ms, of \
         which the proxy's thread {:.0} ms",
        per_gigabyte(straight_cpu),
        per_gigabyte(tunnelled_cpu),
        per_gigabyte(proxy_cpu),
    );

    let one = source(1);
    let proxy = BenchProxy::start();
    let (straight, tunnelled) = (first_byte(|| direct(one)), first_byte(|| proxy.tunnel(one)));
    proxy.stop();
    println!(
        "first byte of a new connection, mean of {CONNECTIONS}: direct {straight:?}, \
         through the proxy {tunnelled:?} (+{:?})",
        tunnelled.saturating_sub(straight)
    );
}
