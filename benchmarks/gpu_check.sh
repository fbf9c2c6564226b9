#!/usr/bin/env bash
# The shipped wave-1 library and the benchmarks on the default model on CUDA, in bf16 (and the library in
# float32 for the verdict comparison); one run, under ten minutes on one recent GPU. Never part of the test
# suite. Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (writes OUT_DIR/*.json|log, default ./gpu_check)
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' || { echo "gpu_check: no CUDA device"; exit 1; }
import torch
assert torch.cuda.is_available()
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
step() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name rc=$rc $(( $(date +%s) - start ))s"
  tail -n 25 "$OUT/$name.log"
}
# The library in bf16 and in float32 on CUDA: per-probe wall, forwards, generated tokens, peak CUDA memory,
# verdicts (compare the two verdict lists, and each with reports/baselines/smollm2-135m-instruct/default.json).
step library_bf16 240 python benchmarks/bench_library.py --threads 4 --json "$OUT/library_bf16.json" \
  -- --probe-device=cuda --probe-dtype=bfloat16
step library_fp32 180 python benchmarks/bench_library.py --threads 4 --json "$OUT/library_fp32.json" \
  -- --probe-device=cuda --probe-dtype=float32
# The benchmarks with the subject on CUDA in bf16: their plain-transformers floors were written for CPU, so a
# floor that builds its tensors on the CPU fails loudly here (noted in the log) rather than measuring wrong.
for b in bench_direction bench_logit_lens bench_circuit; do
  step "$b" 90 python - "$b" <<'PY'
import functools, runpy, sys
import modelprobe.subject as s
s.load_subject = functools.partial(s.load_subject, device="cuda", dtype="bfloat16")
name = sys.argv[1]
sys.argv = [f"benchmarks/{name}.py"]
runpy.run_path(f"benchmarks/{name}.py", run_name="__main__")
PY
done
