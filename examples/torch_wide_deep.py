#!/usr/bin/env python3
"""Wide & deep in PyTorch, trained by gradflow's parameter servers: the model of the built-in
``wide_deep`` job (examples/wide_deep.toml), written as an ``nn.Module``.

A worker program for ``[worker] command`` (examples/torch_wide_deep.toml): the launcher starts
it once per worker. The embedding tables live on the servers (``gradflow.torch.Embedding``);
the MLP runs here, on CUDA when torch sees a GPU (``--device`` to choose), and its
parameters are on the servers too (``gradflow.torch.ServerModel``), updated by the servers'
Adagrad. Install the package first: ``pip install ./crates/gradflow-py``.

Flags: --fields N (26), --buckets N (1000000), --dim N (8), --hidden 64,32, --lr X (0.05),
--device cpu|cuda, --threads N (torch's CPU threads, 1).
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradflow
import gradflow.torch as gt


class WideDeep(nn.Module):
    """``p = sigmoid(wide_bias + Σ v·wide[id] + MLP([Σ_field v·emb[id] ..., dense]))``, as
    gradflow-models' WideDeep, with its initializers (docs/python.md)."""

    def __init__(self, fields, num_dense, buckets, dim, hidden, seed):
        super().__init__()
        self.fields, self.buckets, self.dim = fields, buckets, dim
        self.wide = gt.Embedding("wide", 1, init=gradflow.zeros())
        self.embedding = gt.Embedding("embedding", dim, init=gradflow.normal(0.0, 0.05, seed))
        self.wide_bias = nn.Parameter(torch.zeros(1))
        widths = [fields * dim + num_dense] + hidden + [1]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, widths[1:]))
        self.init = {"wide_bias": gradflow.zeros()}
        for k, layer in enumerate(self.layers):
            self.init[f"layers.{k}.weight"] = gradflow.xavier_uniform(1.0, seed)
            self.init[f"layers.{k}.bias"] = gradflow.zeros()

    def rows(self, ids):
        """The wide weights and the embeddings of ``ids``: both tables are keyed by the same
        ids, so one lookup pulls both."""
        return gt.lookup([self.wide, self.embedding], ids)

    def forward(self, batch, device):
        n = len(batch)
        ids = torch.from_numpy(gradflow.bucket(batch.sparse_ids, self.buckets))
        examples = torch.from_numpy(batch.sparse_examples)
        values = torch.from_numpy(batch.sparse_values)
        wide_rows, emb_rows = self.rows(ids)
        wide = torch.zeros(n).index_add(0, examples, wide_rows[:, 0] * values)
        slots = examples * self.fields + torch.from_numpy(batch.sparse_fields)
        emb = torch.zeros(n * self.fields, self.dim).index_add(0, slots, emb_rows * values[:, None])
        x = torch.cat([emb.view(n, -1), torch.from_numpy(batch.dense)], dim=1).to(device)
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k + 1 < len(self.layers):
                x = F.relu(x)
        return x[:, 0] + (wide + self.wide_bias).to(device)


def flags():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=26)
    p.add_argument("--buckets", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--hidden", default="64,32", help="hidden widths, comma-separated")
    p.add_argument("--lr", type=float, default=0.05, help="the servers' Adagrad learning rate")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU")
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    return p.parse_args()


def main():
    args = flags()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    worker = gradflow.Worker.from_env()
    job = worker.job
    seed = job["train"]["seed"]
    torch.manual_seed(seed)
    hidden = [int(h) for h in args.hidden.split(",") if h]
    batches = worker.batches(evaluate=lambda batch: predict(batch))
    net = WideDeep(args.fields, batches.num_dense, args.buckets, args.dim, hidden, seed).to(device)
    model = gt.ServerModel(net, gradflow.adagrad(args.lr), init=net.init).declare(worker)

    def predict(batch):
        model.pull()
        with torch.no_grad():
            return torch.sigmoid(net(batch, device)).cpu()

    started, examples = time.monotonic(), 0
    for batch in batches:
        labels = torch.from_numpy(batch.labels).to(device)
        model.pull()
        loss = F.binary_cross_entropy_with_logits(net(batch, device), labels)
        loss.backward()
        model.step(loss)
        examples += len(batch)
    secs = time.monotonic() - started
    print(f"torch_wide_deep worker {worker.index} on {device}: {examples} examples in {secs:.2f}s "
          f"({examples / max(secs, 1e-9):.0f} samples/s)", file=sys.stderr)
    worker.leave()


if __name__ == "__main__":
    main()
