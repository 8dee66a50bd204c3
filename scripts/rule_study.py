"""Which bounds rule trains best, across model families? For each family: a 3-seed range test
(`clr_mlflow.lr_find`, tracking off), every rule's bounds, then a plain torch training loop with
`clr_mlflow.clr_scheduler` (`one_cycle` and `triangular2`) per rule and training seed, beside
two baselines: fastai's recipe (valley's lr through fit_one_cycle's schedule, reimplemented
below) and a common fixed default (SGD 0.1 with cosine, or Adam/AdamW 1e-3 constant). Scored
on a validation split carved from the training data (no test split is read). Then
`clr_mlflow.tune_bounds` once per family on a short budget: does it pick the long-budget winner,
and what does it cost next to the range test?

    python scripts/rule_study.py --quick                  # 1-minute smoke test, into /tmp
    python scripts/rule_study.py                          # the study: docs/results/*.csv
    python scripts/rule_study.py --report                 # tables into docs/RESULTS.md, plots into docs/img
    python scripts/rule_study.py --families charlm,cnn --scale 3 --seeds 2 --policies one_cycle \
        --no-tune --out docs/results/long                 # the 3x budget check (then --report --tag _long)

Incremental: every finished training is appended to the CSV at once, and a rerun skips what is
there (a crash loses one training). One core: torch.set_num_threads(1), no loader workers.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import clr_mlflow  # noqa: E402
import study_models  # noqa: E402
from clr_mlflow.data.models import small_cnn  # noqa: E402

torch.set_num_threads(1)
LOSS_RULES = ("min_div10", "steepest", "loss_edge", "valley", "slide")
POLICIES = ("one_cycle", "triangular2")  # --policies narrows it
SCALE, TAG = 1, ""  # --scale (a longer budget), --tag (its images and RESULTS.md block)
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
OUT = REPO / "docs" / "results"
RUNS_CSV, BOUNDS_CSV, TUNE_CSV = "rule_study_runs.csv", "rule_study_bounds.csv", "rule_study_tune.csv"


# ----------------------------------------------------------------------------------------- data
def _cifar(n_train: int, n_val: int) -> tuple[TensorDataset, TensorDataset]:
    """A class-balanced subset of CIFAR-10's *training* folder, split into train and validation
    (the test folder is never read). Normalised per channel with the subset's statistics."""
    from PIL import Image

    classes = sorted(p.name for p in (CIFAR / "train").iterdir())
    per = (n_train + n_val) // len(classes)
    rng = random.Random(0)
    xs, ys = [], []
    for c, name in enumerate(classes):
        files = sorted((CIFAR / "train" / name).iterdir())
        for f in rng.sample(files, per):
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)
            ys.append(c)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(ys)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    mean, std = x[:n_train].mean((0, 2, 3), keepdim=True), x[:n_train].std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def _stdlib_text(limit: int) -> str:
    """The first `limit` characters of the Python standard library's own *.py files (sorted
    paths, top level only: the same text on every machine with this Python)."""
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def _chars(n_chars: int, context: int):
    text = _stdlib_text(n_chars)
    text = "".join(c if 32 <= ord(c) < 127 or c == "\n" else "?" for c in text.replace("\t", "    "))
    vocab = sorted(set(text))
    ids = torch.from_numpy(np.searchsorted(np.array([ord(c) for c in vocab]),
                                           np.frombuffer(text.encode("ascii"), np.uint8)).astype(np.int64))
    cut = int(0.9 * len(ids))  # the last 10% of the text (other files) is the validation split

    def windows(seq):
        n = (len(seq) - 1) // context
        w = seq[: n * context + 1]
        return TensorDataset(w[:-1][: n * context].view(n, context), w[1:][: n * context].view(n, context))

    return windows(ids[:cut]), windows(ids[cut:]), len(vocab)


