"""`tune_bounds` and `bounds_rule=tuned`: every rule's bounds trained briefly from the same
start, the best on validation wins; and lr_find's warning when the chosen max_lr sits far
above valley's. Real range tests and trainings (a small MLP on a separable problem, a small
CNN on an image folder) into a real SQLite store. The Ray Tune path runs once (use_ray=True,
FIFO: ASHA's stops would depend on which trial reports first); a local Ray and its workers take
about a minute on a 2-core machine."""
import logging
import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clr_mlflow
from clr_mlflow.app.config import Config, ConfigError
from clr_mlflow.app.runner import execute
from clr_mlflow.core.bounds import DISAGREE, disagreement
from clr_mlflow.core.engine import seed_everything

W = torch.randn(20, 4, generator=torch.Generator().manual_seed(99))  # the labelling rule: argmax of x @ W


def dataset(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ W).argmax(1))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


@pytest.fixture
def loaders():
    train = DataLoader(dataset(512, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(dataset(256, 5), batch_size=128)


ARGS = dict(steps=48, num_iters=60, start_lr=1e-5, progress=False)


def retrain(loader, val_loader, policy, base_lr, max_lr, steps, seed=0) -> float:
    """The winner's training written out with the public scheduler, independently of tune.py:
    seeded weights, the loader's order from its generator as it stands, accuracy at the end."""
    seed_everything(seed)
    model = make_model()
    optimizer = make_optimizer(model)
    scheduler = clr_mlflow.clr_scheduler(optimizer, policy, base_lr, max_lr, step_size=max(1, steps // 2),
                                         total_iters=steps)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
            if done == steps:
                break
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in val_loader)
    return right / len(val_loader.dataset)


def test_the_winner_is_the_candidate_with_the_best_validation_accuracy(loaders):
    train, val = loaders
    rng_before = (torch.get_rng_state(), random.getstate(), train.generator.get_state())
    tuned = clr_mlflow.tune_bounds(make_model, make_optimizer, train, val, track=False, **ARGS)
    # the caller's RNGs and data order are as they were
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]
    assert torch.equal(train.generator.get_state(), rng_before[2])

    table = tuned.table.set_index("rule")
    assert list(table.index) == ["min_div10", "steepest", "loss_edge", "valley", "slide"]
    assert (table["outcome"] == "finished").all() and table["metric"].between(0, 1).all()
    assert table["selected"].sum() == 1 and table["selected"][tuned.rule]
    assert tuned.metric == table["metric"].max() == table.loc[tuned.rule, "metric"]
    assert (tuned.base_lr, tuned.max_lr) == tuple(table.loc[tuned.rule, ["base_lr", "max_lr"]]) == tuned.suggest()
    assert table["metric"].nunique() >= 3  # the rules' bounds really train differently here
    assert tuned.metric > table["metric"].min() + 0.2
    # each candidate's bounds are its row of the range test's table; there the winner is now selected
    bounds = tuned.range_test.bounds.set_index("rule")
    assert np.allclose(bounds.loc[table.index, "max_lr"], table["max_lr"])
    assert bounds["selected"][tuned.rule] and bounds["selected"].sum() == 1 and tuned.range_test.bounds_rule == tuned.rule

    # re-trained here from the same seed and data order: the same accuracy, and so for another rule
    for rule in (tuned.rule, "loss_edge" if tuned.rule != "loss_edge" else "valley"):
        row = table.loc[rule]
        train.generator.set_state(rng_before[2])
        assert retrain(train, val, "one_cycle", row["base_lr"], row["max_lr"], ARGS["steps"]) == row["metric"]


def test_custom_metric_seeds_and_rules_with_shared_bounds(loaders):
    """metric_fn decides (here: minus the validation loss); seeds=2 scores the mean of two
    initialisations; a rule listed whose bounds equal another's trains once."""
    train, val = loaders

    def neg_loss(model, loader):
        return -float(sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in loader)) / 256

    tuned = clr_mlflow.tune_bounds(make_model, make_optimizer, train, val, rules=["loss_edge", "min_div10"],
                                   metric_fn=neg_loss, seeds=2, policy="triangular", track=False, **ARGS)
    table = tuned.table.set_index("rule")
    assert list(table.index) == ["loss_edge", "min_div10"]
    assert (table["metric"] < 0).all() and (table["metric_min"] <= table["metric"]).all()
    assert (table["metric"] <= table["metric_max"]).all() and (table["metric_min"] < table["metric_max"]).any()
    assert tuned.metric == table["metric"].max()
    assert tuned.range_test.bounds["seeds"].max() == 2  # the range test ran two seeds too


