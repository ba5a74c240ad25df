"""gradflow.torch against real server processes: server-side optimizers equal torch's own,
and 2 synchronous workers equal 1 worker on the same batches."""

import copy
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gradflow  # noqa: E402
import gradflow.torch as gt  # noqa: E402

ROWS, DIM, FEATURES = 50, 4, 3


class Net(nn.Module):
    """An embedding bag per example plus dense features, into a small MLP."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.hidden = nn.Linear(DIM + FEATURES, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, ids, dense):
        x = torch.cat([self.embedding(ids).sum(1), dense], 1)
        return self.out(torch.relu(self.hidden(x)))[:, 0]


def batches(steps, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, ROWS, (size, 3), generator=g), torch.randn(size, FEATURES, generator=g),
             torch.randint(0, 2, (size,), generator=g).float()) for _ in range(steps)]


def build(worker, optimizer, sparse_optimizer):
    """The model, declared. torch's generator is global: build every worker's model in one
    thread, one after the other, so that each draws the same values."""
    torch.manual_seed(0)
    net = Net(gt.Embedding("emb", DIM, optimizer=sparse_optimizer))
    return net, gt.ServerModel(net, optimizer).declare(worker)


def train(worker, data, optimizer, sparse_optimizer, built=None):
    net, model = built or build(worker, optimizer, sparse_optimizer)
    initial = worker.pull_sparse("emb", np.arange(ROWS)).copy()
    for ids, dense, y in data:
        model.pull()
        loss = F.binary_cross_entropy_with_logits(net(ids, dense), y)
        loss.backward()
        assert model.step(loss) == "applied"
    model.pull()
    rows = worker.pull_sparse("emb", np.arange(ROWS))
    assert not np.allclose(rows, initial), "training changed no embedding row"
    return net, torch.from_numpy(rows)


def test_server_side_adam_and_sgd_equal_torch_optimizers(servers):
    worker = gradflow.Worker(servers(workers=1), 0)
    data = batches(steps=8, size=16)
    net, rows = train(worker, data, gradflow.adam(0.01), gradflow.sgd(0.1))

    # The same model from the servers' initial values, trained by torch itself.
    fresh = gradflow.Worker(servers(workers=1), 0)
    torch.manual_seed(0)
    start = Net(gt.Embedding("emb", DIM, optimizer=gradflow.sgd(0.1)))
    gt.ServerModel(start, gradflow.adam(0.01)).declare(fresh).pull()
    ref = Net(nn.Embedding(ROWS, DIM))
    ref.hidden, ref.out = copy.deepcopy(start.hidden), copy.deepcopy(start.out)
    with torch.no_grad():
        ref.embedding.weight.copy_(torch.from_numpy(fresh.pull_sparse("emb", np.arange(ROWS))))
    dense = torch.optim.Adam(list(ref.hidden.parameters()) + list(ref.out.parameters()), lr=0.01)
    sparse = torch.optim.SGD(ref.embedding.parameters(), lr=0.1)
    for ids, x, y in data:
        loss = F.binary_cross_entropy_with_logits(ref(ids, x), y)
        dense.zero_grad(), sparse.zero_grad()
        loss.backward()
        dense.step(), sparse.step()
    for (name, a), b in zip(net.named_parameters(), [p for n, p in ref.named_parameters() if "embedding" not in n]):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.allclose(rows, ref.embedding.weight, atol=1e-5)


def test_two_sync_workers_equal_one_worker_on_the_same_batches(servers):
    data = batches(steps=6, size=32, seed=1)
    one = gradflow.Worker(servers(workers=1), 0)
    net1, rows1 = train(one, data, gradflow.adagrad(0.1), gradflow.adagrad(0.1))

    addrs = servers(workers=2)
    workers = [gradflow.Worker(addrs, i) for i in range(2)]
    built = [build(w, gradflow.adagrad(0.1), gradflow.adagrad(0.1)) for w in workers]
    halves = [[(ids[i::2], x[i::2], y[i::2]) for ids, x, y in data] for i in range(2)]
    results = {}

    def run(i):
        results[i] = train(workers[i], halves[i], None, None, built[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) == {0, 1}, "a worker failed"
    for i in range(2):
        net2, rows2 = results[i]
        for (name, a), b in zip(net1.named_parameters(), net2.parameters()):
            assert torch.allclose(a, b, atol=1e-5), (i, name, (a - b).abs().max())
        assert torch.allclose(rows1, rows2, atol=1e-5), i


def test_a_lookup_of_several_tables_equals_their_own_forwards(servers):
    worker = gradflow.Worker(servers(workers=1), 0)
    tables = nn.ModuleList([gt.Embedding("a", 1, init=gradflow.constant(0.5), optimizer=gradflow.sgd(1.0)),
                            gt.Embedding("b", 3, init=gradflow.constant(0.25), optimizer=gradflow.sgd(1.0))])
    gt.ServerModel(tables, gradflow.sgd(1.0)).declare(worker)
    ids = torch.tensor([[4, 9], [9, 2]])
    a, b = gt.lookup(list(tables), ids)
    assert a.shape == (2, 2, 1) and b.shape == (2, 2, 3)
    assert torch.equal(a, tables[0](ids)) and torch.equal(b, tables[1](ids))
    (a.sum() * 2 + b.sum()).backward()
    assert worker.step() == "applied"
    # id 9 appears twice: its gradient is summed.
    assert np.allclose(worker.pull_sparse("a", [4, 9, 2]), [[0.5 - 2], [0.5 - 4], [0.5 - 2]])
    assert np.allclose(worker.pull_sparse("b", [4, 9, 2]), [[0.25 - 1] * 3, [0.25 - 2] * 3, [0.25 - 1] * 3])


def test_embedding_without_declare_says_what_to_do():
    with pytest.raises(RuntimeError, match="declare"):
        gt.Embedding("e", 2)(torch.tensor([1]))


def test_no_grad_forward_pushes_nothing(servers):
    worker = gradflow.Worker(servers(workers=1), 0)
    torch.manual_seed(0)
    net = Net(gt.Embedding("emb", DIM, optimizer=gradflow.sgd(1.0)))
    model = gt.ServerModel(net, gradflow.sgd(1.0)).declare(worker)
    before = worker.pull_sparse("emb", np.arange(ROWS)).copy()
    ids, x, _ = batches(1, 4)[0]
    with torch.no_grad():
        net(ids, x)
    assert model.step() == "applied"
    assert np.array_equal(worker.pull_sparse("emb", np.arange(ROWS)), before)


def test_on_cuda_the_mlp_trains_on_the_gpu(servers):
    if not torch.cuda.is_available():
        pytest.skip("skipped: torch sees no CUDA device on this machine")
    worker = gradflow.Worker(servers(workers=1), 0)
    torch.manual_seed(0)
    net = Net(gt.Embedding("emb", DIM)).to("cuda")
    model = gt.ServerModel(net, gradflow.adam(0.01)).declare(worker)
    for ids, x, y in batches(3, 16):
        model.pull()
        loss = F.binary_cross_entropy_with_logits(net(ids.cuda(), x.cuda()), y.cuda())
        loss.backward()
        assert model.step(loss) == "applied"
    assert next(net.parameters()).is_cuda
