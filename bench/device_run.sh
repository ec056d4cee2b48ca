# Helpers for one call on the lent GPU machine (see bench/RESULTS.md for how each table was made).
# Source it from the repository root, with the wheels of the packages the machine lacks in .whl/:
#   . bench/device_run.sh && gpu_env && gpu_kernels && gpu_bench main --fp8 --compile
# Logs land in $OUT (the folder that comes back), or /tmp/out elsewhere.

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

gpu_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
    | tee "$OUT/env.log"
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/env.log"
}

gpu_kernels() { python3 bench/kernels.py "$@" 2>&1 | tee -a "$OUT/kernels.log"; }

gpu_tests() {
  python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py tests/test_shared_sink.py 2>&1 | tee "$OUT/tests.log"
}

# gpu_bench NAME [bench flags...]: the 14B profile with random weights; log in $OUT/bench-NAME.log and the
# torch.profiler top kernels of one extra block per row in $OUT/profile-NAME.txt.
gpu_bench() {
  local name=$1
  shift
  # cli.main's main() imports the media stack (PyAV), which the GPU image lacks; bench needs only the parser.
  LIVE_AVATAR_BENCH_PROFILE="$OUT/profile-$name.txt" python3 -c "import sys; from cli.main import build_parser
from cli.bench import main; sys.exit(main(build_parser().parse_args(sys.argv[1:])))" \
    bench --config configs/liveavatar-14b.yaml --random-weights "$@" 2>&1 | tee "$OUT/bench-$name.log"
}
