"""The trainers users reach for: a Lightning checkpoint resume of `clr_scheduler`, and the
examples of docs/guides/integrations.md executed as written (Lightning + MLFlowLogger,
Hugging Face Trainer), on tiny models built from configs and random data."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clr_mlflow

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "integrations.md"


def formula(t, base, top, step_size):
    """Smith's triangular policy, written out independently of the package."""
    cycle = math.floor(1 + t / (2 * step_size))
    x = abs(t / step_size - 2 * cycle + 1)
    return base + (top - base) * max(0.0, 1 - x)


def torch_cyclic_lrs(n, base, top, step_size):
    """torch's own CyclicLR (triangular, no momentum cycling): the lr of each of n steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base, top, step_size_up=step_size, cycle_momentum=False)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def guide_code(section: str) -> str:
    """The python blocks under `## {section}` of the guide, joined: what a reader copies."""
    text = GUIDE.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert blocks, f"no python block under '## {section}' in {GUIDE}"
    return "\n".join(blocks)


MARK = "GUIDE_RESULT "
TRACKING_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                 "CLR_MLFLOW_SPOOL_DIR")


def run_guide(section: str, folder: Path, probe: str) -> dict:
    """Run a section's code as a reader's script would: its own process, in `folder` (where
    its relative sqlite:///mlflow.db, checkpoints and output folders land), inheriting no
    tracking settings. `probe`, an expression run after it, is printed as JSON and returned."""
    script = folder / "guide.py"
    script.write_text(guide_code(section) + "\n\n# --- the test's probe, after the guide's code ---\nimport json\n"
                      f"print({MARK!r} + json.dumps({probe}))\n")
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_VARS}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread each, not two spinning on a busy 2-core machine
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUIDE.parents[2]), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith(MARK)]
    return json.loads(line[len(MARK):])


# --- A Lightning checkpoint resumes the cyclical schedule ---------------------------------

BASE, TOP, STEP = 0.01, 0.1, 4
N = 12  # steps before the checkpoint: mid-epoch (5 batches an epoch), mid-cycle


class Line(L.LightningModule):
    """A 4-parameter linear model; records the lr each optimizer step uses, by global step."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.lrs: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs[self.global_step] = self.trainer.optimizers[0].param_groups[0]["lr"]

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=BASE, momentum=0.9)
        sched = clr_mlflow.clr_scheduler(opt, "triangular", BASE, TOP, step_size=STEP)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(model, steps, root, ckpt_path=None, callbacks=()):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, generator=g), torch.randn(40, 1, generator=g))
    trainer = L.Trainer(max_steps=steps, logger=False, callbacks=list(callbacks), default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


# A mid-epoch checkpoint of a plain DataLoader: Lightning warns that the data order is not
# resumed (the batches after it differ; the lr depends on the scheduler's state alone), and
# that the resumed run saves into the folder that holds the checkpoint, as a resume does.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_lightning_resumes_the_cyclical_lr_from_a_checkpoint_loaded_weights_only(tmp_path):
    def saver():  # the same callback on both sides, as Lightning asks of a resume
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=N, save_top_k=-1)

    first = Line()
    fit(first, N, tmp_path, callbacks=[saver()])
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    # torch's default, and what Lightning 2.6 uses to load it: no class of ours inside
    state = torch.load(ckpt, weights_only=True)["lr_schedulers"][0]
    assert state["last_epoch"] == N and state["schedule"]["type"] == "CyclicLR"

    resumed = Line()  # a fresh process would build it anew: its state all comes from the file
    trainer = fit(resumed, 2 * N, tmp_path, ckpt_path=ckpt, callbacks=[saver()])
    whole = Line()
    fit(whole, 2 * N, tmp_path / "whole")

    expected = [formula(t, BASE, TOP, STEP) for t in range(2 * N)]
    assert expected == pytest.approx(torch_cyclic_lrs(2 * N, BASE, TOP, STEP), rel=1e-12)
    assert list(first.lrs) == list(range(N))
    assert list(first.lrs.values()) == pytest.approx(expected[:N], rel=1e-12)
    assert list(resumed.lrs) == list(range(N, 2 * N))
    assert list(resumed.lrs.values()) == pytest.approx(expected[N:], rel=1e-12)
    assert list(whole.lrs.values()) == pytest.approx(expected, rel=1e-12)
    assert resumed.lrs == {t: whole.lrs[t] for t in range(N, 2 * N)}  # the uninterrupted run's, exactly
    assert trainer.global_step == 2 * N and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2 * N


