//! (1) The ceilings every other number is compared with: raw TCP throughput over loopback
//! between two processes, and memory-copy bandwidth.
//!
//! TCP: this process starts a copy of the executable as a *sink* (`gradflow bench
//! --tcp-sink`, which calls [`serve_tcp_sink`]) and streams `tcp_bytes` to it in large
//! `write` calls over one connection with `TCP_NODELAY`, as gRPC's does; the sink reads
//! everything and answers one byte, and the time until that byte is back is one repetition.
//! So the figure crosses a real process boundary and the loopback stack, with no framing,
//! encoding or copies beyond the kernel's. Two measures, their repetitions taken in turn:
//! *cached*, one `tcp_write_bytes` block sent again and again into a buffer as large (both
//! stay in the processor's cache: the loopback stack at its best); and *memory to memory*,
//! sent from and received into `tcp_memory_bytes` buffers, going through them in turn, as a
//! model's tensors are (the kernel's copies then read and write main memory).
//!
//! memcpy: `copy_from_slice` of a `memcpy_bytes` buffer, on one thread and split over
//! every rayon thread. GB/s counts bytes copied (each is read once and written once).

use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::stats::{GB, Timing, sig4};
use crate::{BenchError, CeilingConfig, Log};

/// The arguments that make the `gradflow` executable run [`serve_tcp_sink`].
pub const TCP_SINK_ARGS: [&str; 2] = ["bench", "--tcp-sink"];

/// The sink's first line on standard output: this prefix, then the address it listens on.
const READY: &str = "gradflow-bench-tcp-sink listening on ";

/// The ceilings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeilingReport {
    /// Raw TCP over loopback between two processes, the data in the cache, GB/s (median).
    pub tcp_gb_per_s: f64,
    pub tcp: Timing,
    /// Raw TCP over loopback between two processes, memory to memory, GB/s (median).
    pub tcp_memory_gb_per_s: f64,
    pub tcp_memory: Timing,
    /// Bytes per repetition and per `write` call, and the buffers of the memory measure.
    pub tcp_bytes: u64,
    pub tcp_write_bytes: usize,
    pub tcp_memory_bytes: usize,
    /// Memory copy on one thread, GB/s copied (median).
    pub memcpy_gb_per_s: f64,
    pub memcpy: Timing,
    /// Memory copy split over every rayon thread, GB/s copied (median).
    pub memcpy_all_threads_gb_per_s: f64,
    pub memcpy_all_threads: Timing,
    /// Rayon threads of the all-threads copy.
    pub threads: usize,
    pub memcpy_bytes: usize,
}

/// Measures both ceilings; `program` is the `gradflow` executable that serves as the sink.
pub fn run(config: &CeilingConfig, program: &Path, log: Log<'_>) -> Result<CeilingReport, BenchError> {
    let [tcp, tcp_memory] = tcp_throughput(program, config)?;
    let tcp_gb_per_s = sig4(tcp.rate(config.tcp_bytes as f64) / GB);
    let tcp_memory_gb_per_s = sig4(tcp_memory.rate(config.tcp_bytes as f64) / GB);
    log(&format!(
        "ceiling: TCP loopback between two processes {tcp_gb_per_s} GB/s (in the cache), \
         {tcp_memory_gb_per_s} GB/s (memory to memory)"
    ));
    let (one, all, threads) = memcpy(config.memcpy_bytes, config.reps);
    let bytes = config.memcpy_bytes as f64;
    let report = CeilingReport {
        tcp_gb_per_s,
        tcp,
        tcp_memory_gb_per_s,
        tcp_memory,
        tcp_bytes: config.tcp_bytes,
        tcp_write_bytes: config.tcp_write_bytes,
        tcp_memory_bytes: config.tcp_memory_bytes,
        memcpy_gb_per_s: sig4(one.rate(bytes) / GB),
        memcpy: one,
        memcpy_all_threads_gb_per_s: sig4(all.rate(bytes) / GB),
        memcpy_all_threads: all,
        threads,
        memcpy_bytes: config.memcpy_bytes,
    };
    log(&format!(
        "ceiling: memcpy {} GB/s on 1 thread, {} GB/s on {threads}",
        report.memcpy_gb_per_s, report.memcpy_all_threads_gb_per_s
    ));
    Ok(report)
}

