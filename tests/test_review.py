"""compare, reproduce and the paper's preset, on real tiny runs in a real SQLite store."""
import io

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from clr_mlflow.compare import iters_to_target, leaderboard
from clr_mlflow.config import Config
from clr_mlflow.history import NoRuns
from clr_mlflow.presets import apply_preset
from clr_mlflow.review import compare_experiment, config_of_run, reproduce
from clr_mlflow.runner import execute
from tests.conftest import use_store

EXP = "review"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar):
    mp = pytest.MonkeyPatch()
    use_store(mp, tmp_path_factory.mktemp("review"))
    data_dir = tmp_path_factory.mktemp("review_data")
    base = dict(data=str(cifar), data_dir=str(data_dir), limit_train=320, limit_test=100, batch_size=64,
                device="cpu", experiment=EXP, save_model=False)
    out = {"range": execute(Config(**base, num_iters=30, lr_start=1e-4, lr_end=1.0), "range-test")}
    for policy in ("fixed", "triangular", "one_cycle"):
        out[policy] = execute(Config(**base, policy=policy, base_lr=0.02, max_lr=0.2, step_size=5, cycles=2), "train")
    with pytest.raises(RuntimeError):
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(EXP).experiment_id, run_name="broken"):
            raise RuntimeError("a run that failed")
    yield out
    mp.undo()


def test_iters_to_target_by_hand():
    # accuracy logged at the last iteration of each 5-iteration epoch: steps 4, 9, 14
    assert iters_to_target([4, 9, 14], [0.2, 0.5, 0.6], 0.5) == 10
    assert iters_to_target([4, 9, 14], [0.2, 0.5, 0.6], 0.55) == 15
    assert np.isnan(iters_to_target([4, 9, 14], [0.2, 0.5, 0.6], 0.7))


def test_leaderboard_equals_what_the_runs_logged(runs):
    result = compare_experiment(EXP)
    board = result.board.set_index("run_id")
    client = MlflowClient()
    assert len(board) == 5  # range test, 3 trainings, the failed run; not the comparison itself
    for policy in ("fixed", "triangular", "one_cycle"):
        run = client.get_run(runs[policy].run_id)
        row = board.loc[runs[policy].run_id]
        assert row["policy"] == policy and row["bounds_rule"] == "given"
        assert row["best_accuracy"] == run.data.metrics["test/best_accuracy"]
        assert row["final_accuracy"] == run.data.metrics["test/accuracy"]
        assert (row["base_lr"], row["max_lr"]) == (0.02, 0.2)
        assert row["iterations"] == 20
        assert row["wall_seconds"] == pytest.approx(run.data.metrics["time/train_seconds"])
    # default target: the fixed run's final accuracy; the fixed run reaches it when it ends or earlier
    fixed_final = board.loc[runs["fixed"].run_id, "final_accuracy"]
    assert result.target == fixed_final
    fixed_hist = [m for m in client.get_metric_history(runs["fixed"].run_id, "val/accuracy")]
    first = min(m.step for m in fixed_hist if m.value >= fixed_final)
    assert board.loc[runs["fixed"].run_id, "iters_to_target"] == first + 1
    assert np.isnan(board.loc[runs["range"].run_id, "best_accuracy"])
    assert board.loc[runs["range"].run_id, "max_lr"] == runs["range"].bounds[1]
    assert board.loc[runs["range"].run_id, "wall_seconds"] == pytest.approx(runs["range"].range_test_seconds)
    assert "FAILED" in set(board["status"])
    assert list(result.board["best_accuracy"].dropna()) == sorted(result.board["best_accuracy"].dropna(), reverse=True)


def test_comparison_run_holds_table_and_plots_and_is_skipped_next_time(runs):
    first = compare_experiment(EXP, target=0.2)
    client = MlflowClient()
    run = client.get_run(first.run_id)
    assert run.data.tags["clr_mlflow.kind"] == "compare"
    for name in ("accuracy", "lr", "range_tests", "bounds"):
        raw = open(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path=f"compare/{name}.png"), "rb").read()
        Image.open(io.BytesIO(raw)).verify()
    table = mlflow.artifacts.load_dict(f"runs:/{first.run_id}/compare/leaderboard.json")
    assert len(table["data"]) == 5
    again = compare_experiment(EXP, log_run=False)
    assert len(again.board) == 5 and again.run_id is None