# --- docs/guides/integrations.md, as written ----------------------------------------------

def test_guide_lightning_example_runs_as_written(tmp_path):
    out = run_guide("PyTorch Lightning", tmp_path, probe="""{
        "run_id": logger.run_id, "experiment_id": logger.experiment_id, "range_test_run_id": result.run_id,
        "suggested": list(result.suggest()), "model_bounds": [model.base_lr, model.max_lr],
        "step_size": model.step_size, "global_step": trainer.global_step, "range_test_points": len(result.lrs)}""")
    run_id = out["run_id"]
    assert out["range_test_run_id"] == run_id  # the range test went into the training's run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the guide's relative URI, in its folder
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == out["experiment_id"]

    base_lr, max_lr = out["suggested"]
    assert 0 < base_lr < max_lr and out["model_bounds"] == [base_lr, max_lr]
    step_size = out["step_size"]
    steps = 4 * step_size
    assert out["global_step"] == steps

    def series(key):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.step for m in history], np.array([m.value for m in history])

    at, lrs = series("train/lr")
    assert at == list(range(steps))
    expected = [formula(t, base_lr, max_lr, step_size) for t in range(steps)]
    np.testing.assert_allclose(expected, torch_cyclic_lrs(steps, base_lr, max_lr, step_size), rtol=1e-12)
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    at, losses = series("train/loss")
    assert at == list(range(steps)) and np.isfinite(losses).all()
    assert losses[-32:].mean() < losses[:32].mean()  # it trained
    at, sweep = series("range_test/lr")  # lr_find's curve, with training_step as its loss
    assert len(at) == out["range_test_points"] >= 10 and np.all(np.diff(sweep) > 0)
    assert client.get_metric_history(run_id, "train_loss")  # Lightning's own self.log, the same run


def test_guide_hugging_face_example_runs_as_written(tmp_path):
    out = run_guide("Hugging Face Transformers", tmp_path, probe="""{
        "log_history": trainer.state.log_history, "base_lr": base_lr, "max_lr": max_lr,
        "step_size": scheduler.schedule.step_size, "max_steps": trainer.args.max_steps,
        "last_epoch": scheduler.last_epoch, "final_lr": optimizer.param_groups[0]["lr"],
        "run_id": result.run_id, "range_test_points": len(result.lrs), "first_losses": result.losses[:10].tolist()}""")
    base_lr, max_lr, step_size, steps = out["base_lr"], out["max_lr"], out["step_size"], out["max_steps"]

    # lr_find read the loss out of the ModelOutput
    assert out["range_test_points"] >= 10 and np.isfinite(out["first_losses"]).all()
    assert 0 < base_lr < max_lr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(out["run_id"]).info.status == "FINISHED"
    assert len(client.get_metric_history(out["run_id"], "range_test/lr")) == out["range_test_points"]

    # The Trainer's log at its step s (1-based, logging_steps=1) holds the lr that optimizer
    # step used: iteration t = s - 1 of the schedule, base_lr first.
    logged = [(h["step"], h["learning_rate"]) for h in out["log_history"] if "learning_rate" in h]
    assert [s for s, _ in logged] == list(range(1, steps + 1))
    expected = [formula(t, base_lr, max_lr, step_size) for t in range(steps + 1)]
    assert expected == pytest.approx(torch_cyclic_lrs(steps + 1, base_lr, max_lr, step_size), rel=1e-12)
    assert [lr for _, lr in logged] == pytest.approx(expected[:-1], rel=1e-12)
    # one scheduler step per optimizer step: the optimizer is left at iteration `steps`'s lr
    assert out["last_epoch"] == steps and out["final_lr"] == pytest.approx(expected[-1], rel=1e-12)
    losses = [h["loss"] for h in out["log_history"] if "loss" in h]
    assert len(losses) == steps and np.isfinite(losses).all()
