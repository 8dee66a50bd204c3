"""`RangeTestResult`: what one range test measured (and, once `with_bounds` ran, what each
rule reads from it), with its table, figure and suggestion. The loop that makes it is
range_test.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from clr_mlflow.core.bounds import RULES, bounds_frame, suggest_bounds
from clr_mlflow.core.checks import is_finite, need


@dataclass(frozen=True)
class RangeTestResult:
    """One range test: per optimizer step the lr (of param group 0), the raw and smoothed
    loss and each named loss term; held-out evaluations; and, once `with_bounds` has run,
    the bounds table.

    What `lr_find` returns (with the bounds table); frozen: `with_bounds` gives a new one.

    Attributes:
        lrs: The lr of param group 0 at every optimizer step of the curve.
        losses: The raw loss at every step.
        smoothed: The smoothed loss (debiased EMA) at every step.
        eval_steps: The steps after which held-out data was evaluated.
        accuracies: The accuracy there, or the user's `metric_fn`.
        val_losses: The held-out loss there; NaN where the evaluator gives no loss.
        planned_iters: The steps the sweep was planned for (`num_iters`).
        stop_reason: Why the test stopped: where it diverged, a loss that was not finite,
            or that it reached the last lr without diverging.
        terms: `loss/<name>` of a dict loss: each term at every step.
        skipped_steps: Steps a GradScaler skipped (inf/NaN gradients); not on the curve.
        sweep: `exp` or `linear`, as swept.
        bounds: The bounds table, one row per rule: rule, base_lr, max_lr, selected, note
            (from `lr_find` also max_lr_min, max_lr_max and seeds); None before
            `with_bounds`.
        bounds_rule: The selected rule.
        run_id: The MLflow run that holds the test; None when it was not tracked.
        seed: Which of several seeds' tests this is (0: the model as given).
        seed_results: Every seed's result, when there were several.

    Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, track=False, progress=False)
            >>> len(result.lrs) == len(result.losses) == len(result.smoothed) <= result.planned_iters
            True
            >>> result.bounds_rule, result.run_id
            ('steepest', None)
            >>> list(result.bounds["rule"])
            ['min_div10', 'steepest', 'loss_edge', 'accuracy', 'valley', 'slide']
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    eval_steps: np.ndarray   # steps after which held-out data was evaluated
    accuracies: np.ndarray   # accuracy, or the user's metric_fn
    val_losses: np.ndarray   # NaN where the evaluator gives no loss
    planned_iters: int
    stop_reason: str
    terms: dict[str, np.ndarray] = field(default_factory=dict)  # loss/<name> of a dict loss
    skipped_steps: int = 0   # steps a GradScaler skipped (inf/NaN gradients); not on the curve
    sweep: str = "exp"
    bounds: pd.DataFrame | None = None  # rule, base_lr, max_lr, selected, note
    bounds_rule: str = ""
    run_id: str | None = None
    seed: int = 0            # which of several seeds' tests this is (see seeds.py)
    seed_results: tuple["RangeTestResult", ...] = ()  # every seed's result, when there were several

    @property
    def eval_lrs(self) -> np.ndarray:
        """The lr (of param group 0) at each held-out evaluation: `lrs[eval_steps]`, one per
        entry of `accuracies` and `val_losses`.

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, val_loader=loader[:2],
            ...                  eval_every=10, track=False, progress=False)
            >>> result.eval_steps[:3].tolist()
            [9, 19, 29]
            >>> bool((result.eval_lrs == result.lrs[result.eval_steps]).all())
            True
            >>> len(result.eval_lrs) == len(result.accuracies) == len(result.val_losses)
            True
        """
        return self.lrs[self.eval_steps]

    def to_frame(self) -> pd.DataFrame:
        """One row per step: seed, iteration, lr, loss, smoothed_loss, `loss/<term>`...,
        accuracy and val_loss (NaN where not evaluated).

        Returns:
            A pandas DataFrame, one row per optimizer step of this result's curve.

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, track=False, progress=False)
            >>> frame = result.to_frame()
            >>> list(frame.columns)
            ['seed', 'iteration', 'lr', 'loss', 'smoothed_loss', 'accuracy', 'val_loss']
            >>> len(frame) == len(result.lrs)
            True
        """
        df = pd.DataFrame({"seed": self.seed, "iteration": np.arange(len(self.lrs)), "lr": self.lrs,
                           "loss": self.losses,
                           "smoothed_loss": self.smoothed} | {f"loss/{k}": v for k, v in self.terms.items()})
        df["accuracy"] = np.nan
        df["val_loss"] = np.nan
        df.loc[self.eval_steps, "accuracy"] = self.accuracies
        df.loc[self.eval_steps, "val_loss"] = self.val_losses
        return df

    def curves(self) -> pd.DataFrame:
        """`to_frame()` of every seed's test, one after another (the seed column tells them
        apart); this result's own frame when there was one seed.

        Returns:
            A pandas DataFrame with `to_frame()`'s columns (the run's `range_test/curve.csv`).

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, seeds=3, track=False,
            ...                  progress=False)
            >>> sorted(result.curves()["seed"].unique().tolist())
            [0, 1, 2]
        """
        return pd.concat([r.to_frame() for r in self.seed_results], ignore_index=True) if self.seed_results \
            else self.to_frame()

    def with_bounds(self, rule: str, divisor: float = 4.0) -> "RangeTestResult":
        """This result with the bounds table of every rule, `rule` marked as selected.

        Reads the same curve again, e.g. with another rule or divisor than `lr_find` used.

        Args:
            rule: The rule to mark as selected (`suggest()`'s default): one of `min_div10`,
                `steepest`, `loss_edge`, `accuracy`, `valley`, `slide`.
            divisor: The loss rules' base_lr is max_lr / `divisor`.

        Returns:
            A new RangeTestResult (this one is unchanged) with `bounds` and `bounds_rule`.

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, track=False, progress=False)
            >>> base_lr, max_lr = result.with_bounds("min_div10", divisor=10).suggest()
            >>> round(max_lr / base_lr, 6)
            10.0
            >>> result.bounds_rule
            'steepest'
        """
        need(rule in RULES, "rule", f"one of {', '.join(RULES)} for", rule)
        need(is_finite(divisor) and divisor > 1, "divisor", "finite value > 1 for", divisor)
        suggestions = suggest_bounds(self.lrs, self.smoothed, self.eval_lrs, self.accuracies, divisor)
        return dataclasses.replace(self, bounds=bounds_frame(suggestions, rule), bounds_rule=rule)

    def suggest(self, rule: str | None = None) -> tuple[float, float]:
        """(base_lr, max_lr) of `rule` (default: the selected rule); ValueError with the
        rule's note when it found none on this curve.

        Args:
            rule: A rule of the bounds table; None (default): the selected rule.

        Returns:
            `(base_lr, max_lr)` as floats, for `clr_scheduler`.

        Raises:
            ValueError: The rule found no bounds on this curve (with its note), the rule is
                not in the table, or the result has no bounds table (see `with_bounds`).

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, track=False, progress=False)
            >>> base_lr, max_lr = result.suggest()
            >>> 0 < base_lr < max_lr
            True
            >>> result.suggest("accuracy")   # no val_loader: accuracy was not measured
            Traceback (most recent call last):
            ...
            ValueError: rule accuracy gave no bounds on this curve: accuracy was not measured (eval_every=0)
        """
        if self.bounds is None:
            raise ValueError("Expected a result with bounds (see with_bounds), but this one has none")
        rule = rule or self.bounds_rule
        rows = self.bounds[self.bounds["rule"] == rule]
        if rows.empty:
            raise ValueError(f"Expected rule to be one of {', '.join(self.bounds['rule'])}, but got {rule!r}")
        row = rows.iloc[0]
        if not (np.isfinite(row["base_lr"]) and np.isfinite(row["max_lr"])):
            raise ValueError(f"rule {rule} gave no bounds on this curve: {row['note']}")
        return float(row["base_lr"]), float(row["max_lr"])

    def band(self) -> pd.DataFrame | None:
        """With several seeds: per step (every seed swept the same lrs) the lr and the median,
        min and max smoothed loss over the seeds that got that far; None with one seed.

        Returns:
            A pandas DataFrame with columns lr, median, low and high (one row per step of
                the longest seed's curve), or None with one seed.

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, seeds=3, track=False,
            ...                  progress=False)
            >>> band = result.band()
            >>> list(band.columns)
            ['lr', 'median', 'low', 'high']
            >>> bool((band["low"] <= band["median"]).all() and (band["median"] <= band["high"]).all())
            True
            >>> print(result.seed_results[0].band())
            None
        """
        if len(self.seed_results) < 2:
            return None
        n = max(len(r.lrs) for r in self.seed_results)
        stacked = np.full((len(self.seed_results), n), np.nan)
        for i, r in enumerate(self.seed_results):
            stacked[i, :len(r.smoothed)] = r.smoothed
        lrs = max(self.seed_results, key=lambda r: len(r.lrs)).lrs
        return pd.DataFrame({"lr": lrs, "median": np.nanmedian(stacked, 0), "low": np.nanmin(stacked, 0),
                             "high": np.nanmax(stacked, 0)})

    def plot(self, ax=None):
        """The range-test figure: loss and smoothed loss vs lr, the bounds of every rule; with
        several seeds the median curve, its min-max band and each rule's spread. The same
        picture as the run's `range_test/curve.png`.

        Args:
            ax (matplotlib.axes.Axes | None): a matplotlib Axes to draw into (a subplot of
                your own figure), as Lightning's `lr_finder.plot(ax=...)`; None draws a new
                figure.

        Returns:
            (matplotlib.figure.Figure): The `matplotlib.figure.Figure` drawn on (not shown,
                and not registered with pyplot: display it with `display(fig)` or save it
                with `fig.savefig(path)`). Neither pyplot's backend nor any rcParam is
                changed.

        Examples:
            >>> import torch
            >>> from clr_mlflow import lr_find
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> loader = [(x, x[:, :3].argmax(1)) for x in torch.randn(8, 16, 4)]
            >>> result = lr_find(model, optimizer, loader, end_lr=100, track=False, progress=False)
            >>> import os, tempfile
            >>> fig = result.plot()
            >>> path = os.path.join(tempfile.mkdtemp(), "range_test.png")
            >>> fig.savefig(path)
            >>> os.path.getsize(path) > 0
            True

            Into a subplot of your own figure:

            >>> from matplotlib.figure import Figure
            >>> mine = Figure()
            >>> result.plot(ax=mine.add_subplot(1, 2, 1)) is mine
            True
        """
        from clr_mlflow.core.plots import range_test_figure  # matplotlib loads when a figure is drawn

        need(ax is None or hasattr(ax, "get_figure"), "ax", "None or a matplotlib Axes as", type(ax).__name__)
        bounds = self.bounds if self.bounds is not None else pd.DataFrame(
            columns=["rule", "base_lr", "max_lr", "selected", "note"])
        return range_test_figure(self.to_frame(), bounds, log_x=self.sweep == "exp", band=self.band(),
                                 seeds=max(1, len(self.seed_results)), ax=ax)