def test_a_curve_no_rule_reads_gives_no_winner(loaders):
    train, val = loaders  # lrs too small to move the loss: every rule finds the curve flat
    tuned = clr_mlflow.tune_bounds(make_model, make_optimizer, train, val, num_iters=20, start_lr=1e-9, end_lr=2e-9,
                                   steps=10, track=False, progress=False)
    assert tuned.rule == "" and np.isnan(tuned.metric) and (tuned.table["outcome"] == "no bounds").all()
    assert not tuned.range_test.bounds["selected"].any()
    with pytest.raises(ValueError, match=r"^no rule's bounds could be trained: min_div10: no bounds \(flat"):
        tuned.suggest()


def test_parent_and_a_child_per_candidate_in_the_store(tracking, loaders):
    train, val = loaders
    tuned = clr_mlflow.tune_bounds(make_model, make_optimizer, train, val, **ARGS)
    assert mlflow.active_run() is None  # made and ended by id: the caller's stack never saw a run
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["run_id"] == tuned.run_id].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == tuned.run_id]
    assert parent["tags.clr_mlflow.kind"] == "tune" and parent["status"] == "FINISHED"
    assert parent["tags.tune.rule"] == parent["tags.bounds_rule"] == tuned.rule
    assert parent["params.tune.policy"] == "one_cycle" and parent["params.tune.steps"] == "48"
    assert parent["metrics.tune/metric"] == tuned.metric and parent["metrics.bounds/max_lr"] == tuned.max_lr
    assert len(runs) == 1 + len(children) == 6 and (children["status"] == "FINISHED").all()
    assert (children["tags.clr_mlflow.kind"] == "train").all()

    table = tuned.table.set_index("rule")
    for _, child in children.iterrows():
        row = table.loc[child["tags.bounds_rule"]]
        assert child["run_id"] == row["run_id"] and child["metrics.tune/metric"] == row["metric"]
        assert float(child["params.max_lr"]) == pytest.approx(row["max_lr"], rel=1e-12)
        history = MlflowClient().get_metric_history(child["run_id"], "train/lr")
        assert len(history) == ARGS["steps"]
        val_acc = sorted(MlflowClient().get_metric_history(child["run_id"], "val/accuracy"), key=lambda m: m.step)
        assert val_acc[-1].step == ARGS["steps"] - 1 and val_acc[-1].value == row["metric"]
    logged = mlflow.load_table("tune/candidates.json", run_ids=[tuned.run_id])
    assert list(logged["rule"]) == list(table.index)  # as JSON: 10 significant digits
    np.testing.assert_allclose(logged["metric"], table["metric"], rtol=1e-9)
    bounds = mlflow.load_table("range_test/bounds.json", run_ids=[tuned.run_id])
    assert list(bounds.loc[bounds["selected"], "rule"]) == [tuned.rule]
    curve = MlflowClient().get_metric_history(tuned.run_id, "range_test/smoothed_loss")
    assert len(curve) == len(tuned.range_test.lrs)


def test_the_ray_path_picks_the_best_candidate_and_logs_parent_and_children(tracking, loaders):
    """use_ray=True: each candidate is a Ray Tune trial (a local Ray, started and shut down by
    tune_bounds). Its scores are the in-process path's (same seed, same data order), the winner
    is the best of them, and the store holds the same parent run and a child per candidate."""
    pytest.importorskip("ray.tune")
    train, val = loaders
    args = dict(rules=("valley", "loss_edge"), steps=16, num_iters=30, start_lr=1e-5, progress=False)
    # the factories as closures: Ray's workers get them by value, not by importing this test module
    build = lambda: nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))  # noqa: E731
    optimize = lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)  # noqa: E731
    tuned = clr_mlflow.tune_bounds(build, optimize, train, val, use_ray=True, max_concurrent=1, **args)
    local = clr_mlflow.tune_bounds(build, optimize, train, val, use_ray=False, track=False, **args)

    table, here = tuned.table.set_index("rule"), local.table.set_index("rule")
    assert list(table.index) == ["valley", "loss_edge"] and (table["outcome"] == "finished").all()
    assert table.loc["valley", "max_lr"] < table.loc["loss_edge", "max_lr"]  # two different candidates
    np.testing.assert_allclose(table[["base_lr", "max_lr"]], here[["base_lr", "max_lr"]], rtol=1e-12)
    # real accuracies, as the same training in this process scores them (within one of 256 samples:
    # a Ray worker may run torch with another thread count)
    assert table["metric"].between(0, 1).all()
    np.testing.assert_allclose(table["metric"], here["metric"], atol=1.5 / 256)
    assert tuned.metric == table["metric"].max() == table.loc[tuned.rule, "metric"]
    assert table["selected"].sum() == 1 and table["selected"][tuned.rule]
    assert tuned.suggest() == tuple(table.loc[tuned.rule, ["base_lr", "max_lr"]])

    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["run_id"] == tuned.run_id].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == tuned.run_id]
    assert parent["tags.clr_mlflow.kind"] == "tune" and parent["status"] == "FINISHED"
    assert parent["params.tune.ray"] == "True" and parent["tags.tune.rule"] == tuned.rule
    assert parent["metrics.tune/metric"] == tuned.metric
    assert len(runs) == 3 and len(children) == 2 and (children["status"] == "FINISHED").all()
    for _, child in children.iterrows():
        row = table.loc[child["tags.bounds_rule"]]
        assert child["run_id"] == row["run_id"] and child["metrics.tune/metric"] == row["metric"]
        assert float(child["params.max_lr"]) == pytest.approx(row["max_lr"], rel=1e-12)
    logged = mlflow.load_table("tune/candidates.json", run_ids=[tuned.run_id])
    assert list(logged["rule"]) == ["valley", "loss_edge"]
    np.testing.assert_allclose(logged["metric"], table["metric"], rtol=1e-9)

