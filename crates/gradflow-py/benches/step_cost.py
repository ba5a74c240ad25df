#!/usr/bin/env python3
"""Where a Python worker's step goes: examples/torch_wide_deep.py's model on the example
data, 1 worker and 1 server shard, everything in one run of one worker process.

- ``gradflow step``: the whole training step as the example runs it (ServerModel.pull, the
  forward with gradflow Embeddings, backward with their pushes, ServerModel.step), and the
  next batch from ``Worker.batches()`` (reading and parsing the data: ``next batch``);
- ``exchange``: the time inside the worker's pulls, pushes and step call during that step
  (the worker library's, the network's and the servers' share: in sync mode the step and
  the next pull wait for the servers' update); ``exchange replayed``: the same calls again
  afterwards on the same ids, without torch (the rows exist by then);
- ``torch only``: forward and backward of the same model on the same batches with plain
  ``nn.Embedding`` tables (no servers): torch's share;
- ``python cost``: the whole step less the next batch, the exchange and torch's share: the
  package's Python (unique ids, hooks, conversions) and the copies between torch and the
  pulled rows. ``STEP_COST_PROFILE=FILE`` writes a cProfile of the training loop there.

Run: ``step_cost.py TRAIN_FILE [--steps N] [--batch N]`` (it launches itself as the worker of a
one-server job with ``gradflow``: $GRADFLOW_BIN or on PATH). Prints one JSON report.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[3] / "examples"))


def launch(args):
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        job = Path(d) / "job.toml"
        job.write_text(
            f'name = "step-cost"\nservers = 1\nworkers = 1\nmode = "sync"\n'
            f'[worker]\ncommand = ["{HERE}", "--worker", "--steps", "{args.steps}", "--report", "{report}"]\n'
            f'[data]\ntrain = "{Path(args.train).resolve()}"\n[train]\nbatch_size = {args.batch}\nepochs = 1\n'
            f'log_every_steps = 1000000\n[output]\ndir = "{d}/out"\n[launcher]\nmax_restarts = 0\n')
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        out = subprocess.run([os.environ.get("GRADFLOW_BIN", "gradflow"), "launch", str(job)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
        print(report.read_text())


def worker(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    import gradflow
    import gradflow.torch as gt
    from torch_wide_deep import WideDeep

    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = gradflow.Worker.from_env()
    batches = w.batches()
    net = WideDeep(26, batches.num_dense, 1_000_000, 8, [64, 32], 0)
    model = gt.ServerModel(net, gradflow.adagrad(0.05), init=net.init).declare(w)
    cpu = torch.device("cpu")

    class Timed:
        """The native worker, with the time spent in its network calls added up."""

        def __init__(self, inner):
            self.inner, self.secs = inner, 0.0

        def __getattr__(self, name):
            attr = getattr(self.inner, name)
            if name not in ("pull_dense", "pull_sparse", "push_dense", "push_sparse", "step"):
                return attr

            def timed(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return attr(*args, **kwargs)
                finally:
                    self.secs += time.perf_counter() - t

            return timed

    timed = Timed(w._w)
    w._w = timed

    kept, times, data = [], [], []
    profile = None
    if os.environ.get("STEP_COST_PROFILE"):
        import cProfile
        profile = cProfile.Profile()
        profile.enable()
    started = time.perf_counter()
    exchange = []
    for batch in batches:
        data.append(time.perf_counter() - started)
        timed.secs = 0.0
        model.pull()
        loss = F.binary_cross_entropy_with_logits(net(batch, cpu), torch.from_numpy(batch.labels))
        loss.backward()
        model.step(loss)
        kept.append(batch)
        exchange.append(timed.secs)
        now = time.perf_counter()
        times.append(now - started)
        started = now
        if len(kept) == args.steps:
            break
    if profile is not None:
        import pstats
        profile.disable()
        with open(os.environ["STEP_COST_PROFILE"], "w") as out:
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(18)
    # The first steps create rows and warm caches: measure the rest.
    warm = len(kept) // 5
    kept, step_s, data_s = kept[warm:], float(np.mean(times[warm:])), float(np.mean(data[warm:]))
    in_loop_s = float(np.mean(exchange[warm:]))
    w._w = timed.inner

    # The same exchange without torch: ids and arrays of the same sizes.
    names = [n for n, _ in model.params]
    dense = [p.detach().numpy().copy() for _, p in model.params]
    ids = [np.unique(gradflow.bucket(b.sparse_ids, 1_000_000)) for b in kept]
    t = time.perf_counter()
    for u in ids:
        w.pull_dense(names, dense)
        wide, emb = w.pull_sparse("wide", u), w.pull_sparse("embedding", u)
        w.push_sparse("wide", u, np.zeros_like(wide))
        w.push_sparse("embedding", u, np.zeros_like(emb))
        for n, a in zip(names, dense):
            w.push_dense(n, np.zeros_like(a))
        w.step()
    exchange_s = (time.perf_counter() - t) / len(ids)

    # The same model with local tables, on the same batches.
    class Local(WideDeep):
        def __init__(self):
            super().__init__(26, batches.num_dense, 1_000_000, 8, [64, 32], 0)
            self.wide_table = nn.Embedding(1_000_000, 1, sparse=True)
            self.emb_table = nn.Embedding(1_000_000, 8, sparse=True)

        def rows(self, ids):
            return self.wide_table(ids), self.emb_table(ids)

    local = Local()
    opt = torch.optim.SGD([p for n, p in local.named_parameters() if "table" not in n], lr=0.0)
    t = time.perf_counter()
    for b in kept:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(local(b, cpu), torch.from_numpy(b.labels)).backward()
    torch_s = (time.perf_counter() - t) / len(kept)

    n = len(kept[0])
    report = {
        "batch": n,
        "steps_measured": len(kept),
        "gradflow_step_ms": round(step_s * 1e3, 3),
        "samples_per_sec": round(n / step_s),
        "of_which_next_batch_ms": round(data_s * 1e3, 3),
        "of_which_exchange_ms": round(in_loop_s * 1e3, 3),
        "exchange_replayed_ms": round(exchange_s * 1e3, 3),
        "torch_only_ms": round(torch_s * 1e3, 3),
        "python_cost_ms": round((step_s - data_s - in_loop_s - torch_s) * 1e3, 3),
    }
    Path(args.report).write_text(json.dumps(report, indent=2))
    # The iterator is left unfinished: leave without the rest of the epoch.
    w.leave()


def main():
    p = argparse.ArgumentParser(description="Where a Python worker's step goes (see the module docs).")
    p.add_argument("train", nargs="?")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif not args.train:
        p.error("TRAIN_FILE is required")
    else:
        launch(args)


if __name__ == "__main__":
    main()