def _friedman(n: int):
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=n, n_features=10, noise=1.0, random_state=0)
    cut = int(0.8 * n)
    mx, sx, my, sy = x[:cut].mean(0), x[:cut].std(0), y[:cut].mean(), y[:cut].std()
    x, y = torch.tensor((x - mx) / sx, dtype=torch.float32), torch.tensor((y - my) / sy, dtype=torch.float32)
    return TensorDataset(x[:cut], y[:cut, None]), TensorDataset(x[cut:], y[cut:, None]), float(sy ** 2)


def _seg(n_train: int, n_val: int):
    """Generated segmentation data: on a noisy background of random colour, 1-3 filled shapes
    (class 1 disc, 2 square, 3 triangle) of random size, place and colour; the mask is each
    pixel's class (later shapes paint over earlier ones)."""
    size = 32
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    n = n_train + n_val
    xs = np.empty((n, 3, size, size), np.float32)
    ms = np.zeros((n, size, size), np.int64)
    for i in range(n):
        img = g.uniform(0, 1, 3)[:, None, None] + 0.15 * g.standard_normal((3, size, size))
        for _ in range(g.integers(1, 4)):
            cls, r = int(g.integers(1, 4)), g.uniform(4, 9)
            cx, cy = g.uniform(r, size - r, 2)
            if cls == 1:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            elif cls == 2:
                inside = (abs(xx - cx) <= r * 0.8) & (abs(yy - cy) <= r * 0.8)
            else:
                inside = (yy - cy <= r * 0.8) & (yy - cy >= -r * 0.8 + 2 * abs(xx - cx))
            img[:, inside] = g.uniform(0, 1, 3)[:, None] + 0.15 * g.standard_normal((3, int(inside.sum())))
            ms[i][inside] = cls
        xs[i] = img
    x, m = torch.from_numpy(xs), torch.from_numpy(ms)
    x = (x - 0.5) / 0.3
    return TensorDataset(x[:n_train], m[:n_train]), TensorDataset(x[n_train:], m[n_train:])


# ------------------------------------------------------------------------------------ families
def ce_loss(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]) if out.dim() == 3 else out, y.reshape(-1) if out.dim() == 3 else y)


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


@torch.no_grad()
def _eval(model, loader, fn) -> dict:
    was = model.training
    model.eval()
    try:
        return fn(model, loader)
    finally:
        model.train(was)


def acc_eval(model, loader):
    right = seen = loss = 0.0
    for x, y in loader:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        right += float((out.argmax(1) == y).sum())
        seen += len(y)
    return {"score": right / seen, "accuracy": right / seen, "val_loss": loss / seen}


def bpc_eval(model, loader):
    nats = seen = 0.0
    for x, y in loader:
        out = model(x)
        nats += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
        seen += y.numel()
    bpc = nats / seen / math.log(2)
    return {"score": -bpc, "bpc": bpc, "val_loss": nats / seen}


def r2_eval(model, loader, var_y: float = 1.0):
    se = ss = seen = 0.0
    ys = torch.cat([y for _, y in loader])
    mean = float(ys.mean())
    for x, y in loader:
        se += float(((model(x) - y) ** 2).sum())
        ss += float(((y - mean) ** 2).sum())
        seen += len(y)
    return {"score": 1 - se / ss, "r2": 1 - se / ss, "mse": se / seen * var_y}


