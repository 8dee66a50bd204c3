"""Benchmarks, run side by side in one process (A and B alternating, median of N), written
to docs/BENCHMARKS.md. Speed is measured here, never in the tests.

    pip install torch-lr-finder          # the peer, for row 3 only
    python scripts/bench.py              # all CPU rows (GPU rows 4g and 5 too when CUDA is there)
    python scripts/bench.py --only 4g,5  # the GPU rows (scripts/gpu_bench.sh runs this on a GPU machine)

Rows measured by an earlier invocation stay in the file until the same row is measured
again, so CPU rows and GPU rows (made on different machines) live side by side; each row
names the machine and the command that made it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clr_mlflow.data import datasets as data  # noqa: E402
from clr_mlflow import lr_find  # noqa: E402
from clr_mlflow.data.batches import Batches, channel_stats  # noqa: E402
from clr_mlflow.core.curve import sweep_lrs  # noqa: E402
from clr_mlflow.core.engine import NullSink, make_optimizer, seed_everything, use_fast_kernels  # noqa: E402
from clr_mlflow.data.models import build_model  # noqa: E402
from clr_mlflow.core.range_test import range_test  # noqa: E402
from clr_mlflow.core.schedules import ScheduleLR, make_schedule  # noqa: E402
from clr_mlflow.core.steps import CrossEntropy, Stepper, classification_eval  # noqa: E402
from clr_mlflow.core.training import train  # noqa: E402
from clr_mlflow.tracking.iteration_logger import IterationLogger  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def alternate(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of a() and b(), run A, B, A, B, ... after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


class Store:
    """A temporary SQLite tracking store, created once before anything is timed."""

    def __init__(self):
        import mlflow

        self.tmp = tempfile.TemporaryDirectory()
        os.chdir(self.tmp.name)
        mlflow.set_tracking_uri(f"sqlite:///{self.tmp.name}/mlflow.db")
        mlflow.set_experiment("bench")
        self.mlflow = mlflow

    def run(self):
        return self.mlflow.start_run()


def tiny_mlp(num_classes=10, image_size=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 64), nn.ReLU(), nn.Linear(64, num_classes))


def train_as_cli(model, opt, sched, batches, held, iters, sink):
    """The training loop as `clr-mlflow train` runs it (bf16 autocast on CUDA)."""
    device = batches.device
    stepper = Stepper(model, opt, CrossEntropy(), device, amp=torch.bfloat16 if device.type == "cuda" else None)
    return train(stepper, sched, batches, iters, val_loader=held, evaluator=classification_eval(device, stepper.amp),
                 sink=sink, progress=False)


def range_test_as_cli(model, opt, batches, lrs, sink):
    device = batches.device
    stepper = Stepper(model, opt, CrossEntropy(), device, amp=torch.bfloat16 if device.type == "cuda" else None)
    return range_test(stepper, batches, lrs, sink=sink, diverge=1e9, progress=False)


def bench_tracking_overhead(ds, store, repeats):
    rows = []
    mean, std = channel_stats(ds.train)
    held = Batches(ds.test, 500, CPU, mean, std, False, 0, shuffle=False)
    run = store.mlflow.start_run()  # made once: creating a run is not part of the loop
    for row, label, make, batch, iters, augment, log_every in (
            ("1a", "small CNN, batch 128", lambda: build_model("small_cnn", 10), 128, 60, True, 1),
            ("1b", "tiny MLP, batch 32, no augmentation (~1 ms step)", tiny_mlp, 32, 2000, False, 1),
            ("1c", "tiny MLP as above, log_every=10 (CSV keeps every iteration)", tiny_mlp, 32, 2000, False, 10)):
        def loop(tracked):
            seed_everything(0)
            model = make()
            opt = make_optimizer(model, "sgd", 0.01, 0.9, True, 5e-4)
            sched = ScheduleLR(opt, make_schedule("triangular", 0.002, 0.02, max(1, iters // 4), iters))
            batches = Batches(ds.train, batch, CPU, mean, std, augment, 0)
            if not tracked:
                return train_as_cli(model, opt, sched, batches, held, iters, NullSink())
            with IterationLogger(run.info.run_id, log_every=log_every) as sink:  # its exit waits until all is stored
                return train_as_cli(model, opt, sched, batches, held, iters, sink)

        t_on, t_off = alternate(lambda: loop(True), lambda: loop(False), repeats)
        step_ms = 1000 * t_off / iters
        what = "every iteration tracked" if log_every == 1 else f"every {log_every}th iteration tracked"
        rows.append((f"{row}. Tracking overhead: {label}, {iters} iterations, {what} vs off",
                     f"{t_on:.3f} s vs {t_off:.3f} s ({step_ms:.2f} ms/iteration)", f"ratio {t_on / t_off:.3f}",
                     "<= 1.02", t_on / t_off <= 1.02))
    store.mlflow.end_run()
    return rows


def bench_cost_per_value(store, repeats):
    n_buf, n_plain = 30_000, 200
    in_loop = []

    def buffered():
        with store.run() as run:
            buf = IterationLogger(run.info.run_id)
            spent = 0.0
            for start in range(0, n_buf // 3, 8):
                steps = np.arange(start, start + 8)
                t0 = time.perf_counter()
                buf.series(steps, {"b/lr": steps * 1e-3, "b/loss": steps * 1.0, "b/smoothed_loss": steps * 2.0})
                spent += time.perf_counter() - t0
            buf.close()
            in_loop.append(spent)

    def plain():
        with store.run():
            for i in range(n_plain):
                store.mlflow.log_metric("p/loss", float(i), step=i)

    t_buf, t_plain = alternate(buffered, plain, max(3, repeats // 2))
    per_loop, per_buf, per_plain = statistics.median(in_loop) / n_buf, t_buf / n_buf, t_plain / n_plain
    return [("2. Cost per logged value in the loop: our buffer (30,000 values in chunks of 8 iterations) vs "
             "mlflow.log_metric per value (SQLite)", f"{per_loop * 1e6:.2f} us vs {per_plain * 1e3:.2f} ms",
             f"{per_plain / per_loop:,.0f}x cheaper", ">= 100x", per_plain / per_loop >= 100),
            ("2b. Same, counting the background SQLite writes too (until close() returns)",
             f"{per_buf * 1e6:.1f} us vs {per_plain * 1e3:.2f} ms", f"{per_plain / per_buf:.0f}x cheaper", "-", None)]


def bench_range_test(ds, store, repeats):
    iters, batch = 100, 64
    mean, std = channel_stats(ds.train)
    # Pre-normalised float images, as the peers' examples load them; the permute leaves them
    # NHWC in memory, i.e. channels_last, the faster layout on the CPU.
    x_all = ((torch.from_numpy(ds.train.x).permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1))
             / std.view(1, 3, 1, 1))
    y_all = torch.from_numpy(ds.train.y)

    # lr_find makes a run of its own each time, as it does for a user without an active run.
    def ours():
        """As `clr-mlflow range-test` runs it: lr_find on our uint8 batches, channels_last,
        every value tracked, bounds table, curve.csv and curve.png logged."""
        seed_everything(0)
        model = build_model("small_cnn", 10).to(memory_format=torch.channels_last)
        opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
        batches = Batches(ds.train, batch, CPU, mean, std, False, 0, channels_last=True)
        lr_find(model, opt, batches, num_iters=iters, start_lr=1e-5, end_lr=10, diverge=1e9, progress=False)

    def plain_loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=batch,
                                           shuffle=True, drop_last=True)

    def ours_on_dataloader():
        """lr_find as a user calls it, on the same DataLoader and model as the peer below."""
        seed_everything(0)
        model = build_model("small_cnn", 10)
        opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
        lr_find(model, opt, plain_loader(), num_iters=iters, start_lr=1e-5, end_lr=10, diverge=1e9, progress=False)

    def bare():
        """A hand-written loop doing the same steps, nothing else: no smoothing, no restore."""
        seed_everything(0)
        model = build_model("small_cnn", 10)
        opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(len(y_all), generator=gen)
        losses = []
        for i, lr in enumerate(sweep_lrs(1e-5, 10, iters)):
            idx = order[(i * batch) % (len(order) - batch):][:batch]
            for g in opt.param_groups:
                g["lr"] = lr
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

    rows = []
    try:
        from torch_lr_finder import LRFinder
    except ImportError:
        rows.append(("3. Range test vs torch-lr-finder", "not measured: pip install torch-lr-finder", "", "<= 1.0", None))
    else:
        def peer():
            seed_everything(0)
            model = build_model("small_cnn", 10)
            opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
            finder = LRFinder(model, opt, nn.CrossEntropyLoss(), device="cpu")
            finder.range_test(plain_loader(), end_lr=10, num_iter=iters, diverge_th=1e9)
            finder.reset()

        t_ours, t_peer = alternate(ours, peer, repeats)
        rows.append((f"3. Range test, small CNN, batch {batch}, {iters} iterations, CPU: ours (lr_find on our "
                     "batches, tracked to MLflow) vs torch-lr-finder 0.2.2", f"{t_ours:.3f} s vs {t_peer:.3f} s",
                     f"ratio {t_ours / t_peer:.3f}", "<= 1.0", t_ours / t_peer <= 1.0))
        t_ours, t_peer = alternate(ours_on_dataloader, peer, repeats)
        rows.append((f"3c. Range test on the same plain torch DataLoader, model and {iters} iterations: lr_find "
                     "(tracked to MLflow: series, bounds table, curve.csv, curve.png) vs torch-lr-finder 0.2.2",
                     f"{t_ours:.3f} s vs {t_peer:.3f} s", f"ratio {t_ours / t_peer:.3f}", "<= 1.0",
                     t_ours / t_peer <= 1.0))
    t_ours, t_bare = alternate(ours, bare, repeats)
    rows.append(("3b. Range test, same setting: ours (tracked) vs a bare hand-written torch loop",
                 f"{t_ours:.3f} s vs {t_bare:.3f} s", f"ratio {t_ours / t_bare:.3f}", "<= 1.05",
                 t_ours / t_bare <= 1.05))
    return rows


def pil_loader(split, mean, std, batch: int):
    """torchvision's usual CIFAR pipeline: PIL images, RandomCrop(32, padding=4), flip,
    ToTensor, Normalize, in one process (so its rate is the rate of one CPU core)."""
    import torchvision.transforms as T
    from PIL import Image

    class PilSet(torch.utils.data.Dataset):
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(mean.tolist(), std.tolist())])

        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(split.x[i])), int(split.y[i])

    return torch.utils.data.DataLoader(PilSet(), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)


def take(batches, n: int) -> int:
    """Draw n batches; returns the number of images."""
    seen = 0
    for _, (x, y) in zip(range(n), batches):
        seen += len(y)
    return seen


def bench_data_pipeline(ds, repeats):
    mean, std = channel_stats(ds.train)
    n_batches, batch = 20, 256
    ours_b = Batches(ds.train, batch, CPU, mean, std, True, 0)
    loader = pil_loader(ds.train, mean, std, batch)
    t_ours, t_pil = alternate(lambda: take(ours_b.epoch(), n_batches), lambda: take(loader, n_batches), repeats)
    n = n_batches * batch
    threads = torch.get_num_threads()
    return [(f"4. Data pipeline, CPU (crop 4 + flip + normalise), {n} images: ours (batched tensors, "
             f"{threads} torch threads) vs torchvision DataLoader + PIL transforms (1 process)",
             f"{n / t_ours:,.0f} vs {n / t_pil:,.0f} images/s", f"{t_pil / t_ours:.1f}x", "(GPU: >= 50x per core)", None)]


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    """fn() returns the seconds of the part it times; one warm-up call, then `repeats`."""
    fn()
    times = [fn() for _ in range(repeats)]
    return statistics.median(times), times


def bench_gpu_pipeline(full, repeats):
    """Row 4g: one epoch of augmented batches from the GPU-resident uint8 set vs the PIL
    loader on one core of the same machine."""
    mean, std = channel_stats(full.train)
    gpu = Batches(full.train, 512, CUDA, mean, std, True, 0, channels_last=True)
    loader = pil_loader(full.train, mean, std, 256)

    def ours():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = take(gpu.epoch(), len(gpu))
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    def pil():
        t0 = time.perf_counter()
        n = take(loader, 20)
        return (time.perf_counter() - t0) / n

    per_ours, _ = median_seconds(ours, repeats)
    per_pil, _ = median_seconds(pil, repeats)
    ratio = per_pil / per_ours
    return [(f"4g. Data pipeline on CUDA: one epoch ({len(gpu) * 512:,} images, crop 4 + flip + normalise, "
             "batch 512) from the GPU-resident uint8 set vs torchvision DataLoader + PIL transforms (1 process = "
             "1 core)", f"{1 / per_ours:,.0f} vs {1 / per_pil:,.0f} images/s", f"{ratio:,.0f}x per core",
             ">= 50x per core", ratio >= 50)]


def bench_gpu_resnet18(full, store, repeats):
    """Rows 5a-5c: ResNet-18 (CIFAR stem), batch 512, bf16 autocast, channels_last, every
    value tracked to MLflow, as `clr-mlflow` runs it."""
    mean, std = channel_stats(full.train)
    train_b = Batches(full.train, 512, CUDA, mean, std, True, 0, channels_last=True)
    test_subset = data.Split(full.test.x[:512], full.test.y[:512])
    held = Batches(test_subset, 512, CUDA, mean, std, False, 0, channels_last=True, shuffle=False)
    epoch = len(train_b)
    run = store.mlflow.start_run()

    def fresh(compiled: bool = False):
        seed_everything(0)
        model = build_model("resnet18", 10).to(CUDA, memory_format=torch.channels_last)
        opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
        return (torch.compile(model) if compiled else model), opt

    def range_once():
        net, opt = fresh()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with IterationLogger(run.info.run_id) as sink:  # its exit waits until MLflow stored everything
            result = range_test_as_cli(net, opt, train_b, sweep_lrs(1e-5, 1, epoch), sink)
        torch.cuda.synchronize()
        ran.append(len(result.lrs))
        return time.perf_counter() - t0

    def train_once(compiled):
        def once():
            net, opt = fresh(compiled)
            sched = ScheduleLR(opt, make_schedule("triangular", 0.01, 0.1, epoch // 2, epoch))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with IterationLogger(run.info.run_id) as sink:
                train_as_cli(net, opt, sched, train_b, held, epoch, sink)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        return once

    rows, ran = [], []
    t, times = median_seconds(range_once, repeats)
    rows.append((f"5a. Range test on CUDA: ResNet-18, one epoch ({epoch} iterations), batch 512, bf16, tracked; "
                 f"lr 1e-5 to 1, divergence stop off (iterations run: {min(ran)}-{max(ran)})", f"{t:.2f} s (runs: "
                 f"{', '.join(f'{x:.2f}' for x in times)})", f"{t:.2f} s", "<= 5 s", t <= 5))
    for row, compiled in (("5b", False), ("5c", True)):
        t, times = median_seconds(train_once(compiled), repeats)
        rate = epoch * 512 / t
        rows.append((f"{row}. Training on CUDA: ResNet-18, one epoch, batch 512, bf16, triangular, tracked"
                     f"{', compile=true (compiling in the warm-up run)' if compiled else ''}",
                     f"{t:.2f} s an epoch", f"{rate:,.0f} images/s", ">= 60,000 images/s", rate >= 60_000))
    store.mlflow.end_run()
    return rows


def config_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> typed values of clr-mlflow parameters."""
    from clr_mlflow.app.review import config_values

    given = dict(pair.partition("=")[::2] for pair in pairs)
    values = config_values(given)
    if unknown := sorted(set(given) - set(values)):
        sys.exit(f"--fast: expected KEY=VALUE with KEY a clr-mlflow parameter, but got {unknown}")
    return values