BAD = [
    (dict(make_model=3), "make_model"), (dict(make_optimizer=None), "make_optimizer"), (dict(loader=5), "loader"),
    (dict(val_loader=None), "val_loader"), (dict(rules=[]), "rules"), (dict(rules=["valley", "nope"]), "rules"),
    (dict(rules=["valley", "valley"]), "rules"), (dict(rules=["accuracy"]), "eval_every"),
    (dict(policy="cosine"), "policy"), (dict(steps=1), "steps"), (dict(steps=2.5), "steps"),
    (dict(metric_fn="acc"), "metric_fn"), (dict(seeds=0), "seeds"), (dict(seed=-1), "seed"),
    (dict(scheduler="hyperband"), "scheduler"), (dict(use_ray="yes"), "use_ray"),
    (dict(use_ray=False, scheduler="asha"), "scheduler"), (dict(cpus_per_trial=0), "cpus_per_trial"),
    (dict(max_concurrent=0), "max_concurrent"), (dict(make_model=lambda: "net"), "make_model"),
    (dict(make_optimizer=lambda m: None), "make_optimizer"), (dict(num_iters=5), "num_iters"),
    (dict(end_lr=1e-9), "end_lr"), (dict(track="yes"), "track"),
]


def test_bad_arguments_are_one_line_before_any_run(tracking, loaders):
    train, val = loaders
    before = torch.get_rng_state()
    for change, name in BAD:
        args = dict(make_model=make_model, make_optimizer=make_optimizer, loader=train, val_loader=val) | change
        with pytest.raises(ValueError) as e:
            clr_mlflow.tune_bounds(args.pop("make_model"), args.pop("make_optimizer"), args.pop("loader"),
                                   args.pop("val_loader"), **args)
        message = str(e.value)
        assert "\n" not in message and name in message and message.startswith("Expected"), (change, message)
    assert mlflow.search_runs(search_all_experiments=True).empty and mlflow.active_run() is None
    assert torch.equal(torch.get_rng_state(), before)


# --- the disagreement warning, on real range tests ---

