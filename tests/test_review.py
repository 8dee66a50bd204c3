"""compare, reproduce and the paper's preset, on real tiny runs in a real SQLite store."""
import io

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from clr_mlflow.core.compare import iters_to_target, leaderboard
from clr_mlflow.app.config import Config
from clr_mlflow.tracking.history import NoRuns
from clr_mlflow.app.presets import apply_preset
from clr_mlflow.app.review import compare_experiment, config_of_run, reproduce
from clr_mlflow.app.runner import execute
from tests.conftest import use_store

EXP = "review"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar):
    mp = pytest.MonkeyPatch()
    use_store(mp, tmp_path_factory.mktemp("review"))
    data_dir = tmp_path_factory.mktemp("review_data")
    base = dict(data=str(cifar), data_dir=str(data_dir), limit_train=640, limit_test=100, batch_size=32,
                image_size=16, device="cpu", experiment=EXP, save_model=False)
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
        assert row["best_val_accuracy"] == run.data.metrics["val/best_accuracy"]
        assert row["test_accuracy"] == run.data.metrics["test/accuracy"]
        assert (row["base_lr"], row["max_lr"]) == (0.02, 0.2)
        assert row["iterations"] == 20
        assert row["wall_seconds"] == pytest.approx(run.data.metrics["time/train_seconds"])
    # default target: the fixed run's final validation accuracy; it reaches it when it ends or earlier
    fixed_hist = sorted(client.get_metric_history(runs["fixed"].run_id, "val/accuracy"), key=lambda m: m.step)
    fixed_final = fixed_hist[-1].value
    assert result.target == fixed_final
    first = min(m.step for m in fixed_hist if m.value >= fixed_final)
    assert board.loc[runs["fixed"].run_id, "iters_to_target"] == first + 1
    assert np.isnan(board.loc[runs["range"].run_id, "best_val_accuracy"])
    assert board.loc[runs["range"].run_id, "max_lr"] == runs["range"].bounds[1]
    assert board.loc[runs["range"].run_id, "wall_seconds"] == pytest.approx(runs["range"].range_test_seconds)
    assert "FAILED" in set(board["status"])
    best = list(result.board["best_val_accuracy"].dropna())
    assert best == sorted(best, reverse=True)
    top = result.board.iloc[0]
    assert result.verdict.startswith(f"best: {top['policy']} (run {top['run_name']} {top['run_id'][:8]}) at "
                                     f"{top['best_val_accuracy']:.4f} validation accuracy (test {top['test_accuracy']:.4f})")


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
    assert np.isnan(target) and pd.isna(board["iters_to_target"][0])
    assert board["best_val_accuracy"][0] == 0.5  # runs from before the validation split: test/best_accuracy


def test_reproduce_gives_an_identical_range_test_curve_on_cpu(runs):
    rep = reproduce(runs["range"].run_id)
    assert rep.curve_identical is True, rep.curve_note
    new = MlflowClient().get_run(rep.outcome.run_id)
    assert new.data.tags["clr_mlflow.reproduces"] == runs["range"].run_id
    assert not [w for w in rep.warnings if "dataset" in w]
    row = rep.metrics.set_index("metric").loc["bounds/max_lr"]
    assert row["difference"] == 0


