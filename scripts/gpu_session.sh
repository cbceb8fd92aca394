#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a device (15 minutes of device time in all):
# environment, the full test suite on the GPU (bf16 and the `gpu`-marked tests included), then the
# full benchmark run. Everything lands under $OUT in at most 6 files (the device tool returns 8).
#
#   device run:  bash scripts/gpu_session.sh            (timeout_s 600)
#   knobs:       TEST_S=200 BENCH_S=270 ONLY=attention bash scripts/gpu_session.sh
#
# Then, here: unpack $OUT/results.tgz into benchmarks/results/, commit the JSON/MD/PNG, and run
# `python -m benchmarks.report --latest --readme README.md` to refresh the README's table.
set -u
OUT=${OUT:-/tmp/dasg-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
TEST_S=${TEST_S:-200}
BENCH_S=${BENCH_S:-270}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import transformers; print('transformers', transformers.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The tests: compile-bound on a fresh machine, so spread them over the CPU cores when xdist is there.
par=""
python3 -c "import xdist" 2>/dev/null && par="-n 8"
echo "== tests (limit ${TEST_S}s) =="
timeout "$TEST_S" python3 -m pytest -q $par -p no:cacheprovider tests \
  --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
echo "pytest exit: $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -25

echo "== benchmarks (budget ${BENCH_S}s) =="
only=""
[ -n "${ONLY:-}" ] && only="--only $ONLY"
timeout $((BENCH_S + 150)) python3 -m benchmarks --time-budget "$BENCH_S" $only --no-progress \
  --out "$OUT/results" >"$OUT/bench.log" 2>&1
echo "benchmarks exit: $?"
tail -40 "$OUT/bench.log"
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
ls -la "$OUT"