def bench_gpu_fast(data_path: str, cache: Path, seeds: int, overrides: dict):
    """Row 5d: `clr-mlflow run --model fast` end to end (range test, then 10 epochs of one-cycle
    from its loss_edge bounds: one-cycle wants max_lr near the edge of divergence, where
    min_div10 is 10x lower), one warm-up run, then `seeds` seeds."""
    from clr_mlflow.app.config import Config
    from clr_mlflow.app.runner import execute

    runs = []
    for seed in range(seeds + 1):
        cfg = Config(data=data_path, data_dir=str(cache), model="fast", batch_size=512, num_iters=80,
                     bounds_rule="loss_edge", policy="one_cycle", epochs=10, seed=seed, experiment="bench_fast",
                     save_model=False)
        cfg = dataclasses.replace(cfg, **overrides)
        t0 = time.perf_counter()
        out = execute(cfg, "run")
        wall = time.perf_counter() - t0
        runs.append((out.range_test_seconds + out.training.seconds, wall, out.training.final_accuracy))
        print(f"fast seed {seed}: {runs[-1]}", flush=True)
    timed = np.array(runs[1:])  # the first run pays CUDA and cuDNN start-up
    clr, wall, acc = timed[:, 0], timed[:, 1], timed[:, 2]
    met = bool(clr.mean() <= 10 and acc.min() >= 0.94)
    return [(f"5d. `model=fast` on CUDA end to end: range test (80 iterations) + 10 epochs one-cycle from its "
             f"loss_edge bounds, batch 512, tracked; {seeds} seeds after a warm-up run"
             + "".join(f", {k}={v}" for k, v in overrides.items()),
             f"range test + training {clr.mean():.1f} s (sd {clr.std(ddof=1) if seeds > 1 else 0:.1f}); whole "
             f"command {wall.mean():.1f} s", f"test accuracy {acc.mean():.4f} (min {acc.min():.4f}, max "
             f"{acc.max():.4f})", "94% in <= 10 s", met)]


