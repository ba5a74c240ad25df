//! What the parameter server reads from the network: the byte codecs, every request message,
//! a push stream and its validation, and the model spec a worker declares.

use std::collections::BTreeSet;

use bytes::Bytes;
use gradflow_core::{DenseSpec, Initializer, ModelSpec, OptimizerConfig, Placement, SparseSpec};
use gradflow_proto::{codec as c, pb};
use gradflow_ps::PsError;
use gradflow_ps::model::{ShardModel, SparseAccum};
use gradflow_ps::push::{
    DenseGrad, Push, SparseGrad, TaskProgress, check_ids_on_shard, non_finite, validate,
};
use prost::Message;

/// Largest dense piece of the fuzzed model, in bytes: 4 elements, so tensors split in pieces.
pub const PB: u64 = 16;
/// Shards of the fuzzed model.
pub const SHARDS: u32 = 2;

/// The model the server-side targets validate against: two dense tensors (one split in
/// several pieces, with optimizer state) and two sparse tables.
pub fn spec() -> ModelSpec {
    ModelSpec {
        dense: vec![
            DenseSpec {
                name: "w".into(),
                shape: vec![3, 5],
                init: Initializer::Normal { mean: 0.0, std: 1.0, seed: 1 },
                optimizer: OptimizerConfig::adam(0.01),
            },
            DenseSpec {
                name: "b".into(),
                shape: vec![4],
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::sgd(0.1),
            },
        ],
        sparse: vec![
            SparseSpec {
                name: "emb".into(),
                dim: 3,
                init: Initializer::Normal { mean: 0.0, std: 0.5, seed: 2 },
                optimizer: OptimizerConfig::adagrad(0.1),
            },
            SparseSpec {
                name: "wide".into(),
                dim: 1,
                init: Initializer::Zeros,
                optimizer: OptimizerConfig::ftrl(0.1),
            },
        ],
    }
}

/// Shard `shard` of [`spec`] on [`SHARDS`] shards, as a server holds it after DeclareSpec.
pub fn model(shard: u32) -> ShardModel {
    ShardModel::new(spec(), SHARDS, shard, PB)
}

/// Decoding what was encoded gives the message back, and `encoded_len` is the truth.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len(), "encoded_len of {m:?}");
    let back = M::decode(&bytes[..]).expect("a re-encoded message decodes");
    assert_eq!(&back, m, "decode(encode(m)) == m");
}

/// Decodes `data` as an `M`; on success checks the round trip.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    round_trip(&m);
    Some(m)
}

// ---------------------------------------------------------------------------------------------
// codec

