//! The tch adapter's view of a VarStore (names, shapes, initializers, optimizers), its
//! errors, and what a pull puts into the variables.

#![cfg(feature = "tch")]

mod common;

use common::*;
use gradflow_core::{Initializer, Mode, OptimizerConfig};
use gradflow_worker::tch::{TchAdapter, TchError, Transfer};
use gradflow_worker::{Worker, WorkerConfig};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// A store with an embedding, a linear layer, a trainable constant and a non-trainable
/// buffer; and the linear layer.
fn store() -> (nn::VarStore, nn::Linear) {
    store_sized(50, 5, 4)
}

/// [`store`] with an embedding of `rows` rows and a `fan_in` -> `fan_out` linear layer.
fn store_sized(rows: i64, fan_in: i64, fan_out: i64) -> (nn::VarStore, nn::Linear) {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = nn::embedding(&root / "emb", rows, 3, Default::default());
    let linear = nn::linear(&root / "enc" / "l1", fan_in, fan_out, Default::default());
    let _ = root.ones("scale", &[fan_out]);
    let _ = root.zeros_no_train("running_mean", &[fan_out]);
    (vs, linear)
}

#[test]
fn the_spec_names_every_trainable_variable_by_its_path_with_its_shape() {
    // Large enough that the sample's kurtosis tells uniform from normal every time (at 20
    // values it does not).
    let (vs, _) = store_sized(2000, 64, 32);
    let model = TchAdapter::builder(&vs, OptimizerConfig::adam(0.01))
        .sparse_table("emb.weight")
        .optimizer("emb.weight", OptimizerConfig::adagrad(0.1))
        .init("enc.l1.bias", Initializer::Zeros)
        .build()
        .unwrap();
    let spec = model.spec();
    let dense: Vec<(&str, &[u64])> =
        spec.dense.iter().map(|d| (d.name.as_str(), d.shape.as_slice())).collect();
    // Sorted by name; the non-trainable running_mean stays local.
    assert_eq!(
        dense,
        vec![("enc.l1.bias", &[32][..]), ("enc.l1.weight", &[32, 64][..]), ("scale", &[32][..])]
    );
    assert!(spec.dense.iter().all(|d| d.optimizer == OptimizerConfig::adam(0.01)));
    assert_eq!(spec.dense[0].init, Initializer::Zeros, "explicit initializer");
    assert_eq!(spec.dense[2].init, Initializer::Constant { value: 1.0 }, "read from the values");
    // tch's linear weights are Kaiming-uniform (ReLU gain) on +-sqrt(6 / fan_in).
    match spec.dense[1].init {
        Initializer::Uniform { low, high, .. } => {
            let bound = (6.0f32 / 64.0).sqrt();
            let near = |v: f32, want: f32| (v - want).abs() < 0.05 * bound;
            assert!(near(low, -bound) && near(high, bound), "{low} {high} vs +-{bound}");
        }
        ref other => panic!("expected a uniform initializer, got {other:?}"),
    }
    assert_eq!(spec.sparse.len(), 1);
    assert_eq!((spec.sparse[0].name.as_str(), spec.sparse[0].dim), ("emb.weight", 3));
    assert_eq!(spec.sparse[0].optimizer, OptimizerConfig::adagrad(0.1));
    assert!(matches!(spec.sparse[0].init, Initializer::Normal { .. }), "{:?}", spec.sparse[0].init);
    assert_eq!(model.transfer(), Transfer::Direct);
    assert!(!model.buffers_pinned());
}

