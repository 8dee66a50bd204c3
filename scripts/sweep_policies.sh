#!/usr/bin/env bash
# One range test, then one training per policy on the bounds it chose (bounds_from), all
# through `mlflow run` into one new experiment, then `clr-mlflow compare` on it.
#
#   scripts/sweep_policies.sh [-P key=value ...]        # parameters every run takes
#
# Environment:
#   EXPERIMENT   experiment name (default: clr_sweep_<date>_<time>)
#   POLICIES     policies to train (default: fixed triangular triangular2 exp_range one_cycle)
#   RANGE_ARGS   extra range-test-only parameters, e.g. "-P num_iters=200 -P eval_every=10"
#   TRAIN_ARGS   extra training-only parameters, e.g. "-P cycles=3 -P step_epochs=2"
#   PRESET       e.g. smith2017_cifar10: no range test, each training takes the preset's
#                bounds and its Table 1 iteration count for the policy
#   JOBS         trainings run at once (default 1; they share the CPU cores / the GPU)
#   MLFLOW_TRACKING_URI  default sqlite:///mlflow.db
#
# Examples:
#   RANGE_ARGS="-P num_iters=100" TRAIN_ARGS="-P step_epochs=2 -P cycles=1" \
#     scripts/sweep_policies.sh -P data=../shared/data/cifar10 -P limit_train=5000 -P limit_test=1000
#   PRESET=smith2017_cifar10 scripts/sweep_policies.sh -P data=../shared/data/cifar10
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
EXPERIMENT=${EXPERIMENT:-clr_sweep_$(date +%Y%m%d_%H%M%S)}
POLICIES=${POLICIES:-fixed triangular triangular2 exp_range one_cycle}
JOBS=${JOBS:-1}
read -r -a range_args <<< "${RANGE_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
common=("$@")

# Create the database and the experiment once: several processes creating a fresh SQLite
# store at the same moment crash.
python -c "import mlflow, sys; mlflow.set_experiment(sys.argv[1])" "$EXPERIMENT" >/dev/null 2>&1
mlflow_run() { mlflow run . --env-manager local --experiment-name "$EXPERIMENT" "$@"; }

if [ -n "${PRESET:-}" ]; then
  bounds=(-P "preset=$PRESET")
  echo "== preset $PRESET: no range test"
else
  echo "== range test"
  mlflow_run -e range_test "${common[@]}" "${range_args[@]}"
  range_run=$(python - "$EXPERIMENT" <<'PY'
import sys, mlflow
runs = mlflow.search_runs(experiment_names=[sys.argv[1]], filter_string="tags.`mlflow.project.entryPoint` = 'range_test'",
                          order_by=["start_time DESC"], max_results=1)
print(runs["run_id"][0])
PY
)
  echo "== range test run $range_run"
  bounds=(-P "bounds_from=$range_run")
fi

export -f mlflow_run
export EXPERIMENT
printf '%s\n' $POLICIES | xargs -P "$JOBS" -I{} bash -c \
  'echo "== train {}"; mlflow_run -e train -P policy={} "$@"' _ "${bounds[@]}" "${common[@]}" "${train_args[@]}"

echo "== compare"
clr-mlflow compare --experiment "$EXPERIMENT"