def bench_compare_read(store):
    """Issue 4: reading 20 runs of 10,000 points each for the comparison plots."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from clr_mlflow.app.review import compare_experiment

    store.mlflow.set_experiment("bench_compare")
    client = MlflowClient()
    for r in range(20):
        with store.run() as run:
            store.mlflow.log_params({"policy": "triangular", "total_iters": 10_000})
            metrics = [Metric("train/lr", 0.001 * (t % 100), 0, t) for t in range(10_000)]
            metrics += [Metric("val/accuracy", 0.5 + 0.001 * e, 0, 500 * e + 499) for e in range(20)]
            client.log_batch(run.info.run_id, metrics=metrics)
            store.mlflow.log_metrics({"test/accuracy": 0.5, "test/best_accuracy": 0.52})
    t0 = time.perf_counter()
    result = compare_experiment("bench_compare", log_run=True)
    total = time.perf_counter() - t0
    return [("c. Compare (issue 4): 20 runs x 10,000-point train/lr histories, read + leaderboard + 4 plots "
             "logged", f"read {result.read_seconds:.2f} s, total {total:.2f} s", "", "quick", None)]


ROW_ORDER = ("1a", "1b", "1c", "2", "2b", "3", "3b", "3c", "9a", "9b", "6", "6b", "7a", "7b", "7c", "7d", "8", "4", "4g", "5a", "5b",
             "5c", "5d", "c")
GPU_ROWS = {  # shown until a CUDA machine measures them
    "4g": ("4g. Data pipeline on CUDA vs the PIL loader per core", ">= 50x per core"),
    "5a": ("5a. Range test on CUDA: ResNet-18, one epoch, batch 512", "<= 5 s"),
    "5b": ("5b. Training on CUDA: ResNet-18, batch 512", ">= 60,000 images/s"),
    "5c": ("5c. Training on CUDA: ResNet-18, batch 512, compile=true", ">= 60,000 images/s"),
    "5d": ("5d. `model=fast` on CUDA end to end: range test + 10 epochs one-cycle", "94% in <= 10 s"),
}
COLUMNS = ("benchmark", "A vs B", "result", "target", "met", "machine", "command")
HEADER = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]


def bench_store_rows(repeats):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_store import bench_rows

    return bench_rows(max(2, repeats // 2))


def bench_seeds_rows(repeats):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_seeds import bench_seeds

    return bench_seeds(repeats)


def bench_embed_rows(repeats):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_embed import bench_import, bench_transformer

    return bench_import(max(5, repeats)) + bench_transformer(repeats, alternate, seed_everything)


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def _row_id(cells: list[str]) -> str:
    return cells[0].split(".", 1)[0].strip()


def _old_rows(text: str) -> dict[str, str]:
    """Table lines of an earlier BENCHMARKS.md in this format, by row id."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == len(COLUMNS) and _row_id(cells) in ROW_ORDER:
            rows[_row_id(cells)] = line
    return rows


