"""gradflow for Python: train on gradflow's parameter servers from PyTorch or numpy.

The servers hold the model and run the optimizer; a Python worker pulls parameters, computes
gradients with whatever it likes and pushes them. The connection is gradflow's Rust worker
library (placement, the tensor link, retries, auth and TLS are the same code as in Rust).

A worker program that ``gradflow launch`` starts (``[worker] command`` in the job file)::

    import gradflow
    worker = gradflow.Worker.from_env()
    worker.declare({"dense": [...], "sparse": [...]})      # or gradflow.torch.ServerModel
    for batch in worker.batches(evaluate=predict):          # the job's [data], this worker's share
        ...pull, compute, push...
        worker.step(loss=loss)
    worker.leave()

- :class:`Worker`: connect, declare, pull and push dense tensors and sparse rows, step, leave.
- :meth:`Worker.batches`: the job's data as batches of numpy arrays, with progress, epoch-end
  evaluation and the results file handled as the built-in trainer handles them.
- Optimizers (:func:`sgd`, :func:`adagrad`, :func:`adam`, :func:`adamw`, :func:`ftrl`) and
  initializers (:func:`zeros`, :func:`constant`, :func:`uniform`, :func:`normal`,
  :func:`xavier_uniform`, :func:`xavier_normal`) as the servers take them.
- :mod:`gradflow.torch`: ``Embedding``, an ``nn.Module`` whose rows live on the servers, and
  ``ServerModel``, a module's dense parameters on the servers with a server-side optimizer.

See docs/python.md in the repository.
"""

import json
import sys

import numpy as np

from . import _gradflow
from ._gradflow import Batch, GradflowError, infer_initializer

__all__ = [
    "Worker",
    "Batch",
    "GradflowError",
    "bucket",
    "scores",
    "sgd",
    "adagrad",
    "adam",
    "adamw",
    "ftrl",
    "zeros",
    "constant",
    "uniform",
    "normal",
    "xavier_uniform",
    "xavier_normal",
    "infer_initializer",
]


def _f32(a, name):
    """A contiguous float32 numpy view of ``a`` (a numpy array or a CPU torch tensor)."""
    if hasattr(a, "detach"):
        a = a.detach()
        if a.device.type != "cpu":
            a = a.cpu()
        a = a.numpy()
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def _ids(ids):
    """Row ids as an int64 or uint64 numpy array."""
    if hasattr(ids, "detach"):
        ids = ids.detach()
        if ids.device.type != "cpu":
            ids = ids.cpu()
        ids = ids.numpy()
    ids = np.asarray(ids)
    if ids.dtype not in (np.int64, np.uint64):
        ids = ids.astype(np.int64)
    return np.ascontiguousarray(ids.reshape(-1))