/// The sink side, run in its own process: listens on a free loopback port, prints it, then
/// for each request (two `u64`s: a length, and the span of its buffer the bytes go to, in
/// turn) reads that many bytes and answers one byte. Returns when the sender closes the
/// connection.
pub fn serve_tcp_sink() -> Result<(), BenchError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("TCP sink: binding a loopback port"))?;
    let addr = listener.local_addr().map_err(BenchError::io("TCP sink: local address"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY}{addr}")
            .and_then(|()| out.flush())
            .map_err(BenchError::io("TCP sink: stdout"))?;
    }
    let (mut conn, _) = listener.accept().map_err(BenchError::io("TCP sink: accepting"))?;
    conn.set_nodelay(true).map_err(BenchError::io("TCP sink: TCP_NODELAY"))?;
    let mut buf = Vec::new();
    loop {
        let mut header = [0u8; 16];
        match conn.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(BenchError::io("TCP sink: reading a length")(e)),
        }
        let mut left = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let span = usize::try_from(u64::from_le_bytes(header[8..].try_into().expect("8 bytes")))
            .map_err(|_| BenchError::Sink("a buffer span beyond memory".into()))?
            .max(1);
        if buf.len() < span {
            buf.resize(span, 0);
        }
        let mut at = 0;
        while left > 0 {
            let want = (span - at).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = conn.read(&mut buf[at..at + want]).map_err(BenchError::io("TCP sink: reading"))?;
            if n == 0 {
                return Err(BenchError::Sink(format!(
                    "the sender closed the connection with {left} bytes to go"
                )));
            }
            left -= n as u64;
            at = (at + n) % span;
        }
        conn.write_all(&[1]).map_err(BenchError::io("TCP sink: answering"))?;
    }
}

/// Kills the sink if it is still running when the measurement ends early.
struct SinkProcess(Child);

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The timings of the cached and the memory-to-memory measures, their repetitions in turn.
fn tcp_throughput(program: &Path, config: &CeilingConfig) -> Result<[Timing; 2], BenchError> {
    let child = Command::new(program)
        .args(TCP_SINK_ARGS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(BenchError::io(format!(
            "starting the TCP sink ({} {})",
            program.display(),
            TCP_SINK_ARGS.join(" ")
        )))?;
    let mut sink = SinkProcess(child);
    let stdout = sink.0.stdout.take().ok_or_else(|| BenchError::Sink("no standard output".into()))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(BenchError::io("reading the TCP sink's address"))?;
    let addr = line
        .trim()
        .strip_prefix(READY)
        .ok_or_else(|| {
            BenchError::Sink(format!("expected `{READY}ADDR` on its standard output, got `{}`", line.trim()))
        })?
        .to_string();
    let mut conn =
        TcpStream::connect(&addr).map_err(BenchError::io(format!("connecting to the TCP sink at {addr}")))?;
    conn.set_nodelay(true).map_err(BenchError::io("TCP_NODELAY"))?;
    // Written in full first, so that no page fault is timed (the sink's are in the warm-up).
    let memory = vec![0x5au8; config.tcp_memory_bytes];
    let mut secs = [Vec::with_capacity(config.reps), Vec::with_capacity(config.reps)];
    for rep in 0..=config.reps {
        for (k, span) in [config.tcp_write_bytes, config.tcp_memory_bytes].into_iter().enumerate() {
            let started = Instant::now();
            let mut header = config.tcp_bytes.to_le_bytes().to_vec();
            header.extend_from_slice(&(span as u64).to_le_bytes());
            conn.write_all(&header).map_err(BenchError::io("sending to the TCP sink"))?;
            let (mut left, mut at) = (config.tcp_bytes, 0);
            while left > 0 {
                let n =
                    config.tcp_write_bytes.min(span - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                conn.write_all(&memory[at..at + n]).map_err(BenchError::io("sending to the TCP sink"))?;
                left -= n as u64;
                at = (at + n) % span;
            }
            let mut ack = [0u8; 1];
            conn.read_exact(&mut ack).map_err(BenchError::io("waiting for the TCP sink's answer"))?;
            if rep > 0 {
                secs[k].push(started.elapsed().as_secs_f64());
            }
        }
    }
    conn.shutdown(std::net::Shutdown::Both).map_err(BenchError::io("closing the TCP connection"))?;
    drop(conn);
    // The sink exits on end of stream; give it a moment before the guard kills it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match sink.0.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return Err(BenchError::Sink(format!("exited with {status}"))),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(BenchError::io("waiting for the TCP sink")(e)),
        }
    }
    Ok(secs.map(|s| Timing::of(&s)))
}

/// One-thread and all-threads copy timings of a `bytes` buffer, and the thread count.
fn memcpy(bytes: usize, reps: usize) -> (Timing, Timing, usize) {
    // Both buffers are written first, so page faults are not timed.
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let threads = rayon::current_num_threads().max(1);
    let chunk = bytes.div_ceil(threads);
    let mut one = Vec::with_capacity(reps);
    let mut all = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let started = Instant::now();
        dst.copy_from_slice(&src);
        black_box(&mut dst);
        let t1 = started.elapsed().as_secs_f64();
        let started = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&mut dst);
        let t2 = started.elapsed().as_secs_f64();
        if rep > 0 {
            one.push(t1);
            all.push(t2);
        }
    }
    (Timing::of(&one), Timing::of(&all), threads)
}
