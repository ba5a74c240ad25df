"""Fixtures of the Python package's tests: real `gradflow ps` server processes on port 0, and
`gradflow launch` of real jobs.

The `gradflow` binary is $GRADFLOW_BIN, else the workspace's target/{debug,release}/gradflow
(built with `cargo build -p gradflow-cli` if neither exists).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
EVENT = "@gradflow "


def gradflow_bin():
    if os.environ.get("GRADFLOW_BIN"):
        return os.environ["GRADFLOW_BIN"]
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("debug", "release"):
        path = target / profile / "gradflow"
        if path.exists():
            return str(path)
    subprocess.run(["cargo", "build", "-p", "gradflow-cli"], cwd=REPO, check=True)
    return str(target / "debug" / "gradflow")


def child_env():
    """The environment of processes the tests start: this Python first on PATH, so that a
    job's `./script.py` worker runs where the package is installed."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("GRADFLOW_CLUSTER_SPEC", None)
    return env


class Servers:
    """`shards` real server processes of the job in `job_file`, each listening on port 0."""

    def __init__(self, job_file, shards):
        self.procs, self.addrs = [], []
        for shard in range(shards):
            proc = subprocess.Popen(
                [gradflow_bin(), "ps", "--job", str(job_file), "--shard", str(shard), "--listen", "127.0.0.1:0"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env(),
            )
            self.procs.append(proc)
            for line in proc.stdout:
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT):])
                    if event.get("event") == "listening":
                        self.addrs.append(event["addr"])
                        break
            else:
                raise RuntimeError(f"server {shard} exited with {proc.wait()} before listening")

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


def write_job(dir, workers, mode="sync", servers=1, extra=""):
    path = Path(dir) / "job.toml"
    path.write_text(f'name = "py-test"\nservers = {servers}\nworkers = {workers}\nmode = "{mode}"\n'
                    f'[worker]\ncommand = ["./none.py"]\n[data]\ntrain = "train.csv"\n{extra}')
    (Path(dir) / "train.csv").write_text("label,d0\n1,0.5\n")
    return path


@pytest.fixture
def servers(tmp_path):
    """`servers(workers, mode="sync", shards=1)`: a fresh job's servers; stopped at the end."""
    started = []

    def start(workers, mode="sync", shards=1):
        d = tmp_path / f"job{len(started)}"
        d.mkdir()
        s = Servers(write_job(d, workers, mode, shards), shards)
        started.append(s)
        return s.addrs

    yield start
    for s in started:
        s.stop()
