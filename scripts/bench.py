"""Benchmarks, run side by side in one process (A and B alternating, median of N), written
to docs/BENCHMARKS.md. Speed is measured here, never in the tests.

    pip install torch-lr-finder          # the peer, for row 3 only
    python scripts/bench.py              # all CPU rows (GPU rows too when CUDA is there)
    python scripts/bench.py --repeats 7 --out docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import platform
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

from clr_mlflow import data  # noqa: E402
from clr_mlflow.batches import Batches, channel_stats  # noqa: E402
from clr_mlflow.curve import sweep_lrs  # noqa: E402
from clr_mlflow.engine import NullSink, make_optimizer, seed_everything  # noqa: E402
from clr_mlflow.models import build_model  # noqa: E402
from clr_mlflow.range_test import range_test  # noqa: E402
from clr_mlflow.schedules import ScheduleLR, make_schedule  # noqa: E402
from clr_mlflow.training import train  # noqa: E402

CPU = torch.device("cpu")


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


def bench_tracking_overhead(ds, store, repeats):
    from clr_mlflow.tracking import MetricBuffer

    rows = []
    mean, std = channel_stats(ds.train)
    held = Batches(ds.test, 500, CPU, mean, std, False, 0)
    run = store.mlflow.start_run()  # made once: creating a run is not part of the loop
    for label, make, batch, iters, augment, log_every in (
            ("small CNN, batch 128", lambda: build_model("small_cnn", 10), 128, 60, True, 1),
            ("tiny MLP, batch 32, no augmentation (~1 ms step)", tiny_mlp, 32, 2000, False, 1),
            ("tiny MLP as above, log_every=10 (CSV keeps every iteration)", tiny_mlp, 32, 2000, False, 10)):
        def loop(tracked):
            seed_everything(0)
            model = make()
            opt = make_optimizer(model, "sgd", 0.01, 0.9, True, 5e-4)
            sched = ScheduleLR(opt, make_schedule("triangular", 0.002, 0.02, max(1, iters // 4), iters))
            batches = Batches(ds.train, batch, CPU, mean, std, augment, 0)
            if not tracked:
                return train(model, opt, sched, batches, held, iters, sink=NullSink())
            with MetricBuffer(run.info.run_id, log_every=log_every) as sink:  # its exit waits until all is stored
                return train(model, opt, sched, batches, held, iters, sink=sink)

        t_on, t_off = alternate(lambda: loop(True), lambda: loop(False), repeats)
        step_ms = 1000 * t_off / iters
        what = "every iteration tracked" if log_every == 1 else f"every {log_every}th iteration tracked"
        rows.append((f"1. Tracking overhead: {label}, {iters} iterations, {what} vs off",
                     f"{t_on:.3f} s vs {t_off:.3f} s ({step_ms:.2f} ms/iteration)", f"ratio {t_on / t_off:.3f}",
                     "<= 1.02", t_on / t_off <= 1.02))
    store.mlflow.end_run()
    return rows


def bench_cost_per_value(store, repeats):
    from clr_mlflow.tracking import MetricBuffer

    n_buf, n_plain = 30_000, 200
    in_loop = []

    def buffered():
        with store.run() as run:
            buf = MetricBuffer(run.info.run_id)
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
    from clr_mlflow.tracking import MetricBuffer

    iters, batch = 100, 64
    mean, std = channel_stats(ds.train)
    # Pre-normalised float images, as the peers' examples load them; the permute leaves them
    # NHWC in memory, i.e. channels_last, the faster layout on the CPU.
    x_all = ((torch.from_numpy(ds.train.x).permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1))
             / std.view(1, 3, 1, 1))
    y_all = torch.from_numpy(ds.train.y)

    run = store.mlflow.start_run()  # made once: creating a run is not part of the range test

    def ours():
        """As `clr-mlflow range-test` runs it: channels_last, every value tracked."""
        seed_everything(0)
        model = build_model("small_cnn", 10).to(memory_format=torch.channels_last)
        opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
        batches = Batches(ds.train, batch, CPU, mean, std, False, 0, channels_last=True)
        with MetricBuffer(run.info.run_id) as sink:
            range_test(model, opt, batches, sweep_lrs(1e-5, 10, iters), sink=sink, diverge=1e9)

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
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=batch,
                                                 shuffle=True, drop_last=True)
            finder = LRFinder(model, opt, nn.CrossEntropyLoss(), device="cpu")
            finder.range_test(loader, end_lr=10, num_iter=iters, diverge_th=1e9)
            finder.reset()

        t_ours, t_peer = alternate(ours, peer, repeats)
        rows.append((f"3. Range test, small CNN, batch {batch}, {iters} iterations, CPU: ours (tracked to MLflow) "
                     "vs torch-lr-finder 0.2.2", f"{t_ours:.3f} s vs {t_peer:.3f} s", f"ratio {t_ours / t_peer:.3f}",
                     "<= 1.0", t_ours / t_peer <= 1.0))
    t_ours, t_bare = alternate(ours, bare, repeats)
    store.mlflow.end_run()
    rows.append(("3b. Range test, same setting: ours (tracked) vs a bare hand-written torch loop",
                 f"{t_ours:.3f} s vs {t_bare:.3f} s", f"ratio {t_ours / t_bare:.3f}", "<= 1.05",
                 t_ours / t_bare <= 1.05))
    return rows


def bench_data_pipeline(ds, repeats):
    import torchvision.transforms as T
    from PIL import Image

    mean, std = channel_stats(ds.train)
    n_batches, batch = 20, 256
    ours_b = Batches(ds.train, batch, CPU, mean, std, True, 0)

    class PilSet(torch.utils.data.Dataset):
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(mean.tolist(), std.tolist())])

        def __len__(self):
            return len(ds.train)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(ds.train.x[i])), int(ds.train.y[i])

    loader = torch.utils.data.DataLoader(PilSet(), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)

    def ours():
        for _, (x, y) in zip(range(n_batches), ours_b.epoch()):
            pass

    def pil():
        for _, (x, y) in zip(range(n_batches), loader):
            pass

    t_ours, t_pil = alternate(ours, pil, repeats)
    n = n_batches * batch
    threads = torch.get_num_threads()
    return [(f"4. Data pipeline, CPU (crop 4 + flip + normalise), {n} images: ours (batched tensors, "
             f"{threads} torch threads) vs torchvision DataLoader + PIL transforms (1 process)",
             f"{n / t_ours:,.0f} vs {n / t_pil:,.0f} images/s", f"{t_pil / t_ours:.1f}x", "(GPU: >= 50x per core)", None)]


def bench_compare_read(store):
    """Issue 4: reading 20 runs of 10,000 points each for the comparison plots."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from clr_mlflow.review import compare_experiment

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
    return [("Compare (issue 4): 20 runs x 10,000-point train/lr histories, read + leaderboard + 4 plots "
             "logged", f"read {result.read_seconds:.2f} s, total {total:.2f} s", "", "quick", None)]