/// `gradflow_proto::codec`: lengths, the u64 id and f32 value decoders on every alignment, the
/// finiteness check, against plain per-element reference code.
pub fn codec(data: &[u8]) {
    assert_eq!(c::f32_len(data), (data.len() % 4 == 0).then_some(data.len() / 4));
    assert_eq!(c::u64_len(data), (data.len() % 8 == 0).then_some(data.len() / 8));

    let ids: Vec<u64> = c::u64s(data).collect();
    assert_eq!(ids.len(), data.len() / 8);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(*id, u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap()));
    }
    let mut out = vec![7, 8, 9];
    c::read_u64s(data, &mut out);
    assert_eq!(out, ids, "read_u64s clears and decodes");
    assert_eq!(&c::u64s_to_bytes(&ids)[..], &data[..ids.len() * 8]);

    // Every alignment of the f32 view: the fast paths cast in place only when aligned.
    for shift in 0..data.len().min(4) {
        let bytes = &data[shift..];
        let n = bytes.len() / 4;
        let whole = &bytes[..n * 4];
        let reference: Vec<f32> =
            whole.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();

        let mut values = vec![0f32; n];
        c::copy_f32s(&mut values, whole);
        assert!(values.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "copy_f32s");
        for (i, r) in reference.iter().enumerate() {
            assert_eq!(c::f32_at(whole, i).to_bits(), r.to_bits(), "f32_at({i})");
        }
        assert_eq!(&c::f32s_to_bytes(&values)[..], whole, "f32s_to_bytes is bit-exact");
        let mut ext = vec![1u8];
        c::extend_f32s(&mut ext, &values);
        assert_eq!(&ext[1..], whole, "extend_f32s appends");
        let mut written = vec![0u8; whole.len()];
        c::write_f32s(&mut written, &values);
        assert_eq!(written, whole, "write_f32s");

        let finite = reference.iter().all(|v| v.is_finite());
        assert_eq!(c::all_finite(whole), finite, "all_finite of {reference:?}");
        // A trailing partial value is ignored, as documented for the slow path.
        assert_eq!(c::all_finite(bytes), finite, "all_finite ignores a partial tail");

        let base: Vec<f32> = (0..n).map(|i| i as f32 - 1.5).collect();
        let mut sum = base.clone();
        c::add_f32s(&mut sum, whole);
        for ((s, b), r) in sum.iter().zip(&base).zip(&reference) {
            let want = b + r;
            assert!(s.to_bits() == want.to_bits() || (s.is_nan() && want.is_nan()), "add_f32s");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// push

/// A push stream as the server receives it: byte 0 picks the shard (bit 0) and whether
/// non-finite gradients are refused (bit 1 clear), then length-delimited `PushRequest`s.
///
/// A validated push must match the model exactly (each piece covered once, in order; sparse
/// rows of `dim` values for ids of this shard; no NaN when refused) and must apply without a
/// panic, in sync (accumulate, then apply) and async (apply at once) mode. A refused push gets
/// a client-error variant.
pub fn push(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else { return };
    let shard = u32::from(flags & 1);
    let reject = flags & 2 == 0;
    let mut msgs = Vec::new();
    while !rest.is_empty() {
        // tonic fails the whole stream at a message that does not decode; validating the
        // messages before it still reaches more of the validator.
        match pb::PushRequest::decode_length_delimited(&mut rest) {
            Ok(m) => {
                round_trip(&m);
                msgs.push(m);
            }
            Err(_) => break,
        }
    }
    check_push(&model(shard), msgs, reject);
}

/// A push stream's messages as the gRPC service decodes them into one [`Push`]; `None` where
/// it refuses the stream (empty, or mixing workers or steps).
fn to_push(msgs: Vec<pb::PushRequest>) -> Option<Push> {
    let first = msgs.first()?;
    let mut push = Push {
        worker: first.worker,
        step: first.step,
        task: first.task.map(|t| TaskProgress { lease: t.lease, examples: t.examples }),
        ..Push::default()
    };
    for m in msgs {
        if (m.worker, m.step) != (push.worker, push.step) {
            return None;
        }
        push.dense.extend(m.dense.into_iter().map(|d| DenseGrad {
            tensor: d.tensor,
            partition: d.partition,
            offset: d.offset,
            data: d.data,
        }));
        push.sparse.extend(m.sparse.into_iter().map(|g| SparseGrad {
            table: g.table,
            ids: g.ids,
            values: g.values,
        }));
    }
    Some(push)
}

fn check_push(model: &ShardModel, msgs: Vec<pb::PushRequest>, reject: bool) {
    let sent = msgs.clone();
    let Some(push) = to_push(msgs) else { return };
    check_valid_push(model, &sent, push, reject);
}

fn check_valid_push(model: &ShardModel, sent: &[pb::PushRequest], push: Push, reject: bool) {
    // As the server does: a push with a NaN or infinity in any message is refused whole.
    if reject && non_finite(&push.dense, &push.sparse).is_some() {
        return;
    }
    let valid = match validate(model, push) {
        Ok(v) => v,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    PsError::InvalidArgument(_)
                        | PsError::UnknownTensor(_)
                        | PsError::UnknownTable(_)
                        | PsError::NonFinite(_)
                ),
                "a bad push is the client's error: {e:?}"
            );
            return;
        }
    };
    assert_eq!((valid.worker, valid.step), (sent[0].worker, sent[0].step));
    assert!(sent.iter().all(|m| (m.worker, m.step) == (valid.worker, valid.step)));

    // Dense: exactly the pieces named, each once, covered exactly, all values finite if asked.
    let named: BTreeSet<usize> = sent
        .iter()
        .flat_map(|m| &m.dense)
        .map(|s| model.piece(&s.tensor, s.partition).expect("validated names resolve"))
        .collect();
    let got: BTreeSet<usize> = valid.dense.iter().map(|(i, _)| *i).collect();
    assert_eq!(got.len(), valid.dense.len(), "each piece once");
    assert_eq!(got, named, "every named piece, nothing else");
    let mut bytes = 0u64;
    for (idx, slices) in &valid.dense {
        let len: usize = slices.iter().map(|s| s.len()).sum();
        assert!(slices.iter().all(|s| s.len() % 4 == 0));
        assert_eq!(len, model.pieces()[*idx].len() * 4, "slices cover the piece");
        assert!(!reject || slices.iter().all(|s| c::all_finite(s)));
        bytes += len as u64;
    }
    // Sparse: one entry per message entry, rows of `dim`, ids on this shard.
    assert_eq!(valid.sparse.len(), sent.iter().map(|m| m.sparse.len()).sum::<usize>());
    for ((t, ids, values), g) in valid.sparse.iter().zip(sent.iter().flat_map(|m| &m.sparse)) {
        let table = &model.tables()[*t];
        assert_eq!(table.name(), g.table);
        assert_eq!(ids.len() * 8, g.ids.len());
        assert_eq!(values.len(), ids.len() * table.dim() * 4);
        assert!(ids.iter().all(|&id| Placement::sparse_shard(id, SHARDS) == model.shard()));
        assert!(!reject || c::all_finite(values));
        bytes += (g.ids.len() + values.len()) as u64;
    }
    assert_eq!(valid.bytes, bytes, "bytes received");

    // Sync: into the step's sums, then one optimizer step.
    for (idx, slices) in &valid.dense {
        let mut offset = 0;
        for s in slices {
            model.pieces()[*idx].accumulate(offset, s);
            offset += s.len() / 4;
        }
    }
    for (t, ids, values) in &valid.sparse {
        model.tables()[*t].accumulate(ids, values);
    }
    model.apply_accumulated(1.0);
    // Async: applied at once.
    for (idx, slices) in &valid.dense {
        let piece = &model.pieces()[*idx];
        let mut grad = vec![0f32; piece.len()];
        let mut offset = 0;
        for s in slices {
            let n = s.len() / 4;
            c::copy_f32s(&mut grad[offset..offset + n], s);
            offset += n;
        }
        piece.apply(&grad);
    }
    for (t, ids, values) in &valid.sparse {
        let table = &model.tables()[*t];
        let mut acc = SparseAccum::default();
        acc.add(ids, values, table.dim());
        table.apply(&acc, 1.0);
    }
}

