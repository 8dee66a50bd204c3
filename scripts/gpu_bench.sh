#!/usr/bin/env bash
# Runs the CUDA rows of scripts/bench.py (4g and 5a-5d) on a GPU machine without network,
# from the repo root, with .gpu/ made by scripts/gpu_pack.sh carried along. Through the
# device tool (one call, ~5 minutes on an H100):
#   run(command="bash scripts/gpu_bench.sh", carry=[".gpu"])
# then, here: cp <files_at>/BENCHMARKS.md docs/BENCHMARKS.md (the CPU rows and the notes are
# kept in it; only the rows measured there change).
# Extra arguments go to bench.py, e.g. `bash scripts/gpu_bench.sh --seeds 3 --fast anneal_frac=0.5`
# to try another recipe for row 5d (the CPU run of the default recipe reached 89%, docs/RESULTS.md).
set -euo pipefail
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT" /tmp/clr_site .gpu/data
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/clr_site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/clr_site:$PWD PYTHONUNBUFFERED=1
tar -C .gpu/data -xJf .gpu/cifar10.tar.xz
python3 -c "import torch, mlflow; print('torch', torch.__version__, torch.cuda.get_device_name(), 'mlflow', mlflow.__version__)"
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md"
python3 scripts/bench.py --only 4g,5 --data .gpu/data/cifar10 --out "$OUT/BENCHMARKS.md" "$@" 2>&1 | tee "$OUT/bench.log"