def test_missing_and_empty_experiments_are_a_clear_message(runs):
    with pytest.raises(NoRuns, match="no experiment named"):
        compare_experiment("does_not_exist")
    mlflow.create_experiment("empty")
    with pytest.raises(NoRuns, match="has no runs"):
        compare_experiment("empty")


def test_leaderboard_without_fixed_run_has_no_target():
    import pandas as pd

    runs = pd.DataFrame({"run_id": ["a"], "status": ["FINISHED"], "params.policy": ["triangular"],
                         "metrics.test/best_accuracy": [0.5], "metrics.test/accuracy": [0.4]})
    board, target = leaderboard(runs, {"a": pd.DataFrame({"step": [9], "value": [0.5]})})
    assert np.isnan(target) and np.isnan(board["iters_to_target"][0])


def test_reproduce_gives_an_identical_range_test_curve_on_cpu(runs):
    rep = reproduce(runs["range"].run_id)
    assert rep.curve_identical is True, rep.curve_note
    new = MlflowClient().get_run(rep.outcome.run_id)
    assert new.data.tags["clr_mlflow.reproduces"] == runs["range"].run_id
    assert not [w for w in rep.warnings if "dataset" in w]
    row = rep.metrics.set_index("metric").loc["bounds/max_lr"]
    assert row["difference"] == 0


def test_config_of_run_reads_mlflow_run_quoting():
    params = {"run_name": "''", "bounds_from": "''", "lr_end": "10", "augment": "True", "batch_size": "64",
              "data": "'/a path/with space'"}
    cfg = config_of_run(params, "exp")
    assert (cfg.run_name, cfg.bounds_from, cfg.lr_end, cfg.augment, cfg.batch_size) == ("", "", 10.0, True, 64)
    assert cfg.data == "/a path/with space" and cfg.experiment == "exp"


def test_preset_fills_defaults_and_explicit_values_win():
    cfg, changed = apply_preset(Config(preset="smith2017_cifar10", policy="exp_range", batch_size=50))
    assert (cfg.model, cfg.base_lr, cfg.max_lr, cfg.step_size, cfg.gamma) == ("smith_cifar", 0.001, 0.006, 2000, 0.99994)
    assert cfg.batch_size == 50 and "batch_size" not in changed
    assert cfg.iterations == 42_000
    assert apply_preset(Config(preset="smith2017_cifar10", policy="fixed"))[0].iterations == 70_000
    assert apply_preset(Config(preset="smith2017_cifar10", policy="triangular2"))[0].iterations == 25_000
    assert apply_preset(Config(preset="smith2017_cifar10", iterations=10))[0].iterations == 10


def test_scaled_down_paper_experiment(runs, cifar):
    cfg = Config(preset="smith2017_cifar10", data=str(cifar), limit_train=300, limit_test=100, policy="exp_range",
                 iterations=6, step_size=3, device="cpu", experiment="paper", save_model=False)
    out = execute(cfg, "run")
    assert out.range_test is None and out.bounds[:2] == (0.001, 0.006)
    run = MlflowClient().get_run(out.run_id)
    p = run.data.params
    assert p["preset"] == "smith2017_cifar10" and p["bounds_source"] == "preset:smith2017_cifar10"
    assert p["effective.model"] == "smith_cifar" and p["effective.batch_size"] == "100" and p["iters_per_epoch"] == "3"
    lrs = [m.value for m in sorted(MlflowClient().get_metric_history(out.run_id, "train/lr"), key=lambda m: m.step)]
    expected = [0.001 + 0.005 * max(0, 1 - abs(t / 3 - 2 * np.floor(1 + t / 6) + 1)) * 0.99994**t for t in range(6)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