def write(rows, out: Path, command: str):
    """Rows measured now replace the same rows of `out`; the others stay, and GPU rows never
    measured show as such. The hand-written '## Notes' below the table are kept."""
    old_text = out.read_text() if out.exists() else ""
    table = _old_rows(old_text)
    for key, (name, target) in GPU_ROWS.items():
        table.setdefault(key, f"| {name} | not measured: needs a CUDA GPU | - | {target} | - | - | - |")
    for name, ab, result, target, met in rows:
        verdict = "yes" if met else ("no" if met is False else "-")
        table[_row_id([name])] = f"| {name} | {ab} | {result} | {target} | {verdict} | {machine()} | `{command}` |"
    lines = ["# Benchmarks", "",
             "Made by `scripts/bench.py`; each row names the machine and the command that measured it "
             "(rows stay until measured again, so rows from a CPU machine and a GPU machine sit side by side). "
             "A and B alternate in one process; each figure is the median of the repeats after one warm-up "
             "run each.", "", *HEADER, *(table[k] for k in ROW_ORDER if k in table)]
    text = "\n".join(lines) + "\n"
    notes = old_text[old_text.index("## Notes"):] if "## Notes" in old_text else ""
    out.write_text(text + ("\n" + notes if notes else ""))
    print(text)


def bench_checkpoint(ds, store, repeats):
    """Row 8: what the default checkpoint (every epoch end: torch.save through a renamed
    temporary file, then copied into the run's artifacts) costs a CPU training."""
    from clr_mlflow.app.runner import checkpoint_writer

    mean, std = channel_stats(ds.train)
    held = Batches(ds.test, 500, CPU, mean, std, False, 0, shuffle=False)
    run = store.mlflow.start_run()
    iters = 2 * (len(ds.train) // 128)

    def loop(every):
        seed_everything(0)
        model = build_model("small_cnn", 10)
        opt = make_optimizer(model, "sgd", 0.01, 0.9, True, 5e-4)
        sched = ScheduleLR(opt, make_schedule("triangular", 0.002, 0.02, max(1, iters // 4), iters))
        stepper = Stepper(model, opt, CrossEntropy(), CPU)
        with tempfile.TemporaryDirectory() as tmp:
            save = checkpoint_writer(run.info.run_id, (0.002, 0.02, "given"), Path(tmp), lambda: None)
            train(stepper, sched, Batches(ds.train, 128, CPU, mean, std, True, 0), iters, val_loader=held,
                  evaluator=classification_eval(CPU), progress=False, checkpoint_every=every, on_checkpoint=save)

    t_on, t_off = alternate(lambda: loop(-1), lambda: loop(0), repeats)
    store.mlflow.end_run()
    return [(f"8. Checkpoint cost: small CNN, batch 128, {iters} iterations (2 epochs), a checkpoint at every epoch "
             "end (the default) vs checkpoint_every=0", f"{t_on:.3f} s vs {t_off:.3f} s", f"ratio {t_on / t_off:.3f}",
             "<= 1.02", t_on / t_off <= 1.02)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of row 5d (after one warm-up run)")
    parser.add_argument("--fast", action="append", default=[], metavar="KEY=VALUE",
                        help="row 5d: change a clr-mlflow parameter of the fast run (repeatable)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--only", default="", help="comma-separated groups: 1, 2, 3, 4, c, 6 (HTTP store), "
                        "7 (batched seeds), 8 (checkpoints), 9 (import time, a transformer) (CPU); 4g, 5 (CUDA)")
    args = parser.parse_args()
    data_path = args.data if args.data == "cifar10" else str(Path(args.data).resolve())
    cuda = torch.cuda.is_available()
    cpu_rows = {"1", "2", "3", "4", "c", "6", "7", "8", "9"}
    only = set(args.only.split(",")) if args.only else cpu_rows | ({"4g", "5"} if cuda else set())
    if only & {"4g", "5"} and not cuda:
        sys.exit("rows 4g and 5 need a CUDA GPU (scripts/gpu_bench.sh runs them on one)")
    if cuda:
        use_fast_kernels(CUDA)  # as clr-mlflow does on CUDA
    ds = data.load(data_path, REPO / "data", limit_train=5000, limit_test=500) if only & {"1", "3", "4", "8"} else None
    full = data.load(data_path, REPO / "data") if only & {"4g", "5"} else None
    store = Store()
    rows = []
    for key, fn in (("1", lambda: bench_tracking_overhead(ds, store, args.repeats)),
                    ("2", lambda: bench_cost_per_value(store, args.repeats)),
                    ("3", lambda: bench_range_test(ds, store, args.repeats)),
                    ("4", lambda: bench_data_pipeline(ds, args.repeats)),
                    ("4g", lambda: bench_gpu_pipeline(full, args.repeats)),
                    ("5", lambda: bench_gpu_resnet18(full, store, args.repeats)
                     + bench_gpu_fast(data_path, REPO / "data", args.seeds, config_overrides(args.fast))),
                    ("c", lambda: bench_compare_read(store)),
                    ("6", lambda: bench_store_rows(args.repeats)),
                    ("7", lambda: bench_seeds_rows(args.repeats)),
                    ("8", lambda: bench_checkpoint(ds, store, args.repeats)),
                    ("9", lambda: bench_embed_rows(args.repeats))):
        if key in only:
            rows += fn()
            print(rows[-1], flush=True)
    argv = " ".join(sys.argv[1:]).replace(f"--out {args.out}", "").replace(f"--out={args.out}", "")
    command = " ".join(["python scripts/bench.py", *argv.split()])
    write(rows, Path(args.out), command)


if __name__ == "__main__":
    main()
