"""PyTorch modules whose parameters live on gradflow's servers.

- :class:`Embedding`: an ``nn.Module`` whose rows are a sparse table on the servers. Its
  forward pulls the rows of the batch's unique ids; backward pushes their gradient rows.
- :func:`lookup`: several ``Embedding`` tables keyed by the same ids (a wide part and an
  embedding, say) looked up together: one ``torch.unique`` and one pull for all of them.
- :class:`ServerModel`: puts a module's dense parameters (and its ``Embedding`` tables) on the
  servers with a server-side optimizer: ``declare`` once, ``pull`` before the forward pass,
  ``step`` after ``backward()`` (it replaces ``optimizer.step()`` and ``zero_grad()``).

The embeddings stay on the servers; the rest of the module can be on any device (``pull``
copies the servers' values to it, ``step`` reads gradients from it).
"""

import json

import numpy as np
import torch
from torch import nn

import gradflow

__all__ = ["Embedding", "ServerModel", "lookup"]


class Embedding(nn.Module):
    """An embedding table of ``dim``-wide rows held by the servers, keyed by integer ids
    (any int64 values: rows are created when first touched, so there is no size).

    ``forward(ids)`` returns ``ids.shape + (dim,)``, on the ids' device. Only the rows of the
    batch's unique ids travel, each once; under ``torch.no_grad()`` nothing is pushed.
    ``init`` (default ``gradflow.normal(0, 0.05)``) is the distribution the servers draw new
    rows from; ``optimizer`` defaults to the :class:`ServerModel`'s.
    """

    def __init__(self, name, dim, *, init=None, optimizer=None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"Embedding {name!r}: dim must be at least 1, got {dim}")
        self.name, self.dim = name, int(dim)
        self.init = init if init is not None else gradflow.normal(0.0, 0.05)
        self.optimizer = optimizer
        self._worker = None

    def spec(self, default_optimizer):
        """This table's entry in a model spec."""
        return {"name": self.name, "dim": self.dim, "init": self.init,
                "optimizer": self.optimizer or default_optimizer}

    def bind(self, worker):
        """Pulls and pushes through ``worker`` (``ServerModel.declare`` does this)."""
        self._worker = worker

    def forward(self, ids):
        return lookup([self], ids)[0]

    def _need_worker(self):
        if self._worker is None:
            raise RuntimeError(f"Embedding {self.name!r} is not declared: call ServerModel(...).declare(worker) first")
        return self._worker

    def _rows(self, pulled, unique_np, device):
        """The pulled rows as a tensor on ``device`` whose gradient is pushed in backward."""
        rows = torch.from_numpy(pulled).to(device)
        if torch.is_grad_enabled():
            rows.requires_grad_()
            worker, name = self._worker, self.name

            def push(grad):
                worker.push_sparse(name, unique_np, grad.detach().to("cpu", torch.float32).contiguous().numpy())

            rows.register_hook(push)
        return rows

    def extra_repr(self):
        return f"{self.name!r}, dim={self.dim} (on the servers)"


def lookup(embeddings, ids):
    """Looks up the same ``ids`` in several :class:`Embedding` tables declared through one
    worker: one ``torch.unique`` and one request per shard for all of them. Returns one tensor
    of ``ids.shape + (dim,)`` per table, as each table's forward would."""
    worker = embeddings[0]._need_worker()
    for e in embeddings[1:]:
        if e._need_worker() is not worker:
            raise ValueError("lookup: every table must be declared through the same worker")
    unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    unique_np = unique.cpu().numpy().astype(np.int64, copy=False)
    if len(embeddings) == 1:
        pulled = [worker.pull_sparse(embeddings[0].name, unique_np)]
    else:
        pulled = worker.pull_sparse_many([e.name for e in embeddings], unique_np)
    return [e._rows(p, unique_np, ids.device)[inverse].reshape(*ids.shape, e.dim) for e, p in zip(embeddings, pulled)]


class ServerModel:
    """A module's parameters on the servers, trained by a server-side optimizer.

    Every parameter that requires gradients becomes a dense tensor named by its path in the
    module (``"mlp.0.weight"``); every :class:`Embedding` in it becomes a sparse table.
    ``optimizer`` is the servers' optimizer (``gradflow.adam(1e-3)``, ...); ``optimizers`` maps
    names to others. ``init`` maps names to initializers; a parameter without one is declared
    with the distribution its current values follow (constant, uniform or normal), so every
    worker must build its module after the same ``torch.manual_seed`` (or name them all).
    """

    def __init__(self, module, optimizer, *, init=None, optimizers=None, seed=0):
        self.module, self.optimizer = module, optimizer
        self.init, self.optimizers, self.seed = dict(init or {}), dict(optimizers or {}), int(seed)
        self.embeddings = [m for m in module.modules() if isinstance(m, Embedding)]
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.worker = None
        self._staging = {}
        known = {n for n, _ in self.params} | {e.name for e in self.embeddings}
        for name in list(self.init) + list(self.optimizers):
            if name not in known:
                raise ValueError(f"{name!r} is neither a parameter nor an Embedding of the module; it has: {sorted(known)}")

    def spec(self):
        """The model spec this module declares (a dict)."""
        dense = []
        for name, p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"parameter {name!r} is {p.dtype}; gradflow holds float32 (call module.float())")
            init = self.init.get(name)
            if init is None:
                values = p.detach().cpu().contiguous().numpy().reshape(-1)
                init = json.loads(gradflow.infer_initializer(values, self.seed))
            dense.append({"name": name, "shape": list(p.shape), "init": init,
                          "optimizer": self.optimizers.get(name, self.optimizer)})
        sparse = []
        for e in self.embeddings:
            s = e.spec(self.optimizers.get(e.name, self.optimizer))
            if e.name in self.init:
                s["init"] = self.init[e.name]
            sparse.append(s)
        return {"dense": dense, "sparse": sparse}

    def declare(self, worker):
        """Declares the model to the servers through ``worker`` (every worker declares the same)."""
        worker.declare(self.spec())
        for e in self.embeddings:
            e.bind(worker)
        self.worker = worker
        return self

    def pull(self):
        """Loads the servers' values of every dense parameter into the module (in sync mode,
        the step's model). CPU float32 parameters are written in place, without copies."""
        worker = self._need_worker()
        if not self.params:
            return
        names, outs, copies = [], [], []
        for name, p in self.params:
            data = p.data
            if data.device.type == "cpu" and data.is_contiguous():
                outs.append(data.numpy())
            else:
                staging = self._staging.get(name)
                if staging is None:
                    staging = self._staging[name] = torch.empty(p.shape, dtype=torch.float32)
                outs.append(staging.numpy())
                copies.append((data, staging))
            names.append(name)
        worker.pull_dense(names, outs)
        for data, staging in copies:
            data.copy_(staging, non_blocking=False)

    def push(self):
        """Stages every parameter's gradient (parameters without one this step are skipped)
        and clears the gradients, without completing the step."""
        worker = self._need_worker()
        for name, p in self.params:
            if p.grad is None:
                continue
            worker.push_dense(name, p.grad.detach().to("cpu", torch.float32).contiguous().numpy())
            p.grad = None

    def step(self, loss=None):
        """Pushes the gradients and completes the step (``Worker.step``): ``"applied"`` or
        ``"stale"``. ``loss`` is what progress reports show."""
        self.push()
        return self.worker.step(loss)

    def _need_worker(self):
        if self.worker is None:
            raise RuntimeError("declare(worker) first")
        return self.worker