def write(rows, out: Path, argv: str):
    lines = ["# Benchmarks", "",
             f"Made by `python scripts/bench.py {argv}`".rstrip() + f" on {platform.node() or 'this machine'}: "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
             f"{time.strftime('%Y-%m-%d')}. A and B alternate in one process; each figure is the median "
             "of the repeats after one warm-up run each.", "",
             "| benchmark | A vs B | result | target | met |", "|---|---|---|---|---|"]
    for name, ab, result, target, met in rows:
        lines.append(f"| {name} | {ab} | {result} | {target} | {'yes' if met else ('no' if met is False else '-')} |")
    text = "\n".join(lines) + "\n"
    out.write_text(text if not out.exists() else text + _notes(out))
    print(text)


def _notes(out: Path) -> str:
    """Keep the hand-written notes below the table (everything from '## Notes' on)."""
    old = out.read_text()
    return "\n" + old[old.index("## Notes"):] if "## Notes" in old else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--only", default="", help="comma-separated row numbers, e.g. 1,3")
    args = parser.parse_args()
    ds = data.load(args.data, REPO / "data", limit_train=5000, limit_test=500)
    store = Store()
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for key, fn in (("1", lambda: bench_tracking_overhead(ds, store, args.repeats)),
                    ("2", lambda: bench_cost_per_value(store, args.repeats)),
                    ("3", lambda: bench_range_test(ds, store, args.repeats)),
                    ("4", lambda: bench_data_pipeline(ds, args.repeats)),
                    ("c", lambda: bench_compare_read(store))):
        if only is None or key in only:
            rows += fn()
            print(rows[-1], flush=True)
    argv = " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))
    write(rows, Path(args.out), argv)


if __name__ == "__main__":
    main()
