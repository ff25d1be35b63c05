#!/usr/bin/env bash
# The GPU half of issue 6's benchmark (bf16 train step and MFU on one H100/H200),
# prepared for the workplace's `device` tool: one call, no network there.
#
# Here, once (downloads what the device image lacks, for its Python 3.12, into the
# git-ignored .whl/):
#   bench/gpu.sh --fetch
# There (device tool):  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# The device image brings jax/jaxlib with CUDA, flax, optax, orbax and numpy at its own
# versions (not requirements.lock's); the script prints them first. Each row is JSON, in
# $OUT (or ./gpu_bench without the device tool) and on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks, at requirements.lock's pins (promise is an sdist only).
NAMES="array_record dm-tree docstring_parser grain immutabledict jaxopt ml_collections ott-jax
       portpicker tensorboardX tensorflow-datasets tensorflow-metadata termcolor toml"

pin() { grep -m1 "^$1==" requirements.lock || { echo "$1: not in requirements.lock" >&2; exit 1; }; }

if [[ "${1:-}" == "--fetch" ]]; then
  pins=$(for n in $NAMES; do pin "$n"; done) && promise=$(pin promise) || exit 1
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins || exit 1
  python3 -m pip wheel -q --no-deps -w .whl "$promise" || exit 1
  du -sh .whl
  exit 0
fi

OUT="${OUT:-gpu_bench}"
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import jax, flax, optax, numpy; print({'jax': jax.__version__, 'flax': flax.__version__,
'optax': optax.__version__, 'numpy': numpy.__version__, 'devices': jax.devices()})" \
  | tee "$OUT/versions.txt" || exit 1

# bench/model_step.py reports mfu = achieved FLOP/s / the chip's bf16 spec peak on GPUs.
run() {   # name, seconds, model_step args
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m bench.model_step --sizes base --dtype bfloat16 "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "$name rc=$? $(tail -n 1 "$OUT/$name.json")"
}
run step_32x128 200 --batch 32 --length 128 --steps 5 --solver jax
run step_8x256 150 --batch 8 --length 256 --steps 5 --solver jax
run step_32x128_ott 150 --batch 32 --length 128 --steps 5 --solver ott
