#!/usr/bin/env bash
# One range test, then one training per policy on the bounds it chose, compared: a thin
# call of `clr-mlflow sweep` (Ray Tune trials, one MLflow parent run with the leaderboard)
# into a new experiment. The same by hand:
#
#   clr-mlflow sweep --experiment NAME --policies fixed,triangular,triangular2,exp_range,one_cycle [--option value ...]
#
#   scripts/sweep_policies.sh [--option value | -P key=value ...]   # parameters of every run
#
# Environment (all optional):
#   EXPERIMENT   experiment name (default: clr_sweep_<date>_<time>)
#   POLICIES     policies to train (default: fixed triangular triangular2 exp_range one_cycle)
#   RANGE_ARGS   more parameters, e.g. "-P num_iters=200 -P eval_every=10" (each option only
#   TRAIN_ARGS   reaches the runs it belongs to, so both simply join the arguments)
#   PRESET       e.g. smith2017_cifar10: no range test, each training takes the preset's
#                bounds and its Table 1 iteration count for the policy
#   JOBS         trials at once (default: one per CPU core)
#   MLFLOW_TRACKING_URI  default sqlite:///mlflow.db
#
# `-P key=value` (the `mlflow run` form this script took before) is read as `--key value`;
# bounds_rule, seed and policy become the sweep's --bounds-rules, --seeds and --policies.
#
# Examples:
#   RANGE_ARGS="-P num_iters=100" TRAIN_ARGS="-P step_epochs=2 -P cycles=1" \
#     scripts/sweep_policies.sh -P data=../shared/data/cifar10 -P limit_train=5000 -P limit_test=1000
#   PRESET=smith2017_cifar10 scripts/sweep_policies.sh --data ../shared/data/cifar10
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
POLICIES=${POLICIES:-fixed triangular triangular2 exp_range one_cycle}
read -r -a extra <<< "${RANGE_ARGS:-} ${TRAIN_ARGS:-}"

args=(--experiment "${EXPERIMENT:-clr_sweep_$(date +%Y%m%d_%H%M%S)}" --policies "$(echo $POLICIES | tr ' ' ,)")
[ -n "${PRESET:-}" ] && args+=(--preset "$PRESET")
[ -n "${JOBS:-}" ] && args+=(--max-concurrent "$JOBS")
set -- "$@" "${extra[@]}"
while [ $# -gt 0 ]; do
  if [ "$1" = -P ]; then
    key=${2%%=*}
    case $key in bounds_rule) key=bounds_rules ;; seed) key=seeds ;; policy) key=policies ;; esac
    args+=("--${key//_/-}" "${2#*=}")
    shift 2
  else
    args+=("$1")
    shift
  fi
done
exec clr-mlflow sweep "${args[@]}"