// ---------------------------------------------------------------------------------------------
// requests

/// Every message type on the wire: byte 0 picks one, the rest is its protobuf encoding. Each
/// decoded message must round-trip; requests then go through the checks their handler makes
/// before doing anything (names resolve, ids are whole u64s on this shard, the spec parses and
/// validates), and the pulls that pass must answer with exactly the bytes they promise.
pub fn requests(data: &[u8]) {
    let Some((&kind, msg)) = data.split_first() else { return };
    match kind % 20 {
        0 => {
            if let Some(r) = decode::<pb::DeclareSpecRequest>(msg) {
                spec_json(&r.spec_json);
            }
        }
        1 => {
            decode::<pb::HeartbeatRequest>(msg);
        }
        2 => {
            if let Some(r) = decode::<pb::PullDenseRequest>(msg) {
                pull_dense(&model(r.worker % SHARDS), &r);
            }
        }
        3 => {
            if let Some(r) = decode::<pb::PullSparseRequest>(msg) {
                pull_sparse(&model(r.worker % SHARDS), &r);
            }
        }
        4 => {
            if let Some(r) = decode::<pb::PushRequest>(msg) {
                check_push(&model(r.worker % SHARDS), vec![r], true);
            }
        }
        5 => {
            decode::<pb::LeaveRequest>(msg);
        }
        6 => {
            decode::<pb::StatusRequest>(msg);
        }
        7 => {
            decode::<pb::CheckpointRequest>(msg);
        }
        // What a worker reads back.
        8 => {
            decode::<pb::DeclareSpecResponse>(msg);
        }
        9 => {
            decode::<pb::HeartbeatResponse>(msg);
        }
        10 => {
            decode::<pb::DenseChunk>(msg);
        }
        11 => {
            decode::<pb::PullSparseResponse>(msg);
        }
        12 => {
            decode::<pb::PushResponse>(msg);
        }
        13 => {
            decode::<pb::StatusResponse>(msg);
        }
        14 => {
            decode::<pb::CheckpointResponse>(msg);
        }
        15 => {
            decode::<pb::LeaveResponse>(msg);
        }
        // Dynamic data sharding, on shard 0.
        16 => {
            decode::<pb::DeclareTasksRequest>(msg);
        }
        17 => {
            decode::<pb::NextTaskRequest>(msg);
        }
        18 => {
            decode::<pb::DeclareTasksResponse>(msg);
        }
        _ => {
            decode::<pb::NextTaskResponse>(msg);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// link

/// The tensor link's frames (`gradflow_proto::link`): `data[0]` picks what is read, `data[1..3]`
/// is the header's length (little-endian `u16`), then the header, then payload bytes.
///
/// - 0: a `LinkRequest` as a server reads it. A push's payload lengths are checked as the
///   server does before reading any payload (`gradflow_ps::link::push_lengths`: a refusal is
///   the client's error); when the input holds that much payload, the push is decoded
///   from the header and payload (`decode_push`, each slice exactly its announced length) and the push goes through
///   the same checks as a gRPC push. Pulls go through their handlers' checks.
/// - 1: a `LinkReply` as a worker reads it: the status it carries is absent exactly when the
///   code is 0, and keeps the message.
/// - other: a `LinkHello`.
pub fn link(data: &[u8]) {
    let [kind, a, b, rest @ ..] = data else { return };
    let (header, payload) = rest.split_at(usize::from(u16::from_le_bytes([*a, *b])).min(rest.len()));
    match kind % 3 {
        0 => {
            let Some(req) = decode::<pb::LinkRequest>(header) else { return };
            match req.request {
                Some(pb::link_request::Request::Push(msg)) => {
                    let m = model(msg.worker % SHARDS);
                    let limit = m.dense_bytes() + LINK_SPARSE_LIMIT;
                    match gradflow_ps::link::push_lengths(&msg, &req.payload_bytes, limit) {
                        Ok(total) => {
                            assert_eq!(
                                Some(total as u64),
                                gradflow_proto::link::payload_total(&req.payload_bytes)
                            );
                            assert!(total as u64 <= limit);
                            // With less, the server would wait for the rest of the payload.
                            if total > payload.len() {
                                return;
                            }
                            let body = Bytes::copy_from_slice(&payload[..total]);
                            let size = gradflow_proto::codec::value_bytes(msg.encoding()) as u64;
                            let push = match gradflow_ps::link::decode_push(msg, &req.payload_bytes, body) {
                                Ok(push) => push,
                                // Segments that are not whole values of the push's encoding.
                                Err(e) => {
                                    assert!(matches!(e, PsError::InvalidArgument(_)), "{e:?}");
                                    return;
                                }
                            };
                            // What the frame said, with its payload in place: the one message
                            // a gRPC push of the same gradients would have sent.
                            let sent = [pb::PushRequest {
                                worker: push.worker,
                                step: push.step,
                                dense: push
                                    .dense
                                    .iter()
                                    .map(|d| pb::DenseSlice {
                                        tensor: d.tensor.clone(),
                                        partition: d.partition,
                                        offset: d.offset,
                                        data: d.data.clone(),
                                    })
                                    .collect(),
                                sparse: push
                                    .sparse
                                    .iter()
                                    .map(|g| pb::SparseGrad {
                                        table: g.table.clone(),
                                        ids: g.ids.clone(),
                                        values: g.values.clone(),
                                    })
                                    .collect(),
                                task: None,
                                ..Default::default()
                            }];
                            // Values widened to f32 from `size` bytes each.
                            let lengths: Vec<u64> = push
                                .dense
                                .iter()
                                .map(|d| d.data.len() as u64 * size / 4)
                                .chain(
                                    push.sparse
                                        .iter()
                                        .flat_map(|g| [g.ids.len() as u64, g.values.len() as u64 * size / 4]),
                                )
                                .collect();
                            assert_eq!(lengths, req.payload_bytes, "each field holds its announced bytes");
                            check_valid_push(&m, &sent, push, true);
                        }
                        Err(e) => assert!(matches!(e, PsError::InvalidArgument(_)), "{e:?}"),
                    }
                }
                Some(pb::link_request::Request::PullDense(r)) => pull_dense(&model(r.worker % SHARDS), &r),
                Some(pb::link_request::Request::PullSparse(r)) => pull_sparse(&model(r.worker % SHARDS), &r),
                None => {}
            }
        }
        1 => {
            let Some(reply) = decode::<pb::LinkReply>(header) else { return };
            match gradflow_proto::link::status_of(&reply) {
                None => assert_eq!(reply.code, 0),
                Some(status) => {
                    assert_ne!(reply.code, 0);
                    assert_eq!(status.message(), reply.message);
                }
            }
        }
        _ => {
            decode::<pb::LinkHello>(header);
        }
    }
}

/// The sparse part of a link push's size limit in the `link` target (a server's
/// `transport.max_message_bytes`).
const LINK_SPARSE_LIMIT: u64 = 1 << 16;

/// A `link` target input: kind, header length, header, payload.
fn link_input(kind: u8, header: &impl Message, payload: &[&[u8]]) -> Vec<u8> {
    let header = header.encode_to_vec();
    let mut out = vec![kind];
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// PullDense: the pieces asked for (all when none) resolve, and each reads at its length.
fn pull_dense(model: &ShardModel, r: &pb::PullDenseRequest) {
    let pieces: Result<Vec<usize>, PsError> = if r.pieces.is_empty() {
        Ok((0..model.pieces().len()).collect())
    } else {
        r.pieces.iter().map(|p| model.piece(&p.tensor, p.partition)).collect()
    };
    match pieces {
        Ok(pieces) => {
            for idx in pieces {
                let piece = &model.pieces()[idx];
                assert_eq!(piece.read(0, piece.len()).len(), piece.len() * 4);
            }
        }
        Err(e) => assert!(matches!(e, PsError::UnknownTensor(_) | PsError::InvalidArgument(_)), "{e:?}"),
    }
}

/// PullSparse: the handler's checks, then the rows; pulling again returns the same bytes.
fn pull_sparse(model: &ShardModel, r: &pb::PullSparseRequest) {
    let mut wanted = Vec::new();
    for t in &r.tables {
        let idx = match model.table(&t.table) {
            Ok(i) => i,
            Err(e) => {
                assert!(matches!(e, PsError::UnknownTable(_)), "{e:?}");
                return;
            }
        };
        if c::u64_len(&t.ids).is_none() {
            return;
        }
        let ids: Vec<u64> = c::u64s(&t.ids).collect();
        if let Err(e) = check_ids_on_shard(model, &t.table, &ids) {
            assert!(matches!(e, PsError::InvalidArgument(_)), "{e:?}");
            return;
        }
        wanted.push((idx, ids));
    }
    for (idx, ids) in wanted {
        let table = &model.tables()[idx];
        let mut rows = Vec::new();
        table.pull(&ids, &mut rows);
        assert_eq!(rows.len(), ids.len() * table.dim() * 4);
        let mut again = vec![0u8; 3];
        table.pull(&ids, &mut again);
        assert_eq!(&again[3..], &rows[..], "rows are created once, then read");
    }
}

// ---------------------------------------------------------------------------------------------
// model spec

/// The model spec a worker declares (DeclareSpecRequest.spec_json; also in every checkpoint
/// manifest): parse and validate as the server does. A valid spec must survive JSON (it is
/// written into checkpoint manifests and compared on every later DeclareSpec) and equal itself.
pub fn model_spec(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        spec_json(text);
    }
}

fn spec_json(text: &str) {
    let Ok(spec) = serde_json::from_str::<ModelSpec>(text) else { return };
    assert_eq!(spec.first_difference(&spec), None);
    if spec.validate().is_err() {
        return;
    }
    let json = serde_json::to_string(&spec).expect("a valid spec serializes");
    let back: ModelSpec = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("a valid spec must read back from its own JSON `{json}`: {e}"));
    assert_eq!(back.first_difference(&spec), None, "{json}");
    back.validate().expect("still valid after a round trip");
}

// ---------------------------------------------------------------------------------------------
// seeds

fn slice(tensor: &str, partition: u32, offset: u64, values: &[f32]) -> pb::DenseSlice {
    pb::DenseSlice { tensor: tensor.into(), partition, offset, data: c::f32s_to_bytes(values) }
}

fn grad(table: &str, ids: &[u64], dim: usize) -> pb::SparseGrad {
    let values: Vec<f32> = (0..ids.len() * dim).map(|i| i as f32 * 0.25 - 1.0).collect();
    pb::SparseGrad { table: table.into(), ids: c::u64s_to_bytes(ids), values: c::f32s_to_bytes(&values) }
}

/// Ids of `spec`'s tables that live on `shard`.
pub fn ids_on(shard: u32, n: usize) -> Vec<u64> {
    (0u64..).filter(|&id| Placement::sparse_shard(id, SHARDS) == shard).take(n).collect()
}

pub(crate) fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let bytes = |v: &[u8]| v.to_vec();
    out.push(("codec", "seed-floats".into(), bytes(&c::f32s_to_bytes(&[1.5, -0.0, f32::MAX, 1e-45, 3.0]))));
    out.push(("codec", "seed-nan".into(), bytes(&c::f32s_to_bytes(&[f32::NAN, 2.0, f32::NEG_INFINITY]))));
    out.push(("codec", "seed-ids".into(), bytes(&c::u64s_to_bytes(&[0, 7, u64::MAX, 1 << 40]))));

    // A push covering everything on each shard, in one message and in two (sliced) messages.
    for shard in 0..SHARDS {
        let m = model(shard);
        let mut dense = Vec::new();
        for p in m.pieces() {
            let values: Vec<f32> = (0..p.len()).map(|i| i as f32 * 0.5).collect();
            dense.push(slice(p.tensor(), p.partition(), 0, &values));
        }
        let ids = ids_on(shard, 3);
        let sparse = vec![grad("emb", &ids, 3), grad("wide", &ids[..2], 1)];
        let one = pb::PushRequest {
            worker: 1,
            step: 4,
            dense: dense.clone(),
            sparse: sparse.clone(),
            ..Default::default()
        };
        let mut stream = vec![(shard as u8) | 2];
        one.encode_length_delimited(&mut stream).unwrap();
        out.push(("push", format!("seed-shard{shard}-one-message"), stream));

        // The first piece in two slices over two messages, the rest and the rows in the second.
        let first = &m.pieces()[0];
        let values: Vec<f32> = (0..first.len()).map(|i| i as f32).collect();
        let cut = first.len() / 2;
        let a = pb::PushRequest {
            worker: 0,
            step: 9,
            dense: vec![slice(first.tensor(), first.partition(), 0, &values[..cut])],
            ..Default::default()
        };
        let mut rest = vec![slice(first.tensor(), first.partition(), cut as u64, &values[cut..])];
        rest.extend(dense[1..].iter().cloned());
        let b = pb::PushRequest { worker: 0, step: 9, dense: rest, sparse, ..Default::default() };
        let mut stream = vec![shard as u8];
        a.encode_length_delimited(&mut stream).unwrap();
        b.encode_length_delimited(&mut stream).unwrap();
        out.push(("push", format!("seed-shard{shard}-two-messages"), stream));
    }

    // The tensor link: a push per shard as a worker sends it, pulls, replies, a hello.
    for shard in 0..SHARDS {
        let m = model(shard);
        let mut header = pb::PushRequest { worker: shard, step: 2, ..Default::default() };
        let mut payload: Vec<Vec<u8>> = Vec::new();
        for p in m.pieces() {
            let values: Vec<f32> = (0..p.len()).map(|i| i as f32 * 0.25).collect();
            header.dense.push(pb::DenseSlice {
                tensor: p.tensor().to_string(),
                partition: p.partition(),
                offset: 0,
                data: Bytes::new(),
            });
            payload.push(c::f32s_to_bytes(&values).to_vec());
        }
        let ids = ids_on(shard, 2);
        let g = grad("emb", &ids, 3);
        header.sparse.push(pb::SparseGrad {
            table: g.table.clone(),
            ids: Bytes::new(),
            values: Bytes::new(),
        });
        payload.push(g.ids.to_vec());
        payload.push(g.values.to_vec());
        let req = pb::LinkRequest {
            request: Some(pb::link_request::Request::Push(header)),
            payload_bytes: payload.iter().map(|p| p.len() as u64).collect(),
        };
        let parts: Vec<&[u8]> = payload.iter().map(|p| p.as_slice()).collect();
        out.push(("link", format!("seed-push-shard{shard}"), link_input(0, &req, &parts)));
    }
    let pull = pb::LinkRequest {
        request: Some(pb::link_request::Request::PullDense(pb::PullDenseRequest {
            worker: 0,
            step: 1,
            pieces: vec![],
            ..Default::default()
        })),
        payload_bytes: vec![],
    };
    out.push(("link", "seed-pull-dense".into(), link_input(0, &pull, &[])));
    let pull = pb::LinkRequest {
        request: Some(pb::link_request::Request::PullSparse(pb::PullSparseRequest {
            worker: 1,
            step: 1,
            tables: vec![pb::SparseIds { table: "emb".into(), ids: c::u64s_to_bytes(&ids_on(1, 3)) }],
            ..Default::default()
        })),
        payload_bytes: vec![],
    };
    out.push(("link", "seed-pull-sparse".into(), link_input(0, &pull, &[])));
    let reply = pb::LinkReply {
        code: 9,
        message: "stale".into(),
        metadata: [("x-gradflow-version".to_string(), "7".to_string())].into(),
        version: 7,
        pieces: vec![pb::LinkPiece { tensor: "w".into(), partition: 0, len: 4 }],
    };
    out.push(("link", "seed-reply".into(), link_input(1, &reply, &[])));
    out.push((
        "link",
        "seed-hello".into(),
        link_input(2, &pb::LinkHello { token: "t".repeat(32), worker: 3 }, &[]),
    ));

    let spec_text = serde_json::to_string(&spec()).unwrap();
    out.push(("model_spec", "seed-spec".into(), spec_text.clone().into_bytes()));
    let mut req = |kind: u8, name: &str, m: &dyn Fn(&mut Vec<u8>)| {
        let mut b = vec![kind];
        m(&mut b);
        out.push(("requests", format!("seed-{name}"), b));
    };
    let declare = pb::DeclareSpecRequest {
        worker: 0,
        spec_json: spec_text,
        partition_bytes: 1024,
        num_shards: 2,
        shard: 1,
        servers: vec![],
    };
    req(0, "declare", &|b| declare.encode(b).unwrap());
    req(1, "heartbeat", &|b| pb::HeartbeatRequest { worker: 3, step: 12 }.encode(b).unwrap());
    let pieces = vec![
        pb::PieceRef { tensor: "w".into(), partition: 0 },
        pb::PieceRef { tensor: "b".into(), partition: 0 },
    ];
    req(2, "pull-dense", &|b| {
        pb::PullDenseRequest { worker: 0, step: 1, pieces: pieces.clone(), ..Default::default() }
            .encode(b)
            .unwrap()
    });
    let tables = vec![
        pb::SparseIds { table: "emb".into(), ids: c::u64s_to_bytes(&ids_on(1, 4)) },
        pb::SparseIds { table: "wide".into(), ids: c::u64s_to_bytes(&ids_on(1, 2)) },
    ];
    req(3, "pull-sparse", &|b| {
        pb::PullSparseRequest { worker: 1, step: 1, tables: tables.clone(), ..Default::default() }
            .encode(b)
            .unwrap()
    });
    let push = pb::PushRequest {
        worker: 0,
        step: 2,
        dense: vec![slice("b", 0, 0, &[1.0, 2.0, 3.0, 4.0])],
        sparse: vec![grad("emb", &ids_on(0, 2), 3)],
        ..Default::default()
    };
    req(4, "push", &|b| push.encode(b).unwrap());
    req(7, "checkpoint", &|b| pb::CheckpointRequest { step: 100 }.encode(b).unwrap());
    let chunk = pb::DenseChunk {
        tensor: "w".into(),
        partition: 1,
        offset: 4,
        data: Bytes::from(c::f32s_to_bytes(&[1.0, 2.0])),
        version: 3,
    };
    req(10, "dense-chunk", &|b| chunk.encode(b).unwrap());
    let status = pb::StatusResponse {
        shard: 1,
        num_shards: 2,
        mode: "sync".into(),
        version: 5,
        declared: true,
        live_workers: vec![0, 1],
        dense_bytes: 76,
        sparse_rows: 9,
        num_workers: 2,
        link_port: 0,
        scored_epochs: Some(1),
    };
    req(13, "status", &|b| status.encode(b).unwrap());
    out
}
