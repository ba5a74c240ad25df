//! (8) Serving: `gradflow serve`'s HTTP endpoint over loopback against the same forward pass
//! in process.
//!
//! The model is the wide & deep headline model (26 fields, 13 dense features, 1M hash
//! buckets, embeddings of 8, MLP 64-32) with deterministic random parameters and
//! `table_rows` rows per table, written as a checkpoint to an in-memory store and loaded by a
//! [`gradflow_serve::Server`] in this process, with its HTTP adapter on a loopback port. One
//! client thread sends requests one after the other over a kept-alive HTTP/1.1 connection:
//! JSON rows of raw values (categorical ids as integers drawn from a vocabulary of 10,000 per
//! field, half of them never seen by the model), `batch_rows` per request. The in-process
//! figure is the same rows decoded from their parsed JSON and predicted by the same
//! [`gradflow_serve::LoadedModel`], with no HTTP, JSON text or batching queue.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gradflow_checkpoint::{CheckpointStore, DensePieceSnapshot, ShardSnapshot, TableSnapshot};
use gradflow_core::Mode;
use gradflow_data::SplitMix64;
use gradflow_models::{InputSchema, Model, ModelConfig, Scaling, ServingInfo, WideDeep, WideDeepConfig};
use gradflow_serve::{LoadedModel, RowDecoder, ServeConfig, Server};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::stats::{median, sig4};
use crate::{BenchError, Log, ServeBenchConfig};

/// Latency and throughput at each batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeReport {
    /// Rows per sparse table of the served model.
    pub table_rows: u64,
    pub rows: Vec<ServeRow>,
}

/// One batch size through one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeRow {
    /// `http` (loopback, one connection) or `in process`.
    pub path: String,
    /// Rows per request.
    pub batch_rows: usize,
    pub requests: usize,
    /// Latency percentiles of a request, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Rows per second, one request after the other.
    pub rows_per_sec: f64,
}

fn err(context: &str) -> impl Fn(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io { context: context.to_string(), source }
}

fn serve_err(e: gradflow_serve::ServeError) -> BenchError {
    BenchError::Job { job: "serve".into(), message: e.to_string() }
}

/// The model, with parameters drawn from `seed`.
fn snapshot(table_rows: u64, seed: u64) -> ShardSnapshot {
    let config = headline();
    let model = WideDeep::new(config).expect("the headline model builds");
    let spec = model.spec().clone();
    let mut rng = SplitMix64::new(seed);
    let dense = spec
        .dense
        .iter()
        .map(|d| {
            let mut values = vec![0.0; d.numel() as usize];
            d.init.fill_dense(&d.name, &d.shape, 0, &mut values);
            DensePieceSnapshot {
                tensor: d.name.clone(),
                partition: 0,
                offset: 0,
                state: vec![0.0; values.len()],
                values,
                steps: 1,
            }
        })
        .collect();
    let sparse = spec
        .sparse
        .iter()
        .map(|s| {
            let mut ids: Vec<u64> = (0..table_rows).map(|_| rng.next_u64() % 1_000_000).collect();
            ids.sort_unstable();
            ids.dedup();
            let n = ids.len() * s.dim as usize;
            let values = (0..n).map(|_| (unit(&mut rng) as f32 - 0.5) * 0.1).collect();
            TableSnapshot {
                table: s.name.clone(),
                dim: s.dim,
                num_slots: 1,
                values,
                state: vec![0.0; n],
                steps: vec![1; ids.len()],
                touched: vec![],
                clock: 1,
                sketch: vec![],
                ids,
            }
        })
        .collect();
    ShardSnapshot {
        shard: 0,
        num_shards: 1,
        version: 1,
        mode: Mode::Sync,
        spec,
        partition_bytes: 4 << 20,
        dense,
        sparse,
        serving: Some(serde_json::to_value(info()).expect("serving info serializes")),
    }
}

/// Uniform on [0, 1).
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn headline() -> WideDeepConfig {
    WideDeepConfig::new(26, 13)
}

fn info() -> ServingInfo {
    let input = InputSchema {
        label: "label".into(),
        dense: (0..13).map(|i| format!("d{i}")).collect(),
        categorical: (0..26).map(|i| format!("c{i}")).collect(),
    };
    let scaling = Scaling { mean: vec![0.0; 13], std: vec![1.0; 13] };
    ServingInfo::new("bench", ModelConfig::WideDeep(headline()), input, Some(scaling))
}

fn rows(n: usize, rng: &mut SplitMix64) -> Vec<Map<String, Value>> {
    (0..n)
        .map(|_| {
            let mut row = Map::new();
            for i in 0..13 {
                row.insert(format!("d{i}"), json!((unit(rng) * 4.0 - 2.0) as f32));
            }
            for i in 0..26 {
                row.insert(format!("c{i}"), json!(rng.next_u64() % 10_000));
            }
            row
        })
        .collect()
}