def test_config_of_run_reads_mlflow_run_quoting():
    params = {"bounds_from": "''", "lr_end": "10", "augment": "True", "batch_size": "64",
              "data": "'/a path/with space'"}
    cfg = config_of_run(params, "exp", shell_quoted=True)
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
    cfg = Config(preset="smith2017_cifar10", data=str(cifar), limit_train=300, limit_test=100, val_fraction=0, policy="exp_range",
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


# ---- issue 13 -------------------------------------------------------------------------------

import shlex  # noqa: E402

import pandas as pd  # noqa: E402

from clr_mlflow.core import plots  # noqa: E402
from clr_mlflow.core.compare import NOT_REACHED, display_board  # noqa: E402
from clr_mlflow.app.review import config_values  # noqa: E402

AWKWARD = ["/data/my images", "/data/bob's", r"C:\data\imgs", "/d/a \"quoted\" $HOME `x` \\ end", ""]


@pytest.mark.parametrize("value", AWKWARD)
def test_params_are_read_as_their_origin_logged_them(value):
    # clr-mlflow logs str(value); `mlflow run` logs shlex.quote(value) (MLflow's _sanitize_value_dict)
    assert config_values({"data": value})["data"] == value
    assert config_values({"data": shlex.quote(value)}, shell_quoted=True)["data"] == value


@pytest.mark.parametrize("text,expected", [("on", True), ("t", True), ("y", True), ("yes", True), ("1", True),
                                           ("True", True), ("off", False), ("f", False), ("n", False),
                                           ("0", False), ("False", False)])
def test_bools_parse_as_click_parsed_them(text, expected):
    assert config_values({"augment": text})["augment"] is expected
    assert config_values({"augment": shlex.quote(text)}, shell_quoted=True)["augment"] is expected


def test_unparseable_params_name_the_param():
    from clr_mlflow.app.config import ConfigError

    with pytest.raises(ConfigError, match="augment"):
        config_values({"augment": "maybe"})
    with pytest.raises(ConfigError, match="batch_size"):
        config_values({"batch_size": "12.5"})
    with pytest.raises(ConfigError, match="data"):
        config_values({"data": "'unterminated"}, shell_quoted=True)


def test_reproduce_a_run_whose_data_path_has_spaces_quotes_and_backslashes(runs, cifar, tmp_path):
    weird = tmp_path / "my data's \\dir"
    weird.symlink_to(cifar, target_is_directory=True)
    cfg = Config(data=str(weird), data_dir=str(tmp_path / "cache"), limit_train=640, limit_test=64, batch_size=32,
                 device="cpu", experiment="awkward", num_iters=12, lr_start=1e-4, lr_end=1.0, augment=False)
    first = execute(cfg, "range-test")
    assert MlflowClient().get_run(first.run_id).data.params["data"] == str(weird)
    rep = reproduce(first.run_id)
    new = MlflowClient().get_run(rep.outcome.run_id)
    assert new.data.params["data"] == str(weird) and new.data.params["augment"] == "False"
    assert rep.curves["range-test"] == (True, "range-test curve identical (12 iterations)")


def test_reproduce_compares_the_full_range_curve_not_the_thinned_metric(runs, cifar, tmp_path):
    cfg = Config(data=str(cifar), data_dir=str(tmp_path), limit_train=640, limit_test=64, batch_size=32,
                 device="cpu", experiment="thin", num_iters=60, lr_start=1e-4, lr_end=1.0, log_every=5)
    first = execute(cfg, "range-test")
    assert len(MlflowClient().get_metric_history(first.run_id, "range_test/loss")) == 12  # 60 / log_every
    rep = reproduce(first.run_id)
    assert rep.curve_identical is True
    assert rep.curve_note == "range-test curve identical (60 iterations)"
    assert "training" not in rep.curves


def test_reproduce_a_training_run_compares_its_training_curve_and_names_the_copy(runs):
    original = MlflowClient().get_run(runs["triangular"].run_id)
    rep = reproduce(runs["triangular"].run_id)
    assert rep.curves == {"training": (True, "training curve identical (20 iterations)")}
    assert rep.curve_identical is True
    new = MlflowClient().get_run(rep.outcome.run_id)
    assert new.data.tags["mlflow.runName"] == original.data.tags["mlflow.runName"] + " (reproduction)"
    assert new.data.tags["clr_mlflow.reproduces"] == runs["triangular"].run_id


def test_a_differing_training_curve_names_its_first_differing_iteration(runs):
    from clr_mlflow.tracking import history
    from clr_mlflow.app.review import _same_curve

    a, b = runs["fixed"].run_id, runs["triangular"].run_id
    ca, cb = history.train_curve(a), history.train_curve(b)
    assert len(ca) == len(cb) == 20
    differs = np.flatnonzero((ca[["lr", "loss", "smoothed_loss"]] != cb[["lr", "loss", "smoothed_loss"]]).any(axis=1))
    first = int(differs[0])
    assert first >= 1  # same seed, weights and lr at iteration 0
    identical, note = _same_curve(a, b, "training", history.TRAIN_CURVE, "train/loss")
    assert identical is False
    assert note.startswith(f"training curve differs: first at iteration {first} (")


def test_compare_reads_artifacts_without_progress_bars(runs, capfd):
    capfd.readouterr()
    result = compare_experiment(EXP, log_run=False)
    out, err = capfd.readouterr()
    assert "Downloading artifacts" not in out + err
    # the artifacts were read all the same: the range test's bounds table and curve
    assert result.board.set_index("run_id").loc[runs["range"].run_id, "max_lr"] == runs["range"].bounds[1]
    assert __import__("os").environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") is None  # restored


def test_leaderboard_counts_are_integers_and_unreached_targets_say_so(runs):
    result = compare_experiment(EXP, target=0.99)
    board = result.board.set_index("run_id")
    assert str(board["iterations"].dtype) == "Int64" and str(board["iters_to_target"].dtype) == "Int64"
    assert str(board["iterations"].dtype) == "Int64" and board.loc[runs["fixed"].run_id, "iterations"] == 20
    csv = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{result.run_id}/compare/leaderboard.csv")),
                      dtype=str, keep_default_na=False).set_index("run_id")
    assert csv.loc[runs["fixed"].run_id, "iterations"] == "20"
    assert csv.loc[runs["range"].run_id, "iterations"] == ""
    shown = display_board(result.board, result.target)
    shown = shown.set_index(result.board["run_id"])
    for policy in ("fixed", "triangular", "one_cycle"):
        assert shown.loc[runs[policy].run_id, "iters_to_target"] == NOT_REACHED
    assert shown.loc[runs["range"].run_id, "iters_to_target"] == ""  # not trained: blank, not "not reached"
    assert shown.loc[runs["fixed"].run_id, "iterations"] == "20"
    assert shown.loc[runs["range"].run_id, "best_val_accuracy"] == ""
    text = shown.to_string(index=False)
    assert "NaN" not in text and "<NA>" not in text and "None" not in text and "20.0" not in text


