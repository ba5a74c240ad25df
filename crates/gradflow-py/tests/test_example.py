"""examples/torch_wide_deep.toml end to end through `gradflow launch`: 2 sync Python workers
reach the built-in wide&deep's test AUC on the same data, and a killed Python worker is
restarted and the job still finishes."""

import json
import subprocess
from pathlib import Path

from conftest import REPO, child_env, gradflow_bin

import pytest

pytest.importorskip("torch")

ROWS = "train_rows = 20000\ntest_rows = 5000"


def job_from(example, dir, **replace):
    text = (REPO / "examples" / example).read_text()
    assert '"../runs/data/' in text and "train_rows = 200000\ntest_rows = 50000" in text, f"{example} changed"
    text = text.replace('"../runs/data/', f'"{dir}/data/').replace("train_rows = 200000\ntest_rows = 50000", ROWS)
    text = text.replace('dir = "../runs/', f'dir = "{dir}/out-')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = Path(dir) / example
    path.write_text(text)
    return path


def launch(job, env=None):
    out = subprocess.run([gradflow_bin(), "launch", str(job)], capture_output=True, text=True,
                         env=env or child_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def last_auc(dir, name):
    lines = [json.loads(l) for l in (Path(dir) / f"out-{name}" / "results.jsonl").read_text().splitlines()]
    evals = [l for l in lines if l["event"] == "eval"]
    assert evals, lines
    return evals[-1]["test_auc"]


def test_the_torch_example_reaches_the_built_in_models_auc(tmp_path):
    script = REPO / "examples" / "torch_wide_deep.py"
    torch_job = job_from("torch_wide_deep.toml", tmp_path, **{'"./torch_wide_deep.py"': f'"{script}"'})
    launch(torch_job)
    built_in = job_from("wide_deep.toml", tmp_path)
    launch(built_in)
    python_auc, rust_auc = last_auc(tmp_path, "torch-wide-deep"), last_auc(tmp_path, "wide-deep")
    print(f"test AUC: torch example {python_auc:.4f}, built-in {rust_auc:.4f}")
    assert rust_auc > 0.6
    assert abs(python_auc - rust_auc) < 0.01


def test_dynamic_sharding_trains_every_example_once(tmp_path):
    script = REPO / "examples" / "torch_wide_deep.py"
    job = job_from("torch_wide_deep.toml", tmp_path, **{
        '"./torch_wide_deep.py"': f'"{script}"',
        '[data.synth]': 'sharding = "dynamic"\ntask_bytes = 100000\n\n[data.synth]',
    })
    launch(job)
    lines = [json.loads(l) for l in (tmp_path / "out-torch-wide-deep" / "results.jsonl").read_text().splitlines()]
    evals = [l for l in lines if l["event"] == "eval"]
    assert len(evals) == 1, lines
    assert evals[0]["epoch_train_examples"] == 20000, evals
    assert evals[0]["test_auc"] > 0.6, evals


def test_a_killed_python_worker_is_restarted_and_the_job_finishes(tmp_path):
    # Worker 1's first start kills itself (SIGKILL) after 10 steps; the launcher restarts it.
    wrapper = tmp_path / "killed_worker.py"
    wrapper.write_text(f"""#!/usr/bin/env python3
import os, runpy, signal
import gradflow
step = gradflow.Worker.step
def dying_step(self, loss=None):
    if self.index == 1 and os.environ.get("GRADFLOW_ATTEMPT", "0") == "0" and self.current_step >= 10:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, loss)
gradflow.Worker.step = dying_step
runpy.run_path({str(REPO / "examples" / "torch_wide_deep.py")!r}, run_name="__main__")
""")
    wrapper.chmod(0o755)
    job = job_from("torch_wide_deep.toml", tmp_path, **{'"./torch_wide_deep.py"': f'"{wrapper}"'})
    out = launch(job)
    said = out.stdout + out.stderr
    assert "worker-1 failed (signal: 9 (SIGKILL)); restarting it" in said, said[-3000:]
    assert "skipped the batches trained before this step" in said, said[-3000:]
    killed = last_auc(tmp_path, "torch-wide-deep")
    # In sync mode the restarted worker resumes exactly where the job is: the same model as
    # a run without the kill, up to the order of float sums.
    undisturbed_dir = tmp_path / "undisturbed"
    undisturbed_dir.mkdir()
    script = REPO / "examples" / "torch_wide_deep.py"
    launch(job_from("torch_wide_deep.toml", undisturbed_dir, **{'"./torch_wide_deep.py"': f'"{script}"'}))
    undisturbed = last_auc(undisturbed_dir, "torch-wide-deep")
    print(f"test AUC: killed worker {killed:.4f}, undisturbed {undisturbed:.4f}")
    assert abs(killed - undisturbed) < 0.005
