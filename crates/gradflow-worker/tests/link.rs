//! The tensor link under misuse and restarts: a real server on loopback, and raw TCP clients
//! that speak the framing of `gradflow_proto::link` the way a broken or hostile client might.

mod common;

use std::net::SocketAddr;

use common::{addrs, config, link_spec as spec, start_shards};
use gradflow_core::Mode;
use gradflow_proto::auth::Token;
use gradflow_proto::link::{read_header, write_frame};
use gradflow_proto::{codec, pb};
use gradflow_ps::ServerConfig;
use gradflow_worker::{Code, Worker, WorkerConfig};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A raw link connection that has said hello with `token`; the hello's reply.
async fn raw(port: u16, token: Option<&Token>) -> (BufReader<TcpStream>, pb::LinkReply) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    let hello = pb::LinkHello { token: token.map(|t| t.expose().to_string()).unwrap_or_default(), worker: 0 };
    write_frame(s.get_mut(), &hello, &[]).await.unwrap();
    let reply = read_header::<pb::LinkReply, _>(&mut s).await.unwrap().expect("a reply to the hello");
    (s, reply)
}

fn push_of(values: &[f32]) -> (pb::LinkRequest, Vec<u8>) {
    let header = pb::PushRequest {
        worker: 0,
        step: 0,
        dense: vec![pb::DenseSlice { tensor: "w".into(), partition: 0, offset: 0, data: Default::default() }],
        sparse: vec![],
        task: None,
        ..Default::default()
    };
    let payload = codec::f32s_to_bytes(values).to_vec();
    let request = pb::LinkRequest {
        request: Some(pb::link_request::Request::Push(header)),
        payload_bytes: vec![payload.len() as u64],
    };
    (request, payload)
}