def miou_eval(model, loader, classes: int = 4):
    conf = torch.zeros(classes, classes, dtype=torch.long)
    for x, m in loader:
        pred = model(x).argmax(1)
        conf += torch.bincount(m.reshape(-1) * classes + pred.reshape(-1), minlength=classes * classes).view(classes, classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    iou = inter / union.clamp(min=1)
    return {"score": float(iou.mean()), "miou": float(iou.mean()), "pixel_acc": float(inter.sum() / conf.sum())}


@dataclasses.dataclass
class Family:
    name: str
    what: str
    data: Callable[[bool], tuple]          # quick -> (train_ds, val_ds, extra)
    model: Callable[[dict], torch.nn.Module]
    optimizer: str                         # sgd | adam | adamw
    loss: Callable
    evaluate: Callable                     # (model, loader, extra) -> dict with "score" (higher is better)
    metric: str                            # the key reported
    higher: bool
    worst: float                           # the score of a training that diverged
    batch: int
    steps: int                             # the long budget, optimizer steps
    quick_steps: int = 12


_CACHE: dict = {}


def cifar_data(quick):
    key = ("cifar", quick)
    if key not in _CACHE:
        _CACHE[key] = (*(_cifar(400, 200) if quick else _cifar(2500, 1000)), None)
    return _CACHE[key]


def char_data(quick):
    tr, va, vocab = _chars(60_000 if quick else 330_000, 64)
    return tr, va, {"vocab": vocab}


def tab_data(quick):
    tr, va, var_y = _friedman(600 if quick else 3000)
    return tr, va, {"var_y": var_y}


def seg_data(quick):
    tr, va = _seg(128, 64) if quick else _seg(1500, 300)
    return tr, va, None


FAMILIES = {
    "cnn": Family("cnn", "small CNN (clr_mlflow's `small_cnn`, 94k weights) on 2,500 CIFAR-10 images, SGD momentum 0.9",
                  cifar_data, lambda e: small_cnn(10), "sgd", ce_loss, lambda m, l, e: acc_eval(m, l),
                  "accuracy", True, 0.1, 32, 320),
    "resnet": Family("resnet", "ResNet-8 (16/32/64, one basic block per stage, 78k weights) on 2,500 CIFAR-10 images, "
                     "SGD momentum 0.9", cifar_data, lambda e: study_models.tiny_resnet(10), "sgd", ce_loss,
                     lambda m, l, e: acc_eval(m, l), "accuracy", True, 0.1, 32, 320),
    "charlm": Family("charlm", "character-level transformer LM (2 pre-LN blocks, d=64, 4 heads, context 64, 105k "
                     "weights) on 330k characters of the Python stdlib's source, AdamW (wd 0.01)", char_data,
                     lambda e: study_models.CharLM(e["vocab"]), "adamw", ce_loss, lambda m, l, e: bpc_eval(m, l),
                     "bpc", False, -7.0, 32, 300),
    "tabular": Family("tabular", "MLP regressor (10-128-128-1) on make_friedman1 (3,000 rows, noise 1), MSE, Adam",
                      tab_data, lambda e: study_models.regressor(10), "adam", mse_loss,
                      lambda m, l, e: r2_eval(m, l, e["var_y"]), "r2", True, 0.0, 64, 600),
    "seg": Family("seg", "U-Net-like conv encoder-decoder (16/32/64, 48k weights) on 1,500 generated 32x32 "
                  "shape images with masks (4 classes), Adam", seg_data, lambda e: study_models.SegNet(4), "adam",
                  ce_loss, lambda m, l, e: miou_eval(m, l), "miou", True, 0.0, 32, 300),
}


def make_optimizer(fam: Family, model, lr: float = 1e-3):
    if fam.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if fam.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return torch.optim.Adam(model.parameters(), lr=lr)


# ------------------------------------------------------------------------------- schedules
class FastaiOneCycle:
    """fastai's fit_one_cycle(n, lr_max) schedule, from its published algorithm
    (fastai.callback.schedule): position p = iteration / total; lr = combined_cos(pct_start=0.25,
    lr_max/div, lr_max, lr_max/div_final) with div=25, div_final=1e5, i.e. half-cosine from
    lr_max/25 up to lr_max over the first 25%, then half-cosine down to lr_max/1e5; momentum
    (SGD's momentum, Adam's beta1) combined_cos(0.25, 0.95, 0.85, 0.95). Set before each batch."""

    def __init__(self, optimizer, lr_max: float, total: int, pct: float = 0.25, div: float = 25.0,
                 div_final: float = 1e5, moms=(0.95, 0.85, 0.95)):
        self.opt, self.total, self.pct, self.i = optimizer, total, pct, 0
        self.lr = (lr_max / div, lr_max, lr_max / div_final)
        self.moms = moms
        self._set()

    @staticmethod
    def _cos(a, b, p):
        return a + (1 + math.cos(math.pi * (1 - p))) * (b - a) / 2

    def _value(self, v):
        p = self.i / self.total
        return self._cos(v[0], v[1], p / self.pct) if p < self.pct else \
            self._cos(v[1], v[2], (p - self.pct) / (1 - self.pct))

    def _set(self):
        lr, mom = self._value(self.lr), self._value(self.moms)
        for g in self.opt.param_groups:
            g["lr"] = lr
            if "betas" in g:
                g["betas"] = (mom, g["betas"][1])
            elif "momentum" in g:
                g["momentum"] = mom

    def step(self):
        self.i += 1
        if self.i < self.total:
            self._set()


class Nothing:
    def step(self):
        pass


# -------------------------------------------------------------------------------- training
def train_eval(fam: Family, data, method: str, policy: str, seed: int, base_lr: float, max_lr: float,
               steps: int) -> dict:
    """One training, as a user's plain torch loop: seeded weights and data order, `steps`
    optimizer steps, the validation metric at the end. A non-finite loss stops it (diverged)."""
    train_ds, val_ds, extra = data
    torch.manual_seed(seed)
    model = fam.model(extra)
    model.train()
    if method == "default":
        lr0 = 0.1 if fam.optimizer == "sgd" else 1e-3
        opt = make_optimizer(fam, model, lr0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if fam.optimizer == "sgd" else Nothing()
        base_lr = max_lr = lr0
    elif method == "fastai":
        opt = make_optimizer(fam, model, max_lr)
        sched = FastaiOneCycle(opt, max_lr, steps)
        base_lr = max_lr / 25
    else:
        opt = make_optimizer(fam, model, base_lr)
        sched = clr_mlflow.clr_scheduler(opt, policy, base_lr, max_lr, step_size=max(1, steps // 4),
                                         total_iters=steps)
    loader = DataLoader(train_ds, batch_size=fam.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    val = DataLoader(val_ds, batch_size=256)
    t0, done, diverged = time.perf_counter(), 0, False
    while done < steps and not diverged:
        for batch in loader:
            loss = fam.loss(model, batch)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    out = {"score": fam.worst, fam.metric: float("nan")}
    if not diverged:
        got = _eval(model, val, lambda m, l: fam.evaluate(m, l, extra))
        if math.isfinite(got["score"]):
            out = got
        else:
            diverged = True
    return {"family": fam.name, "method": method, "policy": policy, "seed": seed, "base_lr": base_lr,
            "max_lr": max_lr, "steps": steps, "diverged": diverged, "seconds": round(time.perf_counter() - t0, 2),
            **out}


def range_test(fam: Family, data, seeds: int) -> tuple[pd.DataFrame, float]:
    """lr_find as a user calls it: a fresh model and optimizer, the training loader, the
    family's loss, `seeds` seeds (median bounds), defaults otherwise (100 steps, 1e-7 .. 10)."""
    train_ds, _, extra = data
    torch.manual_seed(0)
    model = fam.model(extra)
    opt = make_optimizer(fam, model)
    loader = DataLoader(train_ds, batch_size=fam.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    found = clr_mlflow.lr_find(model, opt, loader, loss_fn=fam.loss, seeds=seeds, track=False, progress=False)
    return found.bounds.assign(family=fam.name, seconds=round(time.perf_counter() - t0, 2)), time.perf_counter() - t0


RUN_COLUMNS = ["family", "method", "policy", "seed", "base_lr", "max_lr", "steps", "diverged", "seconds", "score",
               "accuracy", "val_loss", "bpc", "r2", "mse", "miou", "pixel_acc", "note"]


def append(path: Path, row: dict) -> None:
    """One row onto the CSV (the header with the first); a runs row gets the fixed columns."""
    df = pd.DataFrame([row])
    if path.name == RUNS_CSV:
        df = df.reindex(columns=RUN_COLUMNS)
    df.to_csv(path, mode="a", header=not path.exists(), index=False)


def run_family(fam: Family, out: Path, quick: bool, seeds: int, rt_seeds: int, tune: bool) -> None:
    t_family = time.perf_counter()
    data = fam.data(quick)
    steps = fam.quick_steps if quick else fam.steps * SCALE
    bounds_path, runs_path, tune_path = out / BOUNDS_CSV, out / RUNS_CSV, out / TUNE_CSV
    known = pd.read_csv(bounds_path) if bounds_path.exists() else pd.DataFrame(columns=["family"])
    bounds = known[known["family"] == fam.name]
    if bounds.empty:
        bounds, secs = range_test(fam, data, rt_seeds)
        bounds = bounds.assign(range_seeds=rt_seeds)
        for row in bounds.to_dict("records"):
            append(bounds_path, row)
        print(f"[{fam.name}] range test ({rt_seeds} seeds) {secs:.1f}s", flush=True)
    print(bounds[["rule", "base_lr", "max_lr", "max_lr_min", "max_lr_max", "note"]].to_string(), flush=True)
    table = bounds.set_index("rule")
    done = pd.read_csv(runs_path) if runs_path.exists() else pd.DataFrame(columns=["family", "method", "policy", "seed"])
    have = {(r.family, r.method, r.policy, int(r.seed)) for r in done.itertuples()}
    memo = {(r.policy, round(r.base_lr, 15), round(r.max_lr, 15), int(r.seed)): r._asdict()
            for r in done[done["family"] == fam.name].itertuples()} if len(done) else {}
    jobs = []
    for seed in range(seeds):
        for rule in LOSS_RULES:
            for policy in POLICIES:
                jobs.append((rule, policy, seed))
        jobs.append(("fastai", "fastai_one_cycle", seed))
        jobs.append(("default", "cosine" if fam.optimizer == "sgd" else "constant", seed))
    for method, policy, seed in jobs:
        if (fam.name, method, policy, seed) in have:
            continue
        if method in ("default",):
            lo = hi = float("nan")
        else:
            rule = "valley" if method == "fastai" else method
            lo, hi = float(table.loc[rule, "base_lr"]), float(table.loc[rule, "max_lr"])
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
                append(runs_path, {"family": fam.name, "method": method, "policy": policy, "seed": seed,
                                   "base_lr": lo, "max_lr": hi, "steps": steps, "diverged": False, "seconds": 0,
                                   "score": float("nan"), "note": "no bounds: " + str(table.loc[rule, "note"])})
                continue
        key = (policy, round(lo, 15), round(hi, 15), seed)
        if method in LOSS_RULES and key in memo:  # another rule gave the same bounds: the same training
            row = {k: v for k, v in memo[key].items() if k != "Index"} | {"method": method, "seconds": 0,
                                                                          "note": f"same bounds as {memo[key]['method']}"}
        else:
            row = train_eval(fam, data, method, policy, seed, lo, hi, steps)
            if method in LOSS_RULES:
                memo[key] = row
        append(runs_path, row)
        print(f"[{fam.name}] {method:9s} {policy:16s} s{seed} max_lr {row['max_lr']:.3g} "
              f"{fam.metric} {row.get(fam.metric, float('nan')):.4f} ({row['seconds']}s)", flush=True)
    if tune:
        tdone = pd.read_csv(tune_path) if tune_path.exists() else pd.DataFrame(columns=["family"])
        if fam.name not in set(tdone["family"]):
            append(tune_path, tune_check(fam, data, steps))
    print(f"[{fam.name}] done in {time.perf_counter() - t_family:.0f}s", flush=True)


def tune_check(fam: Family, data, long_steps: int) -> dict:
    """clr_mlflow.tune_bounds on a quarter of the long budget (one_cycle, one seed, in
    process), timed beside a one-seed lr_find of the same defaults."""
    train_ds, val_ds, extra = data
    loader = DataLoader(train_ds, batch_size=fam.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    val = DataLoader(val_ds, batch_size=256)
    _, rt_one = range_test(fam, data, 1)
    steps = max(2, long_steps // 4)
    t0 = time.perf_counter()
    tuned = clr_mlflow.tune_bounds(lambda: fam.model(extra), lambda m: make_optimizer(fam, m), loader, val,
                                   rules=LOSS_RULES, policy="one_cycle", steps=steps, loss_fn=fam.loss,
                                   metric_fn=lambda m, l: fam.evaluate(m, l, extra)["score"], use_ray=False,
                                   track=False, progress=False)
    secs = time.perf_counter() - t0
    t = tuned.table.set_index("rule")
    print(f"[{fam.name}] tune_bounds ({steps} steps): {tuned.rule} in {secs:.0f}s; range test alone {rt_one:.1f}s",
          flush=True)
    return {"family": fam.name, "steps": steps, "winner": tuned.rule, "winner_max_lr": tuned.max_lr,
            "winner_score": tuned.metric, "seconds": round(secs, 2), "range_test_seconds": round(rt_one, 2),
            **{f"score_{r}": float(t.loc[r, "metric"]) for r in LOSS_RULES},
            **{f"max_lr_{r}": float(t.loc[r, "max_lr"]) for r in LOSS_RULES}}


# ---------------------------------------------------------------------------------- report
def summary(runs: pd.DataFrame, fam: Family) -> pd.DataFrame:
    """Per (method, policy): mean and sd of the reported metric over seeds (a diverged run
    counts as the family's worst score), and how many diverged."""
    sign = 1 if fam.higher else -1
    r = runs[runs["family"] == fam.name].copy()
    r = r[r["score"].notna()]
    r["value"] = sign * r["score"]
    g = r.groupby(["method", "policy"])
    return pd.DataFrame({"mean": g["value"].mean(), "sd": g["value"].std(ddof=1), "n": g["value"].size(),
                         "diverged": g["diverged"].sum(), "max_lr": g["max_lr"].median(),
                         "score": g["score"].mean(), "score_sd": g["score"].std(ddof=1)}).reset_index()


def verdict(s: pd.DataFrame, policy: str) -> tuple[str, list[str]]:
    """The best rule under `policy` by mean score, and the rules that tie with it: within the
    larger of the two standard deviations."""
    rows = s[(s["policy"] == policy) & s["method"].isin(LOSS_RULES)]
    if rows.empty:
        return "", []
    best = rows.loc[rows["score"].idxmax()]
    ties = [m for m, sc, sd in zip(rows["method"], rows["score"], rows["score_sd"])
            if m != best["method"] and best["score"] - sc <= max(best["score_sd"], sd)]
    return best["method"], ties


def plot(s: pd.DataFrame, fam: Family, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(POLICIES), figsize=(5 * len(POLICIES), 3.6), squeeze=False)
    unit = {"accuracy": "val accuracy", "bpc": "val bits per char (lower is better)", "r2": "val R²",
            "miou": "val mIoU"}[fam.metric]
    for ax, policy in zip(axes[0], POLICIES):
        rows = s[(s["policy"] == policy) & s["method"].isin(LOSS_RULES)]
        base = s[s["method"].isin(["fastai", "default"])]
        rows = pd.concat([rows, base]).sort_values("score")
        colors = ["tab:blue" if m in LOSS_RULES else ("tab:orange" if m == "fastai" else "tab:gray")
                  for m in rows["method"]]
        labels = [f"{m} ({p})" if m in ("fastai", "default") else m for m, p in
                  zip(rows["method"], rows["policy"])]
        ax.barh(range(len(rows)), rows["mean"], xerr=rows["sd"].fillna(0), color=colors, alpha=0.8)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(f"{fam.name}: rules with {policy}", fontsize=10)
        ax.set_xlabel(unit + f", mean ± sd, {int(rows['n'].max())} seeds", fontsize=8)
        lo = np.nanmin(rows["mean"] - rows["sd"].fillna(0))
        hi = np.nanmax(rows["mean"] + rows["sd"].fillna(0))
        ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.05 * (hi - lo))
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(f"made by `{command}`", 60 * len(POLICIES))), fontsize=7, y=0.02,
                 va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(mean, sd, n, diverged, digits=3):
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
    return text + (f" ({int(diverged)}/{int(n)} diverged)" if diverged else "")


def report(out: Path, families: list[str], command: str, plots: bool = True) -> str:
    runs, bounds = pd.read_csv(out / RUNS_CSV), pd.read_csv(out / BOUNDS_CSV)
    tune = pd.read_csv(out / TUNE_CSV) if (out / TUNE_CSV).exists() else pd.DataFrame(columns=["family"])
    lines = []
    agree = []
    overall: dict = {}
    for name in families:
        fam = FAMILIES[name]
        if fam.name not in set(runs["family"]):
            continue
        s = summary(runs, fam)
        b = bounds[bounds["family"] == name].set_index("rule")
        img = REPO / "docs" / "img" / f"rule_study_{name}{TAG}.png"
        if plots:
            plot(s, fam, img, command)
        unit = {"accuracy": "validation accuracy (higher is better)", "bpc": "validation bits per character "
                "(lower is better)", "r2": "validation R² (higher is better)", "miou": "validation mIoU (higher "
                "is better)"}[fam.metric]
        steps = int(runs[runs["family"] == name]["steps"].max())
        lines += [f"### {name}{f' ({TAG.strip(chr(95))})' if TAG else ''}: {fam.what}", "",
                  f"{steps} optimizer steps per training (batch {fam.batch}); cells: {unit}, mean ± sd over "
                  f"{runs[runs['family'] == name]['seed'].nunique()} training seeds; max_lr: median of the {int(b['range_seeds'].iloc[0])}-seed range test [min–max over its "
                  f"seeds]. "
                  f"Made by `{command}`.", "",
                  "| rule | max_lr [range over seeds] | base_lr | " + " | ".join(POLICIES) + " |", "|---" * (3 + len(POLICIES)) + "|"]
        for rule in LOSS_RULES:
            cells = []
            for policy in POLICIES:
                row = s[(s["method"] == rule) & (s["policy"] == policy)]
                cells.append(fmt(*row[["mean", "sd", "n", "diverged"]].iloc[0]) if len(row) else "no bounds")
            mx = b.loc[rule]
            lines.append(f"| `{rule}` | {mx['max_lr']:.3g} [{mx['max_lr_min']:.3g}–{mx['max_lr_max']:.3g}] | "
                         f"{mx['base_lr']:.3g} | " + " | ".join(cells) + " |")
        for method in ("fastai", "default"):
            row = s[s["method"] == method]
            if len(row):
                r = row.iloc[0]
                what = (f"fastai recipe: valley's {r['max_lr']:.3g} via fit_one_cycle" if method == "fastai" else
                        ("fixed default: SGD 0.1, cosine" if fam.optimizer == "sgd"
                         else f"fixed default: {'AdamW' if fam.optimizer == 'adamw' else 'Adam'} 1e-3 constant"))
                lines.append(f"| {what} | | | {fmt(r['mean'], r['sd'], r['n'], r['diverged'])} (its own schedule) |"
                             + " |" * (len(POLICIES) - 1))
        verdicts = []
        for policy in POLICIES:
            best, ties = verdict(s, policy)
            rows = s[(s["policy"] == policy) & s["method"].isin(LOSS_RULES)].set_index("method")["score"]
            spread = rows.max() - rows.min()
            overall[(name, policy)] = {"rank": rows.rank(ascending=False, method="min").to_dict(), "good": [best, *ties],
                                       "short": ((rows.max() - rows) / spread if spread > 0 else rows * 0).to_dict()}
            verdicts.append(f"{policy}: **`{best}`** wins" + (f", ties: {', '.join(f'`{t}`' for t in ties)}"
                                                               if ties else ", no tie"))
            if policy == "one_cycle":
                long_best, long_ties = best, ties
        lines += ["", "Best rule (highest mean; a tie = within the larger sd of the two): " + "; ".join(verdicts) + ".",
                  "", f"![{name}: each rule's trained result](img/rule_study_{name}{TAG}.png)", ""]
        t = tune[tune["family"] == name]
        if len(t):
            t = t.iloc[0]
            same = t["winner"] == long_best
            near = t["winner"] in long_ties
            agree.append((name, t["winner"], long_best, same, near, t["seconds"], t["range_test_seconds"]))
    if overall:
        lines += ["### Across families", "",
                  "Per rule, over every family and policy studied: its rank among the five rules (1 = best mean), "
                  "how often it won or tied the winner (within the larger sd), and the worst shortfall from the "
                  "winner as a share of the spread between the best and the worst rule there. Made by "
                  f"`{command}`.", "",
                  "| rule | " + " | ".join(f"{n}, {p}" for n, p in overall) + " | mean rank | won or tied | worst shortfall |",
                  "|---" * (len(overall) + 4) + "|"]
        for rule in LOSS_RULES:
            ranks = [overall[k]["rank"].get(rule, np.nan) for k in overall]
            wt = sum(rule in overall[k]["good"] for k in overall)
            short = max(overall[k]["short"].get(rule, np.nan) for k in overall)
            lines.append(f"| `{rule}` | " + " | ".join(f"{r:.0f}" for r in ranks) +
                         f" | {np.nanmean(ranks):.1f} | {wt} of {len(overall)} | {short:.0%} |")
        lines.append("")
    if agree:
        lines += ["### tune_bounds on a short budget vs the long-budget winner", "",
                  f"`clr_mlflow.tune_bounds(..., rules=<the 5 loss rules>, policy=\"one_cycle\", steps=<a quarter of "
                  f"the family's budget>, seeds=1, use_ray=False)`, once per family; its range test is one seed. "
                  f"Made by `{command}`.", "",
                  "| family | short-budget winner | long-budget winner (one_cycle) | same? | tune_bounds s | one-seed range test s | cost |",
                  "|---|---|---|---|---|---|---|"]
        for name, w, lb, same, near, secs, rt in agree:
            lines.append(f"| {name} | `{w}` | `{lb}` | {'yes' if same else ('tie' if near else 'no')} | "
                         f"{secs:.0f} | {rt:.1f} | {secs / rt:.1f}x |")
        n_same = sum(a[3] for a in agree)
        n_near = sum(a[3] or a[4] for a in agree)
        lines += ["", f"Same winner in {n_same} of {len(agree)} families; a winner that ties the long-budget "
                  f"winner in {n_near} of {len(agree)}.", ""]
    return "\n".join(lines) + "\n"


MARKS = "<!-- rule_study:tables{} -->", "<!-- /rule_study:tables{} -->"


def main():
    global POLICIES, SCALE, TAG
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny data, 12 steps, 1 seed, into /tmp")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds")
    parser.add_argument("--range-seeds", type=int, default=3)
    parser.add_argument("--no-tune", action="store_true", help="skip the tune_bounds check")
    parser.add_argument("--out", default="", help="CSV folder (default docs/results; /tmp/rule_study_quick with --quick)")
    parser.add_argument("--report", action="store_true", help="only write the tables/plots from the CSVs")
    parser.add_argument("--scale", type=int, default=1, help="multiply every family's training budget")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated CLR policies to train")
    parser.add_argument("--tag", default="", help="suffix of the images and of the RESULTS.md block")
    parser.add_argument("--command", default="python scripts/rule_study.py", help="the command named in the report")
    args = parser.parse_args()
    POLICIES, SCALE, TAG = tuple(p for p in args.policies.split(",") if p), args.scale, args.tag
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            parser.error(f"unknown family {f!r}: one of {', '.join(FAMILIES)}")
    out = Path(args.out or ("/tmp/rule_study_quick" if args.quick else OUT))
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        t0 = time.perf_counter()
        for f in families:
            run_family(FAMILIES[f], out, args.quick, 1 if args.quick else args.seeds,
                       2 if args.quick else args.range_seeds, not args.no_tune)
        print(f"study wall time {time.perf_counter() - t0:.0f}s", flush=True)
    if args.quick and not args.report:
        print(report(out, families, args.command + " --quick", plots=False))
        return
    if args.report:
        text = report(out, families, args.command)
        md = REPO / "docs" / "RESULTS.md"
        old = md.read_text()
        BEGIN, END = (m.format(TAG) for m in MARKS)
        if BEGIN in old and END in old:
            md.write_text(old.split(BEGIN)[0] + BEGIN + "\n" + text + END + old.split(END, 1)[1])
        print(text)


if __name__ == "__main__":
    main()
