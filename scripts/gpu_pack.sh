#!/usr/bin/env bash
# Packs, into .gpu/ (git-ignored), what a GPU machine with no network needs to run the CUDA
# benchmark rows with scripts/gpu_bench.sh: CIFAR-10 as an xz tarball of the ImageFolder
# JPEGs (~19 MB: the JPEG headers the 60,000 files share compress away) and the wheels of
# MLflow and of the packages it imports that the machine's image lacks (~32 MB), for
# CPython 3.12 on x86-64. Together they stay under the device tool's 64 MiB per call.
#
#   bash scripts/gpu_pack.sh [path/to/cifar10]     # default: ../shared/data/cifar10
#
# The wheel list was found by importing and running clr_mlflow (range test, training, every
# MLflow call it makes) against only the packages the device image lists
# (/work/.library/device/KINDS.md) plus these wheels; pins are the versions tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "${1:-../shared/data/cifar10}" && pwd)
WHEELS=(
  mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2
  sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1
  cachetools==7.3.3 python-dotenv==1.2.2 importlib-metadata==9.1.0
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  fastapi==0.165.0 starlette==1.10.0 databricks-sdk==0.162.0 google-auth==2.63.0
  cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
)
rm -rf .gpu && mkdir -p .gpu/wheels
tar -C "$(dirname "$DATA")" -cf - "$(basename "$DATA")" | xz -6 -T0 > .gpu/cifar10.tar.xz
platforms=()
for p in manylinux_2_34 manylinux_2_28 manylinux_2_17 manylinux2014; do platforms+=(--platform "${p}_x86_64"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .gpu/wheels "${WHEELS[@]}"
du -sh .gpu/cifar10.tar.xz .gpu/wheels && du -sh .gpu