/// A kept-alive HTTP/1.1 connection.
struct Client {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client, BenchError> {
        let s = TcpStream::connect(addr).map_err(err("connecting to the model server"))?;
        s.set_nodelay(true).map_err(err("TCP_NODELAY"))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(err("read timeout"))?;
        let writer = s.try_clone().map_err(err("cloning a socket"))?;
        Ok(Client { addr, reader: BufReader::new(s), writer })
    }

    /// POSTs `body` to `path`; the answer's body.
    fn post(&mut self, path: &str, body: &str) -> Result<String, BenchError> {
        let io = err("a request to the model server");
        write!(
            self.writer,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(&io)?;
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(&io)?;
        let ok = line.starts_with("HTTP/1.1 200");
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).map_err(&io)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut out = vec![0; length];
        self.reader.read_exact(&mut out).map_err(&io)?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if !ok {
            return Err(BenchError::Job {
                job: "serve".into(),
                message: format!("the server answered {text}"),
            });
        }
        Ok(text)
    }
}

fn row_of(path: &str, batch_rows: usize, secs: &[f64]) -> ServeRow {
    let mut sorted = secs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1];
    let total: f64 = secs.iter().sum();
    ServeRow {
        path: path.into(),
        batch_rows,
        requests: secs.len(),
        p50_us: sig4(median(secs) * 1e6),
        p99_us: sig4(p99 * 1e6),
        rows_per_sec: sig4((batch_rows * secs.len()) as f64 / total.max(1e-12)),
    }
}

/// Runs the scenario; see the module docs.
pub fn run(config: &ServeBenchConfig, log: Log<'_>) -> Result<ServeReport, BenchError> {
    log(&format!("serve: writing a headline model with {} rows per table", config.table_rows));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(err("starting a runtime"))?;
    let url = format!("memory://gradflow-bench-serve-{}", std::process::id());
    let (server, addr, model) = runtime.block_on(async {
        let store = CheckpointStore::open(&url)
            .map_err(|e| BenchError::Job { job: "serve".into(), message: e.to_string() })?;
        store
            .write_shard(1, &snapshot(config.table_rows, 3))
            .await
            .map_err(|e| BenchError::Job { job: "serve".into(), message: e.to_string() })?;
        store
            .finalize(1, 1, 0, Duration::from_secs(60))
            .await
            .map_err(|e| BenchError::Job { job: "serve".into(), message: e.to_string() })?;
        let model = LoadedModel::load(&store, "latest").await.map_err(serve_err)?;
        let server = Server::start(ServeConfig::new(&url, "1")).await.map_err(serve_err)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(err("binding a port"))?;
        let addr = listener.local_addr().map_err(err("binding a port"))?;
        tokio::spawn(gradflow_serve::http::serve(listener, server.clone(), std::future::pending()));
        Ok::<_, BenchError>((server, addr, model))
    })?;
    let mut rng = SplitMix64::new(17);
    let mut out = Vec::new();
    for &(batch_rows, requests) in &[(1, config.requests_batch_1), (config.batch_rows, config.requests_batch)]
    {
        let requests = requests.max(1);
        let bodies: Vec<(String, Vec<Map<String, Value>>)> = (0..requests.min(64))
            .map(|_| {
                let r = rows(batch_rows, &mut rng);
                (json!({ "instances": r }).to_string(), r)
            })
            .collect();
        log(&format!("serve: {requests} requests of {batch_rows} row(s) over HTTP, then in process"));
        let mut client = Client::connect(addr)?;
        for (body, _) in bodies.iter().take(10) {
            client.post("/v1/models/bench:predict", body)?;
        }
        let mut secs = Vec::with_capacity(requests);
        for i in 0..requests {
            let body = &bodies[i % bodies.len()].0;
            let t = Instant::now();
            client.post("/v1/models/bench:predict", body)?;
            secs.push(t.elapsed().as_secs_f64());
        }
        out.push(row_of("http", batch_rows, &secs));
        let decoder = RowDecoder::new(&model.info().input);
        let mut probs = Vec::new();
        let mut secs = Vec::with_capacity(requests);
        for i in 0..requests + 10 {
            let r = &bodies[i % bodies.len()].1;
            let t = Instant::now();
            let mut batch = decoder.batch(r).map_err(|e| serve_err(e.into()))?;
            model.predict(&mut batch, &mut probs).map_err(serve_err)?;
            if i >= 10 {
                secs.push(t.elapsed().as_secs_f64());
            }
        }
        out.push(row_of("in process", batch_rows, &secs));
    }
    drop(server);
    Ok(ServeReport { table_rows: config.table_rows, rows: out })
}