async fn dense(worker: &Worker) -> Vec<f32> {
    let mut d = vec![Vec::new()];
    worker.pull_all_dense(&mut d).await.unwrap();
    d.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cut_off_mid_payload_changes_nothing_and_the_server_stays_usable() {
    let servers = start_shards(1, |s| config(s, 1, 1, Mode::Sync)).await;
    let port = servers[0].shard().link_port;
    assert_ne!(port, 0, "the server offers a link");
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = dense(&worker).await;

    // Header and half the payload, then the connection goes away.
    let (mut s, hello) = raw(port, None).await;
    assert_eq!(hello.code, 0, "{hello:?}");
    let (request, payload) = push_of(&[1.0; 4]);
    write_frame(s.get_mut(), &request, &[]).await.unwrap();
    s.get_mut().write_all(&payload[..8]).await.unwrap();
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(dense(&worker).await, before, "no value changed");
    assert_eq!(worker.status().await.unwrap()[0].version, 0, "no step taken");

    // The worker's own step goes through, over the link.
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.step().await.unwrap();
    assert_eq!(dense(&worker).await, vec![0.5; 4]);
    assert!(servers[0].shard().metrics.link_connections.get() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_link_requests_are_refused_by_name_and_the_connection_stays_in_step() {
    let servers = start_shards(1, |s| {
        let mut c = config(s, 1, 1, Mode::Sync);
        (c.transport.chunk_bytes, c.transport.max_message_bytes) = (1024, 8192);
        c
    })
    .await;
    let port = servers[0].shard().link_port;
    let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = dense(&worker).await;
    let (mut s, _) = raw(port, None).await;

    let mut ask = async |request: &pb::LinkRequest, payload: &[u8]| {
        write_frame(s.get_mut(), request, &[payload]).await.unwrap();
        read_header::<pb::LinkReply, _>(&mut s).await.unwrap().expect("a reply")
    };
    // More bytes announced than the shard could ever take (its dense bytes plus the
    // message limit): refused by name, and the payload is read past, not kept.
    let (mut request, _) = push_of(&[1.0; 4]);
    request.payload_bytes = vec![20_000];
    let reply = ask(&request, &[0u8; 20_000]).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("at most 8208"), "{}", reply.message);

    // A length list that does not match the message.
    let (mut request, payload) = push_of(&[1.0; 4]);
    request.payload_bytes = vec![8, 8];
    let reply = ask(&request, &payload).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("payload lengths"), "{}", reply.message);

    // A slice that is not whole f32 values: the push's own validation speaks.
    let (mut request, _) = push_of(&[1.0; 4]);
    request.payload_bytes = vec![6];
    let reply = ask(&request, &[0u8; 6]).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("whole number of f32"), "{}", reply.message);

    // A NaN: refused whole.
    let (request, payload) = push_of(&[1.0, f32::NAN, 1.0, 1.0]);
    let reply = ask(&request, &payload).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("non-finite"), "{}", reply.message);

    // A sparse pull whose ids are not whole u64s.
    let pull = pb::PullSparseRequest {
        worker: 0,
        step: 0,
        tables: vec![pb::SparseIds { table: "emb".into(), ids: vec![0u8; 7].into() }],
        ..Default::default()
    };
    let request =
        pb::LinkRequest { request: Some(pb::link_request::Request::PullSparse(pull)), payload_bytes: vec![] };
    let reply = ask(&request, &[]).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert!(reply.message.contains("whole number of u64"), "{}", reply.message);

    // A request naming no operation.
    let reply = ask(&pb::LinkRequest::default(), &[]).await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");

    // Nothing changed, and the same connection still takes a good push.
    assert_eq!(dense(&worker).await, before);
    let (request, payload) = push_of(&[1.0; 4]);
    let reply = ask(&request, &payload).await;
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(dense(&worker).await, vec![0.5; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_wants_the_job_token() {
    let token = Token::generate();
    let servers =
        start_shards(1, |s| ServerConfig { token: Some(token.clone()), ..config(s, 1, 1, Mode::Sync) }).await;
    let port = servers[0].shard().link_port;
    let mut config = WorkerConfig::new(addrs(&servers), 0);
    config.token = Some(token.clone());
    let mut worker = Worker::connect(config).await.unwrap();
    worker.declare(spec()).await.unwrap();
    let before = dense(&worker).await;

    for (who, sent) in [("no token", None), ("a wrong token", Some(Token::generate()))] {
        let (mut s, reply) = raw(port, sent.as_ref()).await;
        assert_eq!(reply.code, Code::Unauthenticated as i32, "{who}: {reply:?}");
        // Whatever follows is not read: the server has closed the connection.
        let (request, payload) = push_of(&[1.0; 4]);
        let _ = write_frame(s.get_mut(), &request, &[&payload]).await;
        assert!(read_header::<pb::LinkReply, _>(&mut s).await.map(|r| r.is_none()).unwrap_or(true), "{who}");
    }
    assert_eq!(dense(&worker).await, before);
    assert_eq!(servers[0].shard().metrics.link_connections.get(), 1, "only the worker's connection");
    let (_, ok) = raw(port, Some(&token)).await;
    assert_eq!(ok.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_finds_the_link_again_after_the_server_restarts_on_another_port() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let first = gradflow_ps::start(config(0, 1, 1, Mode::Async), any, None).await.unwrap();
    let addr = first.addr();
    let old_port = first.shard().link_port;
    let mut worker = Worker::connect(WorkerConfig::new([addr.to_string()], 0)).await.unwrap();
    worker.declare(spec()).await.unwrap();
    worker.push_dense("w", &[1.0; 4]).unwrap();
    worker.step().await.unwrap();
    first.shutdown().await.unwrap();

    // Same gRPC address, and a link port that is not the old one: it is held meanwhile (bound,
    // not listening, so that connecting to it is refused as to a dead server's).
    let hold = tokio::net::TcpSocket::new_v4().unwrap();
    // The old connections linger in TIME_WAIT on that port.
    hold.set_reuseaddr(true).unwrap();
    let old: SocketAddr = format!("127.0.0.1:{old_port}").parse().unwrap();
    for attempt in 0.. {
        match hold.bind(old) {
            Ok(()) => break,
            // The first server's link listener may take a moment to close.
            Err(_) if attempt < 50 => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot hold port {old_port}: {e}"),
        }
    }
    let second = gradflow_ps::start(config(0, 1, 1, Mode::Async), addr, None).await.unwrap();
    assert_ne!(second.shard().link_port, old_port);
    worker.declare(spec()).await.unwrap();
    worker.push_dense("w", &[2.0; 4]).unwrap();
    worker.step().await.unwrap();
    assert_eq!(dense(&worker).await, vec![0.0; 4], "the new server took the push");
    assert!(second.shard().metrics.link_connections.get() >= 1, "over the link");
    second.shutdown().await.unwrap();
}
