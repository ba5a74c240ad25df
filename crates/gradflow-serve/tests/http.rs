//! The HTTP server over real checkpoints in a folder: the TensorFlow Serving REST shape, the
//! 400s that name the field, `/metrics`, a newer checkpoint swapped in under concurrent load
//! without a request dropped, and a corrupt checkpoint refused while the previous model keeps
//! serving. Every server listens on port 0; the client is a plain HTTP/1.1 exchange over TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gradflow_checkpoint::{CheckpointStore, DensePieceSnapshot, ShardSnapshot, TableSnapshot};
use gradflow_core::Mode;
use gradflow_models::{InputSchema, Model, ModelConfig, Scaling, ServingInfo, WideDeep, WideDeepConfig};
use gradflow_serve::{LoadedModel, ServeConfig, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config() -> WideDeepConfig {
    let mut c = WideDeepConfig::new(2, 2);
    c.hash_buckets = 100;
    c.embedding_dim = 3;
    c.hidden = vec![4];
    c
}

fn info() -> ServingInfo {
    let input = InputSchema {
        label: "label".into(),
        dense: vec!["d0".into(), "d1".into()],
        categorical: vec!["c0".into(), "c1".into()],
    };
    let scaling = Scaling { mean: vec![1.0, -2.0], std: vec![2.0, 0.5] };
    ServingInfo::new("tiny", ModelConfig::WideDeep(config()), input, Some(scaling))
}

/// A one-shard snapshot at `step`: every dense tensor at its initial values plus `bump`, and
/// rows 0..50 of both tables.
fn snapshot(step: u64, bump: f32) -> ShardSnapshot {
    let model = WideDeep::new(config()).unwrap();
    let spec = model.spec().clone();
    let dense = spec
        .dense
        .iter()
        .map(|d| {
            let mut values = vec![0.0; d.numel() as usize];
            d.init.fill_dense(&d.name, &d.shape, 0, &mut values);
            values.iter_mut().for_each(|v| *v += bump);
            DensePieceSnapshot {
                tensor: d.name.clone(),
                partition: 0,
                offset: 0,
                state: vec![0.1; values.len()],
                values,
                steps: step,
            }
        })
        .collect();
    let sparse = spec
        .sparse
        .iter()
        .map(|s| {
            let ids: Vec<u64> = (0..50).collect();
            let values = (0..50 * s.dim).map(|i| (i as f32 * 0.37).sin() * 0.2 + bump).collect();
            TableSnapshot {
                table: s.name.clone(),
                dim: s.dim,
                num_slots: 1,
                values,
                state: vec![0.1; 50 * s.dim as usize],
                steps: vec![1; 50],
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
        version: step,
        mode: Mode::Sync,
        spec,
        partition_bytes: 1 << 20,
        dense,
        sparse,
        serving: Some(serde_json::to_value(info()).unwrap()),
    }
}

/// Writes checkpoint `step` into `root`; with `corrupt`, alters one of its data files after
/// the shard wrote it and before the checkpoint is complete (as a bad disk would).
async fn write(root: &Path, step: u64, bump: f32, corrupt: bool) {
    let store = CheckpointStore::open(root.to_str().unwrap()).unwrap();
    store.write_shard(step, &snapshot(step, bump)).await.unwrap();
    if corrupt {
        let file = root.join(gradflow_checkpoint::checkpoint_dir_name(step)).join("shard-0/sparse-1.bin");
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
    }
    store.finalize(step, 1, 0, Duration::from_secs(60)).await.unwrap();
}

async fn start(root: &Path) -> (Arc<Server>, SocketAddr) {
    let mut cfg = ServeConfig::new(root.to_str().unwrap(), "latest");
    cfg.poll = Duration::from_millis(20);
    let server = Server::start(cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gradflow_serve::http::serve(listener, server.clone(), std::future::pending()));
    (server, addr)
}

/// One HTTP/1.1 exchange: the status code and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

fn rows() -> Value {
    json!([
        {"d0": 1.5, "d1": -2, "c0": "red", "c1": 7},
        {"d0": 0, "d1": 0.25, "c0": "never seen", "c1": "x", "label": 1},
        {"c1": null, "d1": 3, "c0": "", "d0": -4.5},
    ])
}

/// What the model of checkpoint `step` in `root` predicts for [`rows`], in process.
async fn in_process(root: &Path, step: u64) -> Vec<f32> {
    let store = CheckpointStore::open(root.to_str().unwrap()).unwrap();
    let model = LoadedModel::load(&store, &step.to_string()).await.unwrap();
    let rows: Vec<_> = rows().as_array().unwrap().iter().map(|r| r.as_object().unwrap().clone()).collect();
    let mut batch = gradflow_serve::RowDecoder::new(&model.info().input).batch(&rows).unwrap();
    let mut out = Vec::new();
    model.predict(&mut batch, &mut out).unwrap();
    out
}

fn predictions(body: &str) -> Vec<f64> {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["predictions"]
        .as_array()
        .unwrap_or_else(|| panic!("no predictions: {body}"))
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect()
}

fn close(a: &[f64], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - *y as f64).abs() <= 1e-6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_the_tf_serving_shape_and_names_the_field_of_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1, 0.0, false).await;
    let (_server, addr) = start(dir.path()).await;
    let expected = in_process(dir.path(), 1).await;

    let (code, body) =
        http(addr, "POST", "/v1/models/tiny:predict", &json!({"instances": rows()}).to_string()).await;
    assert_eq!(code, 200, "{body}");
    let got = predictions(&body);
    assert!(close(&got, &expected), "{got:?} vs {expected:?}");

    let (code, body) = http(addr, "GET", "/v1/models/tiny", "").await;
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["model_version_status"][0]["version"], "1");
    assert_eq!(status["model_version_status"][0]["state"], "AVAILABLE");

    let bad = [
        (json!({"d0": 1, "d1": 2, "c0": "a", "c1": "b", "colour": "red"}), "`colour`"),
        (json!({"d0": 1, "c0": "a", "c1": "b"}), "`d1` is missing"),
        (json!({"d0": "1", "d1": 2, "c0": "a", "c1": "b"}), "`d0` must be a finite number"),
        (json!({"d0": 1, "d1": 2, "c0": 2.5, "c1": "b"}), "`c0` must be a string or an integer"),
    ];
    for (row, said) in bad {
        let body = json!({"instances": [rows()[0].clone(), row]}).to_string();
        let (code, answer) = http(addr, "POST", "/v1/models/tiny:predict", &body).await;
        assert_eq!(code, 400, "{answer}");
        let error = serde_json::from_str::<Value>(&answer).unwrap()["error"].as_str().unwrap().to_string();
        assert!(error.contains(said) && error.starts_with("instance 1"), "{error}");
    }
    let (code, answer) = http(addr, "POST", "/v1/models/tiny:predict", "{\"rows\": []}").await;
    assert!(code == 400 && answer.contains("instances"), "{answer}");
    let (code, answer) =
        http(addr, "POST", "/v1/models/other:predict", &json!({"instances": []}).to_string()).await;
    assert!(code == 404 && answer.contains("serves `tiny`"), "{answer}");

    let (code, text) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    assert!(text.contains("gradflow_serve_request_seconds_bucket"), "{text}");
    assert!(text.contains("code=\"400\"") && text.contains("gradflow_serve_model_step 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_checkpoint_is_swapped_in_under_load_and_a_corrupt_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1, 0.0, false).await;
    let (server, addr) = start(dir.path()).await;
    let old = in_process(dir.path(), 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let body = json!({"instances": rows()}).to_string();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, body) = (stop.clone(), body.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    answers.push(http(addr, "POST", "/v1/models/tiny:predict", &body).await);
                }
                answers
            })
        })
        .collect();

    // Under that load: a newer checkpoint; the server finds it by itself.
    write(dir.path(), 2, 0.05, false).await;
    let new = in_process(dir.path(), 2).await;
    assert!(!close(&old.iter().map(|&p| p as f64).collect::<Vec<_>>(), &new), "the two models must differ");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) = http(addr, "GET", "/v1/models/tiny", "").await;
        if body.contains("\"version\":\"2\"") {
            break;
        }
        assert!(Instant::now() < deadline, "checkpoint 2 was not picked up: {body}");
        tokio::task::yield_now().await;
    }
    // Some more requests on the new model, then stop the clients.
    for _ in 0..5 {
        let (code, body) =
            http(addr, "POST", "/v1/models/tiny:predict", &json!({"instances": rows()}).to_string()).await;
        assert_eq!(code, 200);
        assert!(close(&predictions(&body), &new));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut on_old, mut on_new) = (0, 0);
    for c in clients {
        for (code, body) in c.await.unwrap() {
            assert_eq!(code, 200, "a request failed during the swap: {body}");
            let p = predictions(&body);
            if close(&p, &old) {
                on_old += 1;
            } else if close(&p, &new) {
                on_new += 1;
            } else {
                panic!("an answer from neither model: {p:?} (old {old:?}, new {new:?})");
            }
        }
    }
    assert!(on_old > 0, "no request was answered before the swap ({on_new} after)");

    // A checkpoint whose file fails its checksum is refused; step 2 keeps serving.
    write(dir.path(), 3, 0.1, true).await;
    let err = server.reload().await.unwrap_err().to_string();
    assert!(err.contains("sparse-1.bin"), "{err}");
    assert_eq!(server.current().model.step(), 2);
    let (code, body) =
        http(addr, "POST", "/v1/models/tiny:predict", &json!({"instances": rows()}).to_string()).await;
    assert_eq!(code, 200);
    assert!(close(&predictions(&body), &new));
    let (_, text) = http(addr, "GET", "/metrics", "").await;
    assert!(text.contains("gradflow_serve_reloads_total{result=\"refused\"}"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_predict_answers_like_rest_and_names_the_field() {
    use gradflow_proto::pb;
    use pb::feature::Kind;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1, 0.0, false).await;
    let (server, _) = start(dir.path()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gradflow_serve::grpc::serve(listener, server, std::future::pending()));
    let expected = in_process(dir.path(), 1).await;

    let feature = |v: &Value| pb::Feature {
        kind: Some(match v {
            Value::Null => Kind::Null(true),
            Value::String(s) => Kind::Text(s.clone()),
            Value::Number(n) if n.is_i64() => Kind::Integer(n.as_i64().unwrap()),
            Value::Number(n) => Kind::Number(n.as_f64().unwrap()),
            other => panic!("{other}"),
        }),
    };
    let instance = |row: &Value| pb::Instance {
        columns: row.as_object().unwrap().iter().map(|(k, v)| (k.clone(), feature(v))).collect(),
    };
    // In the REST rows integers stand for dense values too; as gRPC numbers they must be doubles.
    let dense_as_numbers = |row: &Value| {
        let mut i = instance(row);
        for d in ["d0", "d1"] {
            let x = row[d].as_f64().unwrap();
            i.columns.insert(d.into(), pb::Feature { kind: Some(Kind::Number(x)) });
        }
        i
    };
    let mut client = pb::predictor_client::PredictorClient::connect(format!("http://{addr}")).await.unwrap();
    let instances: Vec<_> = rows().as_array().unwrap().iter().map(dense_as_numbers).collect();
    let answer = client
        .predict(pb::PredictRequest { model: "tiny".into(), instances: instances.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.step, 1);
    assert_eq!(answer.predictions.len(), expected.len());
    assert!(answer.predictions.iter().zip(&expected).all(|(a, b)| (a - b).abs() <= 1e-6));

    let mut bad = instances[0].clone();
    bad.columns.insert("d1".into(), pb::Feature { kind: Some(Kind::Text("x".into())) });
    let e =
        client.predict(pb::PredictRequest { model: "tiny".into(), instances: vec![bad] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("`d1`"), "{}", e.message());
    let e = client.predict(pb::PredictRequest { model: "other".into(), instances }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}
