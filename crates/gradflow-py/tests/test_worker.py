"""gradflow.Worker against real server processes: declare, pull, push, step, errors."""

import threading

import numpy as np
import pytest

import gradflow


def spec(lr=1.0):
    return {
        "dense": [{"name": "w", "shape": [2, 2], "init": gradflow.zeros(), "optimizer": gradflow.sgd(lr)}],
        "sparse": [{"name": "emb", "dim": 3, "init": gradflow.constant(0.5), "optimizer": gradflow.sgd(lr)}],
    }


def test_a_step_applies_pushed_gradients_to_dense_tensors_and_sparse_rows(servers):
    addrs = servers(workers=1, shards=2)
    w = gradflow.Worker(addrs, 0)
    w.declare(spec(lr=0.5))
    out = np.full((2, 2), 7.0, dtype=np.float32)
    w.pull_dense("w", out)
    assert np.array_equal(out, np.zeros((2, 2)))
    rows = w.pull_sparse("emb", np.array([3, 17, 3], dtype=np.int64))
    assert rows.shape == (3, 3) and np.all(rows == 0.5)

    w.push_dense("w", np.array([[1, 2], [3, 4]], dtype=np.float32))
    w.push_sparse("emb", np.array([3, 17], dtype=np.uint64), np.ones((2, 3), dtype=np.float32))
    w.push_sparse("emb", [3], np.full((1, 3), 2.0, dtype=np.float32))
    assert w.step(loss=1.25) == "applied"
    assert w.current_step == 1

    w.pull_dense(["w"], [out])
    assert np.allclose(out, -0.5 * np.array([[1, 2], [3, 4]]))
    rows = w.pull_sparse("emb", np.array([3, 17, 99]))
    assert np.allclose(rows, [[0.5 - 0.5 * 3] * 3, [0.5 - 0.5] * 3, [0.5] * 3])
    w.leave()
    with pytest.raises(gradflow.GradflowError, match="left the job"):
        w.current_step


def test_pulls_write_into_torch_tensors_in_place(servers):
    torch = pytest.importorskip("torch")
    w = gradflow.Worker(servers(workers=1), 0)
    w.declare(spec())
    w.push_dense("w", torch.ones(2, 2))
    w.step()
    t = torch.zeros(2, 2)
    w.pull_dense("w", t.numpy())
    assert torch.equal(t, -torch.ones(2, 2))


def test_a_refused_push_raises_with_the_servers_message(servers):
    w = gradflow.Worker(servers(workers=1), 0)
    w.declare(spec())
    w.push_dense("w", np.array([[np.nan, 0], [0, 0]], dtype=np.float32))
    with pytest.raises(gradflow.GradflowError) as e:
        w.step()
    assert "non-finite gradient" in str(e.value) and "`w`" in str(e.value), str(e.value)
    assert e.value.code == "INVALID_ARGUMENT"


def test_wrong_sizes_and_unknown_names_are_refused_before_anything_is_sent(servers):
    w = gradflow.Worker(servers(workers=1), 0)
    w.declare(spec())
    with pytest.raises(gradflow.GradflowError, match="w"):
        w.push_dense("w", np.zeros(3, dtype=np.float32))
    with pytest.raises(gradflow.GradflowError, match="nope"):
        w.pull_dense("nope", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        w.pull_dense("w", np.zeros((4, 2), dtype=np.float32)[::2])
    with pytest.raises(ValueError, match="int64 or uint64"):
        w._w.pull_sparse("emb", np.zeros(2, dtype=np.float32))


def test_a_worker_declaring_another_model_is_refused_with_the_difference(servers):
    addrs = servers(workers=2)
    a = gradflow.Worker(addrs, 0)
    a.declare(spec())
    b = gradflow.Worker(addrs, 1)
    other = spec()
    other["dense"][0]["shape"] = [4]
    with pytest.raises(gradflow.GradflowError, match="w"):
        b.declare(other)


def test_from_env_outside_a_job_says_how_to_run_it(monkeypatch):
    monkeypatch.delenv("GRADFLOW_CLUSTER_SPEC", raising=False)
    with pytest.raises(gradflow.GradflowError, match="gradflow launch"):
        gradflow.Worker.from_env()


def test_sync_mode_waits_for_every_worker(servers):
    addrs = servers(workers=2)
    workers = [gradflow.Worker(addrs, i) for i in range(2)]
    for w in workers:
        w.declare(spec())
    results = {}

    def run(i):
        w = workers[i]
        w.push_dense("w", np.full((2, 2), float(i + 1), dtype=np.float32))
        results[i] = w.step()
        out = np.zeros((2, 2), dtype=np.float32)
        w.pull_dense("w", out)
        results[f"w{i}"] = out

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] == results[1] == "applied"
    # The servers average the two workers' gradients: (1 + 2) / 2.
    assert np.allclose(results["w0"], -1.5) and np.allclose(results["w1"], -1.5)
