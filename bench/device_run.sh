# Helpers for one call on the lent GPU machine (see bench/RESULTS.md for how each table was made).
# Source it from the repository root, with the wheels of the packages the machine lacks in $WHEELS (default
# .whl/server: diffusers, pydantic(-settings), PyAV, aiortc and their needs, for Python 3.12; carry that folder):
#   . bench/device_run.sh && gpu_env && gpu_kernels && gpu_bench main --fp8 --compile
#   . bench/device_run.sh && gpu_env && gpu_serve one --seconds 60
# Logs land in $OUT (the folder that comes back), or /tmp/out elsewhere.

OUT=${OUT:-/tmp/out}
WHEELS=${WHEELS:-.whl/server}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
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
  python3 -m pytest -q -p no:cacheprovider tests/model/test_fp8.py tests/model/test_shared_sink.py \
    tests/model/test_cuda_graphs.py tests/live/test_frame_ring.py 2>&1 | tee "$OUT/tests.log"
}

# gpu_bench NAME [bench flags...]: the 14B profile with random weights; log in $OUT/bench-NAME.log and the
# torch.profiler top kernels of one extra block per row in $OUT/profile-NAME.txt.
gpu_bench() {
  local name=$1
  shift
  LIVE_AVATAR_BENCH_PROFILE="$OUT/profile-$name.txt" python3 -m cli.main \
    bench --config configs/liveavatar-14b.yaml --random-weights "$@" 2>&1 | tee "$OUT/bench-$name.log"
}

# gpu_serve NAME [bench flags...]: the 14B server (random weights, realtime: auto, the fastest single-GPU levers)
# in a child process, driven over loopback by `live-avatar client` sessions; report in $OUT/serve-NAME.log.
gpu_serve() {
  local name=$1
  shift
  LIVE_AVATAR_FP8=true LIVE_AVATAR_COMPILE=true LIVE_AVATAR_CUDA_GRAPHS=true LIVE_AVATAR_STREAM__OVERLAP_DECODE=true \
    python3 -m cli.main bench --config configs/liveavatar-14b.yaml --random-weights --server \
    --server-log "$OUT/server-$name.log" "$@" 2>&1 \
    | tee "$OUT/serve-$name.log"
}

# gpu_fp8_kv [bench/fp8_kv.py flags...]: the FP8 KV / FP8 attention tests on CUDA (log $OUT/fp8_kv_tests.log), then
# bf16 vs FP8 KV × bf16 vs FP8 self-attention on the 14B DiT (random weights, FP8 linears unless LIVE_AVATAR_FP8
# says otherwise) at 704×384 (log $OUT/fp8_kv.log). Installs the cuDNN frontend from $FP8_WHEELS (default .whl/fp8,
# carry it) and puts torch's cuDNN on the library path.
gpu_fp8_kv() {
  local cudnn_lib
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${FP8_WHEELS:-.whl/fp8}"/*.whl || return 1
  cudnn_lib=$(python3 -c "import nvidia.cudnn as c; print(list(c.__path__)[0] + '/lib')") || return 1
  export LD_LIBRARY_PATH="$cudnn_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  python3 -m pytest -q -s -p no:cacheprovider tests/model/test_kv_fp8.py tests/model/test_attention_fp8.py 2>&1 \
    | tee "$OUT/fp8_kv_tests.log"
  LIVE_AVATAR_FP8=${LIVE_AVATAR_FP8:-true} python3 bench/fp8_kv.py "$@" 2>&1 | tee "$OUT/fp8_kv.log"
}