#[test]
fn mistakes_are_named() {
    let (vs, _) = store();
    let err = |b: gradflow_worker::tch::TchAdapterBuilder| b.build().err().expect("refused").to_string();
    let msg = err(TchAdapter::builder(&vs, OptimizerConfig::sgd(0.1)).sparse_table("emb"));
    assert!(msg.contains("`emb`") && msg.contains("emb.weight"), "{msg}");
    let msg = err(TchAdapter::builder(&vs, OptimizerConfig::sgd(0.1)).sparse_table("scale"));
    assert!(msg.contains("`scale`") && msg.contains("[4]") && msg.contains("2-D"), "{msg}");
    let msg = err(TchAdapter::builder(&vs, OptimizerConfig::sgd(0.1))
        .optimizer("running_mean", OptimizerConfig::sgd(1.0)));
    assert!(msg.contains("`running_mean`"), "{msg}");

    let mut double = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(double.root() / "l", 2, 2, Default::default());
    double.double();
    let msg = err(TchAdapter::builder(&double, OptimizerConfig::sgd(0.1)));
    assert!(msg.contains("Double") && msg.contains("vs.float()"), "{msg}");

    let empty = nn::VarStore::new(Device::Cpu);
    assert!(matches!(
        TchAdapter::builder(&empty, OptimizerConfig::sgd(0.1)).build(),
        Err(TchError::NothingToTrain)
    ));

    let mut model =
        TchAdapter::builder(&vs, OptimizerConfig::sgd(0.1)).sparse_table("emb.weight").build().unwrap();
    let msg = model.batch_ids("emb.weight", &Tensor::from_slice(&[3i64, 50])).unwrap_err().to_string();
    assert!(msg.contains("emb.weight") && msg.contains("50") && msg.contains("out of range"), "{msg}");
    let msg = model.batch_ids("scale", &Tensor::from_slice(&[0i64])).unwrap_err().to_string();
    assert!(msg.contains("`scale` is not a sparse table"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_loads_the_servers_values_and_a_push_needs_this_steps_ids() {
    init_tracing();
    for transfer in [Transfer::Direct, Transfer::Staged] {
        let servers = start_shards(1, |s| config(s, 1, 1, Mode::Sync)).await;
        let (vs, net) = store();
        let mut model = TchAdapter::builder(&vs, OptimizerConfig::sgd(0.1))
            .sparse_table("emb.weight")
            .transfer(transfer)
            .build()
            .unwrap();
        let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), 0)).await.unwrap();
        model.declare(&mut worker).await.unwrap();
        let err = model.pull(&worker).await.unwrap_err().to_string();
        assert!(err.contains("no ids for sparse table `emb.weight`"), "{err}");

        let ids = Tensor::from_slice(&[7i64, 2, 7]);
        model.batch_ids("emb.weight", &ids).unwrap();
        model.pull(&worker).await.unwrap();
        let vars = vs.variables();
        for d in &model.spec().dense {
            let mut want = vec![0f32; d.numel() as usize];
            d.init.fill_dense(&d.name, &d.shape, 0, &mut want);
            let got = Vec::<f32>::try_from(vars[&d.name].flatten(0, -1)).unwrap();
            assert_eq!(got, want, "{transfer:?}: `{}` holds the servers' values", d.name);
        }
        let table = model.spec().sparse[0].clone();
        for id in [2u64, 7] {
            let mut want = vec![0f32; 3];
            table.init.fill_row(&table.name, id, &mut want);
            let got = Vec::<f32>::try_from(vars["emb.weight"].get(id as i64)).unwrap();
            assert_eq!(got, want, "{transfer:?}: row {id} holds the servers' values");
        }

        // One step of SGD through the servers moves the weight by -lr * grad.
        let before = vars["enc.l1.weight"].copy();
        let x = Tensor::ones([2, 5], (Kind::Float, Device::Cpu));
        let emb = vars["emb.weight"].index_select(0, &ids).sum(Kind::Float);
        (net.forward(&x).sum(Kind::Float) + emb).backward();
        let grad = vars["enc.l1.weight"].grad().copy();
        model.step(&mut worker).await.unwrap();
        assert_eq!(
            f64::try_from(vars["enc.l1.weight"].grad().abs().sum(Kind::Float)).unwrap(),
            0.0,
            "the push zeroes the gradients"
        );
        let err = model.pull(&worker).await.unwrap_err().to_string();
        assert!(err.contains("batch_ids"), "every step names its ids: {err}");
        model.batch_ids("emb.weight", &ids).unwrap();
        model.pull(&worker).await.unwrap();
        let want = before - grad * 0.1;
        let diff = f64::try_from((&vars["enc.l1.weight"] - want).abs().max()).unwrap();
        assert!(diff < 1e-6, "{transfer:?}: after one SGD step the weight is off by {diff}");
        // Row 7 was looked up twice: its gradient is 2 per element, pushed once.
        let row7 = Vec::<f32>::try_from(vars["emb.weight"].get(7)).unwrap();
        let mut init7 = vec![0f32; 3];
        table.init.fill_row(&table.name, 7, &mut init7);
        for (got, init) in row7.iter().zip(&init7) {
            assert!((got - (init - 0.2)).abs() < 1e-6, "{transfer:?}: row 7 {got} vs {init} - 0.2");
        }
        worker.leave().await.unwrap();
        for s in servers {
            s.shutdown().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_whose_models_start_differently_are_refused() {
    init_tracing();
    let servers = start_shards(1, |s| config(s, 1, 2, Mode::Sync)).await;
    // Two stores built without a common tch::manual_seed draw different values, so the
    // initializers read from them differ.
    let (a, _) = store();
    let (b, _) = store();
    let mut declared = Vec::new();
    for (w, vs) in [a, b].iter().enumerate() {
        let mut model = TchAdapter::builder(vs, OptimizerConfig::sgd(0.1)).build().unwrap();
        let mut worker = Worker::connect(WorkerConfig::new(addrs(&servers), w as u32)).await.unwrap();
        declared.push(model.declare(&mut worker).await.map_err(|e| e.to_string()));
    }
    assert!(declared[0].is_ok(), "{:?}", declared[0]);
    let err = declared[1].as_ref().unwrap_err();
    assert!(err.contains("initializer") && err.contains("before"), "{err}");
    for s in servers {
        s.shutdown().await.unwrap();
    }
}
