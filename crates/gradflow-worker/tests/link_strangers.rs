//! The tensor link against strangers and absurd requests: a real server on loopback port 0,
//! and raw TCP clients that connect and say nothing, trickle a hello, announce a huge hello,
//! or announce far more payload than a push could carry. None of them may stall the server
//! or make it buffer much.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{addrs, config, link_spec as spec, start_shards};
use gradflow_core::Mode;
use gradflow_proto::auth::Token;
use gradflow_proto::link::{read_header, write_frame};
use gradflow_proto::pb;
use gradflow_ps::ServerConfig;
use gradflow_ps::link::HELLO_TIMEOUT;
use gradflow_worker::{Code, Worker, WorkerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Generous bound for anything the server is expected to do "at once" on a loaded machine.
const PROMPTLY: Duration = Duration::from_secs(30);

async fn connect(port: u16) -> TcpStream {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    TcpStream::connect(addr).await.unwrap()
}

/// Reads until the server closes the connection (or resets it); how long that took.
async fn closed_by_server(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(HELLO_TIMEOUT + PROMPTLY, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open for {:?}", started.elapsed());
    started.elapsed()
}

/// This process's resident memory in bytes (the server runs in it).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

async fn server_with_token() -> (Vec<gradflow_ps::RunningServer>, Token) {
    let token = Token::generate();
    let servers =
        start_shards(1, |s| ServerConfig { token: Some(token.clone()), ..config(s, 1, 1, Mode::Sync) }).await;
    (servers, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_strangers_are_dropped_after_the_hello_deadline() {
    let (servers, token) = server_with_token().await;
    let port = servers[0].shard().link_port;

    let mut silent = connect(port).await;
    let (silent_took, trickle_took) = tokio::join!(closed_by_server(&mut silent), trickling_hello(port));
    assert!(silent_took >= HELLO_TIMEOUT - Duration::from_millis(500), "dropped after {silent_took:?}");
    assert!(trickle_took >= HELLO_TIMEOUT - Duration::from_millis(500), "dropped after {trickle_took:?}");

    // Both counted as refused; the server still takes its own worker.
    assert_eq!(servers[0].shard().metrics.link_refused.get(), 2);
    let mut config = WorkerConfig::new(addrs(&servers), 0);
    config.token = Some(token);
    let mut worker = Worker::connect(config).await.unwrap();
    worker.declare(spec()).await.unwrap();
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.step().await.unwrap();
    let mut d = vec![Vec::new()];
    worker.pull_all_dense(&mut d).await.unwrap();
    assert_eq!(d[0], vec![0.5; 4]);
}

/// A connection that trickles a hello, a byte every 200 ms (it would take seconds more than
/// the deadline to finish); how long until the server dropped it.
async fn trickling_hello(port: u16) -> Duration {
    let mut s = connect(port).await;
    let started = Instant::now();
    let mut hello = Vec::new();
    write_frame(&mut hello, &pb::LinkHello { token: "x".repeat(100), worker: 0 }, &[]).await.unwrap();
    let dropped = tokio::time::timeout(HELLO_TIMEOUT + PROMPTLY, async {
        for b in &hello[..hello.len() - 1] {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            let mut probe = [0u8; 16];
            // A read that ends (closed or reset) within the pause says the server let go.
            match tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
        // The whole hello but its last byte is in; wait for the server to drop it.
        let mut probe = [0u8; 16];
        while let Ok(n) = s.read(&mut probe).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    assert!(dropped.is_ok(), "a trickling hello kept the connection for {:?}", started.elapsed());
    let took = started.elapsed();
    assert!(took < HELLO_TIMEOUT + PROMPTLY, "{took:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_hellos_are_refused_from_their_length_and_nothing_sizeable_is_buffered() {
    let (servers, _token) = server_with_token().await;
    let port = servers[0].shard().link_port;
    let junk = vec![0x5au8; 16 << 20];
    let before = rss();

    // 8 strangers each announce a 64 MiB hello and send 16 MiB of it: a server that buffered
    // hellos up to 64 MiB would hold 128 MiB more.
    let mut strangers = Vec::new();
    for _ in 0..8 {
        let junk = &junk;
        strangers.push(async move {
            let mut s = BufReader::new(connect(port).await);
            let _ = s.get_mut().write_all(&(64u32 << 20).to_le_bytes()).await;
            let _ = s.get_mut().write_all(junk).await;
            // Refused by name, or cut off: never a reply that accepts.
            let reply = tokio::time::timeout(PROMPTLY, read_header::<pb::LinkReply, _>(&mut s))
                .await
                .expect("the server answers or closes at once");
            if let Ok(Some(reply)) = reply {
                assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
                assert!(reply.message.contains("at most 4096"), "{}", reply.message);
            }
        });
    }
    futures::future::join_all(strangers).await;
    let grown = rss().saturating_sub(before);
    assert!(grown < 32 << 20, "the server grew by {} MiB for 8 unauthenticated hellos", grown >> 20);
    assert_eq!(servers[0].shard().metrics.link_refused.get(), 8);
    assert_eq!(servers[0].shard().metrics.link_connections.get(), 0);
}

fn push_announcing(payload_bytes: Vec<u64>, sparse: bool) -> pb::LinkRequest {
    let header = pb::PushRequest {
        worker: 0,
        step: 0,
        dense: if sparse {
            vec![]
        } else {
            vec![pb::DenseSlice { tensor: "w".into(), partition: 0, offset: 0, data: Default::default() }]
        },
        sparse: if sparse {
            vec![pb::SparseGrad { table: "emb".into(), ..Default::default() }]
        } else {
            vec![]
        },
        task: None,
        ..Default::default()
    };
    pb::LinkRequest { request: Some(pb::link_request::Request::Push(header)), payload_bytes }
}

/// A raw connection that has said hello with `token`.
async fn authenticated(port: u16, token: &Token) -> BufReader<TcpStream> {
    let mut s = BufReader::new(connect(port).await);
    write_frame(s.get_mut(), &pb::LinkHello { token: token.expose().into(), worker: 0 }, &[]).await.unwrap();
    let reply = read_header::<pb::LinkReply, _>(&mut s).await.unwrap().unwrap();
    assert_eq!(reply.code, 0, "{reply:?}");
    s
}

/// Sends `request` with no payload; the reply, which must come without the payload.
async fn refusal(s: &mut BufReader<TcpStream>, request: &pb::LinkRequest) -> pb::LinkReply {
    write_frame(s.get_mut(), request, &[]).await.unwrap();
    tokio::time::timeout(PROMPTLY, read_header::<pb::LinkReply, _>(s))
        .await
        .expect("refused at once, before any payload")
        .unwrap()
        .expect("a reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_announcing_impossible_payload_lengths_is_refused_at_once() {
    let (servers, token) = server_with_token().await;
    let port = servers[0].shard().link_port;

    // Before any model is declared.
    let mut s = authenticated(port, &token).await;
    let reply = refusal(&mut s, &push_announcing(vec![1 << 62], false)).await;
    assert_eq!(reply.code, Code::FailedPrecondition as i32, "{reply:?}");
    assert!(
        read_header::<pb::LinkReply, _>(&mut s).await.map(|r| r.is_none()).unwrap_or(true),
        "then closed"
    );

    let mut config = WorkerConfig::new(addrs(&servers), 0);
    config.token = Some(token.clone());
    let mut worker = Worker::connect(config).await.unwrap();
    worker.declare(spec()).await.unwrap();

    // 2^62 bytes for a 4-element tensor: refused by name, then the connection is cut.
    let mut s = authenticated(port, &token).await;
    let reply = refusal(&mut s, &push_announcing(vec![1 << 62], false)).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("at most"), "{}", reply.message);
    assert!(
        read_header::<pb::LinkReply, _>(&mut s).await.map(|r| r.is_none()).unwrap_or(true),
        "then closed"
    );

    // Lengths within the total but not what the tensor or table needs; small enough to be read
    // past, so the connection stays in step.
    let mut s = authenticated(port, &token).await;
    let mut ask = async |request: &pb::LinkRequest, payload: &[u8]| {
        write_frame(s.get_mut(), request, &[payload]).await.unwrap();
        tokio::time::timeout(PROMPTLY, read_header::<pb::LinkReply, _>(&mut s))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let reply = ask(&push_announcing(vec![20], false), &[0u8; 20]).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("`w`") && reply.message.contains("at most 16 bytes"), "{}", reply.message);
    let reply = ask(&push_announcing(vec![24, 20], true), &[0u8; 44]).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("`emb`") && reply.message.contains("24 value bytes"), "{}", reply.message);

    // The worker's own steps go on.
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.step().await.unwrap();
    let mut d = vec![Vec::new()];
    worker.pull_all_dense(&mut d).await.unwrap();
    assert_eq!(d[0], vec![0.5; 4]);
}