class Worker:
    """One worker of a gradflow job: a connection to every server shard.

    ``Worker.from_env()`` in a program the launcher starts; ``Worker(servers, index)`` to
    connect by hand. Errors raise :class:`GradflowError` with the servers' message.
    """

    def __init__(self, servers=None, index=0, *, num_workers=1, tensor_link=True, _native=None):
        if _native is None:
            if not servers:
                raise ValueError("servers: expected a list of server addresses (host:port)")
            _native = _gradflow.Worker(list(servers), int(index), num_workers=num_workers, tensor_link=tensor_link)
        self._w = _native
        self._spec = None

    @classmethod
    def from_env(cls):
        """The worker ``gradflow launch`` started: servers, index, transport, auth and TLS from
        the environment it sets (``GRADFLOW_CLUSTER_SPEC``)."""
        return cls(_native=_gradflow.Worker.from_env())

    @property
    def index(self):
        """This worker's index (0 is the scorer)."""
        return self._w.index

    @property
    def num_workers(self):
        return self._w.num_workers

    @property
    def current_step(self):
        """The step this worker is on."""
        return self._w.current_step

    @property
    def mode(self):
        """``"sync"`` or ``"async"`` from the job (None without a job)."""
        return self._w.mode

    @property
    def job(self):
        """The job file as a dict (None for a worker connected by hand)."""
        text = self._w.job_json
        return None if text is None else json.loads(text)

    @property
    def spec(self):
        """The declared model spec as a dict."""
        if self._spec is None:
            self._spec = json.loads(self._w.spec_json())
        return self._spec

    def declare(self, spec):
        """Declares the model: ``{"dense": [{"name", "shape", "init", "optimizer"}, ...],
        "sparse": [{"name", "dim", "init", "optimizer"}, ...]}``. Every worker declares the same
        spec; the servers refuse a different one, naming the difference."""
        self._w.declare(spec if isinstance(spec, str) else json.dumps(spec))
        self._spec = None

    def pull_dense(self, names, out):
        """Pulls dense tensors ``names`` into the float32 arrays ``out`` in place (contiguous,
        each exactly the tensor's size; a CPU tensor's ``.numpy()`` works). In sync mode this
        waits for the step's model."""
        if isinstance(names, str):
            names, out = [names], [out]
        self._w.pull_dense(list(names), list(out))

    def pull_sparse(self, table, ids):
        """The rows of ``ids`` (int64 or uint64) of sparse table ``table``: a float32 array of
        shape ``[len(ids), dim]``. Rows are created on first touch."""
        ids = _ids(ids)
        rows = self._w.pull_sparse(table, ids)
        return rows.reshape(len(ids), -1) if len(ids) else rows.reshape(0, self._dim(table))

    def pull_sparse_many(self, tables, ids):
        """The rows of the same ``ids`` of several sparse tables, in one request per shard: a
        list of ``[len(ids), dim]`` float32 arrays, one per table."""
        ids = _ids(ids)
        return [rows.reshape(len(ids), -1) if len(ids) else rows.reshape(0, self._dim(t))
                for t, rows in zip(tables, self._w.pull_sparse_many(list(tables), ids))]

    def push_dense(self, name, grad):
        """Stages the gradient of dense tensor ``name`` for the next :meth:`step`."""
        self._w.push_dense(name, _f32(grad, name))

    def push_sparse(self, table, ids, grads):
        """Stages gradient rows (``[len(ids), dim]``) of sparse table ``table`` for the next
        :meth:`step`; repeated ids are summed."""
        self._w.push_sparse(table, _ids(ids), _f32(grads, table))

    def step(self, loss=None):
        """Sends the staged gradients and completes the step: ``"applied"``, or ``"stale"`` when
        the servers had moved on without this worker (the gradients were discarded). ``loss``
        (a float or a 0-d tensor) is what the progress reports show."""
        if loss is not None and not isinstance(loss, float):
            loss = float(loss.item() if hasattr(loss, "item") else loss)
        return self._w.step(loss)

    def status(self):
        """Every shard's status: a list of dicts (``version`` is the shard's step)."""
        return [json.loads(s) for s in self._w.status()]

    def leave(self):
        """Leaves the job; the worker cannot be used afterwards."""
        sys.stdout.flush()
        self._w.leave()

    def batches(self, evaluate=None):
        """The job's training data, this worker's share, as an iterator of :class:`Batch`
        (numpy arrays: ``labels``, ``dense``, ``sparse_offsets``, ``sparse_examples``,
        ``sparse_fields``, ``sparse_ids``, ``sparse_values``).

        Call :meth:`step` once per batch before taking the next. Progress is reported every
        ``train.log_every_steps``; at each epoch's end worker 0 calls ``evaluate(batch)`` on
        every test batch (it returns one probability per example) while the servers hold the
        next step, and the scores go to the launcher and the results file, as the built-in
        trainer's do. A restarted worker skips the batches the job trained already."""
        if evaluate is None:
            return self._w.batches(None)

        def probabilities(batch):
            return np.ascontiguousarray(_f32(evaluate(batch), "probabilities").reshape(-1))

        return self._w.batches(probabilities)

    def _dim(self, table):
        for s in self.spec.get("sparse", []):
            if s["name"] == table:
                return s["dim"]
        raise GradflowError(f"no sparse table {table!r} in the declared model")


def bucket(ids, buckets):
    """Ids mapped to ``buckets`` rows as the built-in models map them: ``id % buckets`` on the
    unsigned 64-bit id, as int64."""
    ids = np.asarray(ids)
    if ids.dtype != np.uint64:
        ids = ids.astype(np.int64).view(np.uint64)
    return (ids % np.uint64(buckets)).astype(np.int64)


def scores(labels, probabilities):
    """``(log_loss, auc, accuracy)`` of ``probabilities`` against ``labels``, as gradflow
    reports test scores."""
    return _gradflow.scores(_f32(labels, "labels"), _f32(probabilities, "probabilities"))


def _clip(d, clip_norm):
    if clip_norm is not None:
        d["clip_norm"] = float(clip_norm)
    return d


def sgd(lr, *, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, clip_norm=None):
    """SGD as ``torch.optim.SGD``, run by the servers."""
    return _clip(dict(kind="sgd", lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                      weight_decay=weight_decay), clip_norm)


def adagrad(lr, *, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, clip_norm=None):
    """Adagrad as ``torch.optim.Adagrad``, run by the servers."""
    return _clip(dict(kind="adagrad", lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                      initial_accumulator_value=initial_accumulator_value, eps=eps), clip_norm)


def adam(lr, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, clip_norm=None):
    """Adam as ``torch.optim.Adam``, run by the servers."""
    return _clip(dict(kind="adam", lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                      amsgrad=amsgrad), clip_norm)


def adamw(lr, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, clip_norm=None):
    """AdamW as ``torch.optim.AdamW``, run by the servers."""
    return _clip(dict(kind="adamw", lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                      amsgrad=amsgrad), clip_norm)


def ftrl(lr, **options):
    """FTRL-Proximal, run by the servers (options as gradflow-core's ``OptimizerConfig``)."""
    return dict(kind="ftrl", lr=lr, **options)


def zeros():
    return {"kind": "zeros"}


def constant(value):
    return {"kind": "constant", "value": float(value)}


def uniform(low, high, seed=0):
    return {"kind": "uniform", "low": float(low), "high": float(high), "seed": int(seed)}


def normal(mean, std, seed=0):
    return {"kind": "normal", "mean": float(mean), "std": float(std), "seed": int(seed)}


def xavier_uniform(gain=1.0, seed=0):
    return {"kind": "xavier_uniform", "gain": float(gain), "seed": int(seed)}


def xavier_normal(gain=1.0, seed=0):
    return {"kind": "xavier_normal", "gain": float(gain), "seed": int(seed)}
