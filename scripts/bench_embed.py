"""Benchmarks of the library as a guest in a user's program (bench.py group 9):

- 9a: `import clr_mlflow` (python -X importtime, a fresh process each time) now vs at an
  earlier commit (its package extracted with `git archive`);
- 9b: lr_find tracked to MLflow vs torch-lr-finder on the same plain DataLoader, model and
  100 iterations, for a tiny BERT-like transformer (token embeddings, 2 encoder layers,
  AdamW) — the case a new user measured at 1.99 (row 3c is the small CNN).

    python scripts/bench.py --only 9 --repeats 3
"""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BEFORE = "e45ce9c"  # the last commit before the package moved into layers (issue 19) and went lazy (issue 17)


def import_seconds(pythonpath: str | None, repeats: int) -> float:
    """Median cumulative import time of `clr_mlflow` in a fresh interpreter."""
    env = None
    if pythonpath:
        import os

        env = dict(os.environ, PYTHONPATH=pythonpath)
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import clr_mlflow"], capture_output=True,
                             text=True, env=env, cwd=tempfile.gettempdir(), timeout=300, check=True)
        line = [ln for ln in out.stderr.splitlines() if re.search(r"\|\s*clr_mlflow$", ln)][-1]
        times.append(int(line.split("|")[1]) / 1e6)  # cumulative microseconds
    return statistics.median(times)


def bench_import(repeats: int) -> list:
    now = import_seconds(str(REPO), repeats)
    archive = subprocess.run(["git", "archive", BEFORE, "clr_mlflow"], cwd=REPO, capture_output=True, check=True)
    with tempfile.TemporaryDirectory() as old:
        tarfile.open(fileobj=BytesIO(archive.stdout)).extractall(old, filter="data")
        before = import_seconds(old, repeats)
    return [(f"9a. `import clr_mlflow` (python -X importtime, fresh process): now vs commit {BEFORE} (before the "
             "lazy imports)", f"{now * 1000:.0f} ms vs {before * 1000:.0f} ms", f"{before / now:.0f}x faster",
             "loads no mlflow/pandas/matplotlib", None)]


class TinyBert(nn.Module):
    """Token embeddings + 2 transformer encoder layers + a classifier on the first token."""

    def __init__(self, vocab=1000, width=64, layers=2, classes=2, length=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids) + self.position)[:, 0])


def bench_transformer(repeats: int, alternate, seed_everything) -> list:
    from clr_mlflow import lr_find

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4096, 32), generator=g)
    labels = (ids[:, :4].sum(1) % 2).long()
    iters = 100

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=32, shuffle=True,
                                           drop_last=True)

    def setup():
        seed_everything(0)
        model = TinyBert()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-7)

    def ours():
        model, opt = setup()
        lr_find(model, opt, loader(), num_iters=iters, start_lr=1e-7, end_lr=10, progress=False)

    try:
        from torch_lr_finder import LRFinder
    except ImportError:
        return [("9b. Range test, tiny transformer vs torch-lr-finder", "not measured: pip install torch-lr-finder",
                 "", "<= 1.0", None)]

    def peer():
        model, opt = setup()
        finder = LRFinder(model, opt, nn.CrossEntropyLoss(), device="cpu")
        finder.range_test(loader(), end_lr=10, num_iter=iters)
        finder.reset()

    t_ours, t_peer = alternate(ours, peer, repeats)
    return [(f"9b. Range test on the same plain DataLoader, tiny BERT-like transformer (2 layers, width 64, "
             f"sequence 32, batch 32, AdamW), {iters} iterations: lr_find (tracked to MLflow: series, bounds "
             "table, curve.csv, curve.png) vs torch-lr-finder 0.2.2", f"{t_ours:.3f} s vs {t_peer:.3f} s",
             f"ratio {t_ours / t_peer:.3f}", "<= 1.0", t_ours / t_peer <= 1.0)]