def test_lr_find_warns_when_the_chosen_max_lr_is_far_above_valleys(caplog):
    torch.manual_seed(0)
    loader = DataLoader(dataset(1024, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    model = make_model()
    optimizer = make_optimizer(model)
    args = dict(num_iters=100, start_lr=1e-5, track=False, progress=False)
    with caplog.at_level(logging.WARNING, logger="clr_mlflow"):
        edge = clr_mlflow.lr_find(model, optimizer, loader, bounds_rule="loss_edge", **args)
    rows = edge.bounds.set_index("rule")
    ratio = rows.loc["loss_edge", "max_lr"] / rows.loc["valley", "max_lr"]
    assert ratio > DISAGREE  # on this curve loss_edge's max_lr is more than 30x valley's
    warned = [r for r in caplog.records if r.name == "clr_mlflow.api.finder"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    text = warned[0].getMessage()
    assert text.startswith("lr_find: disagrees with valley: loss_edge max_lr") and f"{ratio:.0f}x valley's" in text
    assert rows.loc["loss_edge", "note"] == f"base_lr = max_lr/4; {text.removeprefix('lr_find: ')}"
    assert "valley" not in rows.loc["min_div10", "note"] and disagreement(edge.bounds) == text.removeprefix("lr_find: ")

    # the same curve (model and data restored) with rules that agree with valley: no warning, no note
    caplog.clear()
    for rule in ("min_div10", "valley"):
        with caplog.at_level(logging.WARNING, logger="clr_mlflow"):
            other = clr_mlflow.lr_find(model, optimizer, loader, bounds_rule=rule, **args)
        np.testing.assert_array_equal(other.smoothed, edge.smoothed)
        low = other.bounds.set_index("rule")
        assert low.loc[rule, "max_lr"] <= DISAGREE * low.loc["valley", "max_lr"]
        assert "valley:" not in low.loc[rule, "note"] and disagreement(other.bounds) is None
    assert not [r for r in caplog.records if r.name == "clr_mlflow.api.finder"]


def test_over_seeds_the_note_reads_the_median_bounds(caplog):
    torch.manual_seed(0)
    loader = DataLoader(dataset(1024, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="clr_mlflow"):
        result = clr_mlflow.lr_find(model, make_optimizer(model), loader, num_iters=100, start_lr=1e-5, seeds=3,
                                    bounds_rule="loss_edge", track=False, progress=False)
    rows = result.bounds.set_index("rule")
    ratio = rows.loc["loss_edge", "max_lr"] / rows.loc["valley", "max_lr"]  # of the medians over 3 seeds
    noted = "disagrees with valley" in rows.loc["loss_edge", "note"]
    assert noted == (ratio > DISAGREE) == bool([r for r in caplog.records if r.name == "clr_mlflow.api.finder"])
    assert sum("disagrees with valley" in n for n in rows["note"]) == int(noted)  # only the selected row, once
    if noted:
        assert f"{ratio:.0f}x valley's" in rows.loc["loss_edge", "note"]


# --- the CLI: bounds_rule=tuned ---

def colour_folder(root: Path, per_class=(24, 6), size=12) -> Path:
    """An ImageFolder tree a small CNN can learn: class k's images lean to colour channel k."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k, c in enumerate("abc"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 240, (size, size, 3))
                img[..., k] += 12
                Image.fromarray(img.astype(np.uint8)).save(root / split / c / f"{i:03d}.png")
    return root


def test_cli_bounds_rule_tuned_trains_with_the_winner(tracking, tmp_path):
    root = colour_folder(tmp_path / "imgs")
    base = dict(data=str(root), data_dir=str(tmp_path / "cache"), image_size=16, batch_size=8, val_fraction=0.25,
                device="cpu", lr_start=1e-4, lr_end=10.0, num_iters=30, save_model=False, system_metrics=False,
                experiment="tuned", policy="one_cycle")
    # training as long as each candidate: the run's training is the winner's candidate, step for step
    out = execute(Config(**base, bounds_rule="tuned", tune_steps=12, iterations=12), "run")
    table = out.tuned.table.set_index("rule")
    assert list(table.index) == ["min_div10", "steepest", "loss_edge", "valley", "slide"]
    winner = out.tuned.rule
    assert table["selected"][winner] and table.loc[winner, "metric"] == table["metric"].max()
    assert table["metric"].nunique() >= 3  # the candidates trained differently
    ties = table.index[table["metric"] == table["metric"].max()]
    assert winner == ties[0]  # of equal scores, the first rule
    assert out.bounds == (table.loc[winner, "base_lr"], table.loc[winner, "max_lr"], winner)

    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.data.params["bounds_rule"] == "tuned" and run.data.params["tune_steps"] == "12"
    assert run.data.params["effective.bounds_rule"] == winner and run.data.tags["bounds_rule"] == winner
    assert run.data.metrics["bounds/max_lr"] == table.loc[winner, "max_lr"]
    assert run.data.metrics["tune/metric"] == table.loc[winner, "metric"]
    assert run.data.params["effective.max_lr"] == str(table.loc[winner, "max_lr"])
    runs = mlflow.search_runs(experiment_names=["tuned"])
    children = runs[runs["tags.mlflow.parentRunId"] == out.run_id]
    assert len(runs) == 1 + len(children) and set(children["tags.bounds_rule"]) <= set(table.index)
    assert set(children["run_id"]) == set(table["run_id"].dropna())
    bounds = mlflow.load_table("range_test/bounds.json", run_ids=[out.run_id])
    assert list(bounds.loc[bounds["selected"], "rule"]) == [winner]

    def accuracy(run_id):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "val/accuracy"),
                                                   key=lambda m: m.step)]
    assert accuracy(out.run_id) == accuracy(table.loc[winner, "run_id"])  # the same start, the same training
    assert accuracy(out.run_id)[-1][1] == table.loc[winner, "metric"]


def test_cli_tuned_needs_the_run_command():
    with pytest.raises(ConfigError, match="^Expected bounds_rule .* but got 'tuned'$"):
        execute(Config(bounds_rule="tuned", device="cpu"), "range-test")
    with pytest.raises(ConfigError, match="^Expected integer >= 2 for tune_steps, but got 1$"):
        execute(Config(bounds_rule="tuned", tune_steps=1, device="cpu"), "run")