def test_compare_plots_label_runs_by_name_and_show_the_bands(runs):
    client = MlflowClient()
    names = {r.run_id: client.get_run(r.run_id).data.tags["mlflow.runName"] for r in runs.values()}
    from clr_mlflow.tracking import history

    rid = runs["range"].run_id
    curve = history.range_curve(rid)
    chosen = history.bounds_tables(client.get_run(rid).info.experiment_id, [rid])
    chosen = chosen[chosen["selected"].astype(bool)]
    fig = plots.compare_range_tests_figure({rid: curve}, chosen, names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [names[rid]]
    (band,) = [p for p in ax.patches]
    assert band.get_alpha() == pytest.approx(0.25)
    assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx(
        (chosen["base_lr"].iloc[0], chosen["max_lr"].iloc[0]))
    series = pd.concat([history.metric_series(runs[p].run_id, "val/accuracy").assign(run=runs[p].run_id, policy=p)
                        for p in ("fixed", "triangular")])
    labels = [t.get_text() for t in plots.compare_accuracy_figure(series, names).axes[0].get_legend().get_texts()]
    assert labels == [f"{names[runs['fixed'].run_id]} (fixed)", f"{names[runs['triangular'].run_id]} (triangular)"]
    ticks = [t.get_text() for t in plots.compare_bounds_figure(history.bounds_tables(
        client.get_run(rid).info.experiment_id, [rid]), names).axes[0].get_yticklabels()]
    assert ticks == [names[rid]]


def test_rule_styles_are_distinct_and_never_a_data_colour():
    from matplotlib.colors import to_rgb

    rules = ["min_div10", "steepest", "loss_edge", "accuracy", "valley", "slide", "some_future_rule"]
    styles = plots.rule_styles(rules)
    assert set(styles) == set(rules) and len(set(styles.values())) == len(rules)
    assert len({to_rgb(c) for c, _ in styles.values()}) >= 5
    data = [to_rgb(plots.LOSS_COLOR), to_rgb(plots.ACCURACY_COLOR)]
    for rule, (color, dash) in styles.items():
        assert all(np.abs(np.subtract(to_rgb(color), d)).sum() > 0.3 for d in data), rule
        assert dash not in ("-", "solid") and isinstance(dash, tuple), rule
    # a rule keeps its style whatever other rules are in the table
    assert plots.rule_styles(["slide"])["slide"] == styles["slide"]


def test_range_test_plot_marks_every_rule_and_keeps_raw_loss_in_view(runs):
    from matplotlib.colors import to_rgb

    from clr_mlflow.tracking import history

    rid = runs["range"].run_id
    curve = history.range_curve(rid)
    table = history.bounds_tables(MlflowClient().get_run(rid).info.experiment_id, [rid]).drop(columns="run_id")
    lrs = curve["lr"].to_numpy()
    # a rule this code has never heard of gets a style of its own too
    extra = pd.DataFrame({"rule": ["future_rule"], "base_lr": [lrs[4]], "max_lr": [lrs[14]],
                          "selected": [False], "note": [""]})
    table = pd.concat([table, extra], ignore_index=True)
    assert {"min_div10", "steepest", "loss_edge", "accuracy"} <= set(table["rule"])
    table.loc[table["rule"] == "accuracy", ["base_lr", "max_lr", "note"]] = [lrs[5], lrs[15], ""]
    fig = plots.range_test_figure(curve, table)
    ax = fig.axes[0]
    styles = plots.rule_styles(list(table["rule"]))
    lines = {ln.get_label(): ln for ln in ax.lines}
    for row in table.itertuples():
        if np.isfinite(row.max_lr):
            line = lines[f"{row.rule}: max_lr {row.max_lr:.3g}"]
            assert line.get_xdata()[0] == pytest.approx(row.max_lr, rel=1e-9)
            assert to_rgb(line.get_color()) == to_rgb(styles[row.rule][0])
    base = lines[f"accuracy: base_lr {lrs[5]:.3g}"]
    assert base.get_xdata()[0] == pytest.approx(lrs[5], rel=1e-9)
    assert len({(to_rgb(ln.get_color()), str(ln.get_linestyle())) for ln in ax.lines if ": max_lr" in ln.get_label()}) \
        == int(np.isfinite(table["max_lr"]).sum())
    # every raw loss up to the largest marked lr is inside the view
    marked = max(v for v in table["max_lr"] if np.isfinite(v))
    raw = curve.loc[curve["lr"] <= marked, "loss"]
    lo, hi = ax.get_ylim()
    assert lo < raw.min() and raw.max() < hi
    smoothed = curve["smoothed_loss"]
    assert lo <= smoothed.min()


def test_training_plot_titles_name_policy_and_bounds():
    lrs = np.linspace(0.01, 0.1, 20)
    assert plots.schedule_figure(lrs, 10, policy="triangular2", bounds=(0.01, 0.1)).axes[0].get_title() == \
        "Learning-rate schedule: triangular2, lr 0.01 - 0.1"
    assert plots.schedule_figure(lrs, 10).axes[0].get_title() == "Learning-rate schedule"
    epochs = pd.DataFrame({"step": [9, 19], "train_loss": [2.0, 1.5], "val_loss": [2.1, 1.7],
                           "train_accuracy": [0.2, 0.4], "val_accuracy": [0.25, 0.35]})
    fig = plots.training_figure(epochs, lrs, policy="one_cycle", bounds=(0.004, 0.4))
    assert fig._suptitle.get_text() == "Training: one_cycle, lr 0.004 - 0.4"
