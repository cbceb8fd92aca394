#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a device (15 minutes of device time in all):
# environment, the full test suite on the GPU (bf16 and the `gpu`-marked tests included), then the
# full benchmark run. Everything lands under $OUT in at most 7 files (the device tool returns 8).
#
#   device run:  bash scripts/gpu_session.sh            (timeout_s 600)
#   knobs:       TEST_S=200 BENCH_S=270 ONLY=attention TEST_MARK="not slow" bash scripts/gpu_session.sh
#   families:    all of benchmarks.runner.FAMILIES unless ONLY is set (attention, varlen, moe, model,
#                generate; ONLY=attention,varlen takes several). A family gets its share of BENCH_S
#                (runner.BUDGET_SHARE) plus what the ones before it left. varlen's compiles (its
#                Triton kernels' autotuning, torch.compile of FlexAttention) will likely need more
#                than its share on a fresh machine: ONLY=varlen BENCH_S=150 gives it the whole
#                budget.
#   several GPUs: the EP/CP runs use what is left of 590 s (>= 40 s); with the defaults that is
#                nothing, so on a multi-GPU lend run BENCH_S=120 (leaves them about 100 s).
#
# Calibration peers: device run with carry [".peers"] (filled here by `python -m benchmarks.calibrate`);
# their measured TFLOP/s land in results/calibration-measured.{json,md} beside the predictions.
# Then, here: unpack $OUT/results.tgz into benchmarks/results/, commit the JSON/MD/PNG, and run
# `python -m benchmarks.report --latest --readme README.md` to refresh the README's table.
# Peers the device has no network to install (fla-core: the attention benchmarks' fla method;
# liger-kernel: a calibration peer) travel as pure-Python packages: fill .gl/peer-site here with
#   pip install --no-deps --target .gl/peer-site fla-core==0.6.0 einops liger-kernel==0.8.5
# (about 22 MB) and call the device tool with carry [".peers", ".gl/peer-site"].
set -u
OUT=${OUT:-/tmp/dasg-gpu-out}
mkdir -p "$OUT"
peer_site=""
[ -d .gl/peer-site ] && peer_site=":$PWD/.gl/peer-site"
export PYTHONPATH="$PWD$peer_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# no network there: never let transformers / huggingface_hub wait on the Hub
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
unset TRITON_INTERPRET
TEST_S=${TEST_S:-160}
BENCH_S=${BENCH_S:-190}
CONF_S=${CONF_S:-70}
CAL_S=${CAL_S:-60}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import transformers; print('transformers', transformers.__version__)"
  python3 -c "from importlib.metadata import version as v; print('fla-core', v('fla-core'), 'liger-kernel', v('liger-kernel'))"
  git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The tests: compile-bound on a fresh machine, so spread them over the CPU cores when xdist is there.
par=""
python3 -c "import xdist" 2>/dev/null && par="-n 8"
echo "== tests (limit ${TEST_S}s) =="
# `slow` marks only the CPU-only training run (torch backend, 30-90 s of CPU): CI runs it, the GPU
# session need not spend its test minutes on it. TEST_MARK="" runs everything.
TEST_MARK=${TEST_MARK-not slow}
# Correctness does not depend on the launch config: pin one per kernel (DASG_AUTOTUNE=0) so the
# tests compile once per shape instead of benchmarking every candidate; the tests about autotuning
# turn it back on themselves, and the benchmark below runs autotuned (checked before timing).
DASG_AUTOTUNE=0 timeout "$TEST_S" python3 -m pytest -q $par -p no:cacheprovider -m "$TEST_MARK" tests \
  --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
echo "pytest exit: $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -25

echo "== attention first configs and the forward's two schedules vs the predictions (limit ${CONF_S}s) =="
# the attention kernels' first configs and the forward's pipelined / unpipelined schedules, measured
# beside the offline compile report's predictions: where the pipelined softmax lands between its
# bounds is the calibration point the model lacks (benchmarks/bench_configs.py, bench-configs.md)
timeout "$CONF_S" python3 -m benchmarks.bench_configs --out "$OUT/results" >"$OUT/configs.log" 2>&1
echo "bench_configs exit: $?"; tail -12 "$OUT/configs.log"

echo "== calibration peers measured (limit ${CAL_S}s) =="
# the compile report's model was fitted on published H100 figures of these peers
# (benchmarks/results/calibration.md); timing them here gives published vs predicted vs measured
# side by side, to re-fit the model. Their sources are read from .peers/ (ignored by git): call the
# device tool with carry [".peers"] after `python -m benchmarks.calibrate` has filled it here.
timeout "$CAL_S" python3 -m benchmarks.calibrate --measure --budget-s $((CAL_S - 20)) --out "$OUT/results" \
  >"$OUT/calibration.log" 2>&1
echo "calibrate --measure exit: $?"; tail -8 "$OUT/calibration.log"

echo "== benchmarks (budget ${BENCH_S}s) =="
only=""
[ -n "${ONLY:-}" ] && only="--only $ONLY"
# the runner stops itself at BENCH_S + 90 s (SIGALRM) and writes its files; the outer limit only
# catches a call that never returns. TEST_S + CONF_S + CAL_S + BENCH_S + 100 (580 s by default; the environment probes and tar take about 15 s more) stays
# under the device's 600 s per command, so results.tgz is still written.
timeout $((BENCH_S + 100)) python3 -m benchmarks --time-budget "$BENCH_S" $only --no-progress \
  --out "$OUT/results" >"$OUT/bench.log" 2>&1
echo "benchmarks exit: $?"
tail -40 "$OUT/bench.log"
# pack the single-GPU results first, so a slow distributed run below cannot lose them
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
# several GPUs (a multi-GPU lend): EP and CP over NCCL, tokens/s and measured bytes per step,
# each run limited to half of what is left of a 590 s whole (bash's SECONDS counts from the start)
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
left_s=$((590 - SECONDS))
if [ "${ngpu:-0}" -ge 2 ] && [ "$left_s" -ge 40 ]; then
  echo "== distributed on $ngpu GPUs (limit $((left_s / 2))s each) =="
  for mode in "--ep 2 --n-group 2 --topk-group 1" "--cp 2"; do
    timeout $((left_s / 2)) torchrun --nproc-per-node 2 examples/train_distributed.py $mode >>"$OUT/distributed.log" 2>&1
    echo "torchrun $mode exit: $?"
  done
  tail -6 "$OUT/distributed.log"
elif [ "${ngpu:-0}" -ge 2 ]; then
  echo "== distributed skipped: only ${left_s}s of the 590 s left =="
fi
ls -la "$OUT"
