"""Which bounds rule trains best? For each setting and seed: one range test (every rule reads
the same curve), then one training per rule and policy with that rule's bounds; final
validation and test accuracy, mean +- sd over seeds, per rule. Everything is tracked in
MLflow (experiment `rule_study`) through the same runner the CLI uses.

    python scripts/rule_study.py                       # the CPU-sized study, into docs/RESULTS.md
    python scripts/rule_study.py --seeds 3 --epochs 6  # longer

Settings: small_cnn and smith_cifar on CIFAR-10 subsets of two sizes, and a model plug-in
(a plain MLP, `model=study_models:mlp`, through the bring-your-own path).
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

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from clr_mlflow.app.config import Config  # noqa: E402
from clr_mlflow.app.runner import execute  # noqa: E402

LOSS_RULES = ("min_div10", "steepest", "loss_edge", "valley", "slide")
POLICIES = ("triangular2", "one_cycle")
SETTINGS = {  # name: (model, limit_train, batch_size, range-test iterations, lr_end)
    "small_cnn/2k": ("small_cnn", 2000, 64, 100, 10.0),
    # The paper's net (no BatchNorm, PyTorch's init) falls slowly: over 100 steps up to 10 its
    # loss never dropped 1% before diverging ("flat" for every rule), so it gets a longer,
    # narrower sweep.
    "smith_cifar/5k": ("smith_cifar", 5000, 100, 400, 1.0),
    "mlp/3k (plug-in)": ("study_models:mlp", 3000, 64, 100, 10.0),
}
MARK = "## Which bounds rule trains best"


def study(data: str, cache: Path, seeds: int, epochs: int, only: list[str]) -> pd.DataFrame:
    rows = []
    for name, (model, limit, batch, num_iters, lr_end) in SETTINGS.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        for seed in range(seeds):
            base = Config(data=data, data_dir=str(cache), model=model, limit_train=limit, limit_test=1000,
                          batch_size=batch, seed=seed, device="cpu", experiment="rule_study",
                          num_iters=num_iters, lr_start=1e-5, lr_end=lr_end, save_model=False,
                          system_metrics=False)
            probe = execute(base, "range-test")
            table = probe.range_test.bounds.set_index("rule")
            for rule in LOSS_RULES:
                if not table.loc[rule, "max_lr"] > 0:
                    print(f"{name} seed {seed}: {rule} gave no bounds ({table.loc[rule, 'note']})")
                    continue
                for policy in POLICIES:
                    cfg = dataclasses.replace(base, policy=policy, epochs=epochs, step_epochs=epochs / 4,
                                              base_lr=float(table.loc[rule, "base_lr"]),
                                              max_lr=float(table.loc[rule, "max_lr"]),
                                              run_name=f"{name} {rule} {policy} s{seed}")
                    out = execute(cfg, "train", tags={"rule_study.rule": rule, "rule_study.setting": name})
                    rows.append({"setting": name, "seed": seed, "rule": rule, "policy": policy,
                                 "max_lr": cfg.max_lr, "val": out.training.final_accuracy, "test": out.test_accuracy})
                    print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def mean_sd(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def report(df: pd.DataFrame, command: str) -> str:
    lines = [MARK, "", f"Made by `{command}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores). Each cell: final "
             "validation / test accuracy, mean ± sd over seeds; each rule's bounds come from the same range test "
             "(one per setting and seed).", ""]
    cols = [(s, p) for s in SETTINGS for p in POLICIES]
    lines.append("| rule | " + " | ".join(f"{s}, {p}" for s, p in cols) + " | mean val | mean test |")
    lines.append("|---" * (len(cols) + 3) + "|")
    for rule in LOSS_RULES:
        mine = df[df["rule"] == rule]
        cells = []
        for s, p in cols:
            sel = mine[(mine["setting"] == s) & (mine["policy"] == p)]
            cells.append(f"{mean_sd(sel['val'])} / {mean_sd(sel['test'])}" if len(sel) else "no bounds")
        lines.append(f"| `{rule}` | " + " | ".join(cells) + f" | {mine['val'].mean():.3f} | {mine['test'].mean():.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated setting names (prefixes) to run")
    parser.add_argument("--merge", default="", help="a --csv of an earlier study: its rows for the settings not run now are kept")
    parser.add_argument("--out", default=str(REPO / "docs" / "RESULTS.md"))
    parser.add_argument("--csv", default="", help="also write every training's row here")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    only = [o for o in args.only.split(",") if o]
    df = study(str(Path(args.data).resolve()), REPO / "data", args.seeds, args.epochs, only)
    if args.merge:
        earlier = pd.read_csv(args.merge)
        df = pd.concat([earlier[~earlier["setting"].isin(df["setting"].unique())], df], ignore_index=True)
    if args.csv:
        df.to_csv(args.csv, index=False)
    command = "python scripts/rule_study.py " + " ".join(sys.argv[1:]).replace(f"--out {args.out}", "")
    if args.merge:
        command += " (merged with an earlier run's rows for the other settings: same script, same arguments)"
    text = report(df, command.strip())
    out = Path(args.out)
    old = out.read_text() if out.exists() else "# Results\n"
    before = old.split(MARK)[0].rstrip() + "\n\n"
    after = old.split(MARK, 1)[1].split("\n## ", 1)[1] if MARK in old and "\n## " in old.split(MARK, 1)[1] else ""
    out.write_text(before + text + (("\n## " + after) if after else ""))
    print(text)


if __name__ == "__main__":
    main()
