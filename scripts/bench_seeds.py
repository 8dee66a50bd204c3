"""Benchmark: K=4 range-test seeds side by side in one batched model (`batched_seeds=True`)
vs one after another (`batched_seeds=False`), and vs one seed alone, on the CPU (lr_find's
auto mode batches on CUDA only; this measures what batching does on the CPU).

    python scripts/bench_seeds.py [--repeats 5]

Rows are in scripts/bench.py's format (name, A vs B, result, target, met) and printed as
its table lines, ids 7a-7d; `python scripts/bench.py --only 7` writes them into
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import REPO, machine, tiny_mlp  # noqa: E402

from clr_mlflow.data import datasets as data  # noqa: E402
from clr_mlflow import lr_find  # noqa: E402
from clr_mlflow.data.batches import Batches, channel_stats  # noqa: E402
from clr_mlflow.core.engine import make_optimizer, seed_everything  # noqa: E402
from clr_mlflow.data.models import build_model  # noqa: E402

K, ITERS = 4, 100


def interleave(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, CPU seconds of this process) of each fn, run round robin after
    one warm-up each: on a shared machine the wall time swings with other jobs' load, the
    CPU time much less (it still counts OpenMP threads spinning while they wait)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - w, time.process_time() - c))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def bench_seeds(repeats: int, data_path: str | None = None, device: str = "cpu") -> list[tuple]:
    """Per model: (K seeds batched vs one after another), (K seeds batched vs one seed)."""
    dev = torch.device(device)
    ds = data.load(data_path or str(REPO.parent / "shared" / "data" / "cifar10"), REPO / "data",
                   limit_train=5000, limit_test=500)
    mean, std = channel_stats(ds.train)
    rows = []
    for (row, row_b), label, make, batch, augment, channels_last in (
            (("7a", "7b"), "small CNN (94k weights, BatchNorm), batch 64, augmented, channels_last as the CLI "
             "runs it", lambda: build_model("small_cnn", 10), 64, True, True),
            (("7c", "7d"), "tiny MLP (197k weights), batch 32, no augmentation", tiny_mlp, 32, False, False)):
        ran = set()

        def run(seeds: int, batched: bool):
            def once():
                seed_everything(0)
                model = make().to(dev)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                opt = make_optimizer(model, "sgd", 1e-5, 0.9, True, 5e-4)
                loader = Batches(ds.train, batch, dev, mean, std, augment, 0, channels_last=channels_last)
                # lr up to 0.1 and diverge=1e9: every seed runs all iterations on both paths
                result = lr_find(model, opt, loader, num_iters=ITERS, start_lr=1e-5, end_lr=0.1, diverge=1e9,
                                 seeds=seeds, batched_seeds=batched, track=False, progress=False)
                ran.update(len(r.lrs) for r in result.seed_results or (result,))
            return once

        t = interleave({"batched": run(K, True), "serial": run(K, False), "one": run(1, False)}, repeats)
        (wb, cb), (ws, cs), (wo, co) = t["batched"], t["serial"], t["one"]
        where = "the CPU" if dev.type == "cpu" else dev.type.upper()
        rows.append((f"{row}. Range test seeds on {where}, {label}: {K} seeds x {ITERS} iterations batched (one "
                     f"vmapped model, batched_seeds=True) vs one after another (iterations run: {sorted(ran)})",
                     f"{wb:.2f} s vs {ws:.2f} s (CPU time {cb:.2f} s vs {cs:.2f} s)",
                     f"{ws / wb:.2f}x (CPU time {cs / cb:.2f}x)", "> 1x (faster)", ws / wb > 1))
        rows.append((f"{row_b}. Same model: {K} seeds batched vs 1 seed alone (what the extra seeds cost)",
                     f"{wb:.2f} s vs {wo:.2f} s (CPU time {cb:.2f} s vs {co:.2f} s)",
                     f"{wb / wo:.2f}x one seed's time (one after another: {ws / wo:.2f}x)", "-", None))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (where lr_find batches seeds on its own)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, ab, result, target, met in bench_seeds(args.repeats, args.data, args.device):
        verdict = "yes" if met else ("no" if met is False else "-")
        print(f"| {name} | {ab} | {result} | {target} | {verdict} | {machine()} | "
              f"`python scripts/bench_seeds.py --repeats {args.repeats} --device {args.device}` |", flush=True)


if __name__ == "__main__":
    main()
