#!/usr/bin/env bash
# One call (≤ 9 min wall) of built-in-avatar training on the lent GPU machine, resumable by the next call:
# the VAE decoder trained as it is used (whole streams, block by block, causal cache carried, truncated backprop)
# and the DiT (more steps on fresh clips, plus the mouth loss on its own sampling trajectory) side by side as two
# processes on the one GPU (both are launch-bound), then one weights file. With AUDIO_MINUTES the wav2vec2 is
# trained first (the audio stage), and the DiT then trains on its new features.
#
#   scripts/device_train_tiny.sh INIT_DIR [DATA_SEED]
#
# INIT_DIR: vae.pt (frozen encoder = the DiT's latent space), dit.pt, decoder.pt and audio.pt (if any) to start from
# (weights only):
# artifacts/train-final for the first call, the previous call's returned files for the next. Give each call a new
# DATA_SEED (1, 2, …): fresh clips, streams and batches.
# Results in $OUT: tiny.safetensors (the weights the tiny profile loads), dit.pt, decoder.pt, vae.pt, audio.pt (the
# next call's INIT_DIR), dit.out, decoder.out, run.out (logs: losses, the DiT's held-out mouth eval, the decoder's
# PSNR-over-time / seam / shirt-colour eval before and after).
#
# Environment: OUT (default /tmp/out), SPEECH (speech bank, default artifacts/train-final/speech.npz; the GPU host
# has no espeak-ng), MINUTES (training stops MINUTES after the start, default 7; the call ends ~1 min later),
# DEVICE (cuda), PY (python3), SKIP_WHEELS=1 (no wheel install, for a CPU dry run), AUDIO_MINUTES (audio stage
# first, default 0: none), DECODER=0 (no decoder stage: INIT_DIR's decoder is kept), and the knobs below.
set -uo pipefail
cd "$(dirname "$0")/.."
INIT=${1:?usage: scripts/device_train_tiny.sh INIT_DIR [DATA_SEED]}
DATA_SEED=${2:-1}
T0=$(date +%s)
export OUT=${OUT:-/tmp/out}
if [ -z "${SKIP_WHEELS:-}" ]; then
  . bench/device_run.sh || exit 1  # diffusers / pydantic(-settings) wheels from .whl/ → /tmp/site, PYTHONPATH
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
exec > >(tee "$OUT/run.out") 2>&1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7}
SPEECH=${SPEECH:-artifacts/train-final/speech.npz}
W=${WORK:-/tmp/tiny-work}
for f in "$INIT/vae.pt" "$INIT/dit.pt" "$SPEECH"; do
  [ -f "$f" ] || { echo "missing $f"; exit 1; }
done
rm -rf "$W" && mkdir -p "$W"
DEADLINE=$(awk -v t="$T0" -v m="$MINUTES" 'BEGIN { printf "%d", t + m * 60 }')
HARD=$((DEADLINE + 50 - $(date +%s)))  # a stage still running 50 s past the deadline is stopped (checkpoints stay)
echo "start $(date -u +%FT%TZ) init=$INIT data_seed=$DATA_SEED device=$DEVICE deadline=+$((DEADLINE - T0))s"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

ENTRY='import sys; from cli.main import build_parser; a = build_parser().parse_args(sys.argv[1:]); sys.exit(a.func(a))'
COMMON=(train-tiny --work "$W" --init-from "$INIT" --speech "$SPEECH" --extra-characters 0 --seed 0
        --data-seed "$DATA_SEED" --save-every "${SAVE_EVERY:-60}" --workers "${WORKERS:-7}" --threads "${THREADS:-2}")

if [ "${DECODER:-1}" != 0 ]; then
  timeout -s INT -k 15 "$HARD" "$PY" -c "$ENTRY" "${COMMON[@]}" --device "$DEVICE" --deadline "$DEADLINE" \
    --stage decoder --log-name train-decoder.log --out "$W/tiny-decoder.safetensors" \
    --decoder-streams "${DEC_STREAMS:-96}" --decoder-latents "${DEC_LATENTS:-60}" --decoder-batch "${DEC_BATCH:-8}" \
    --decoder-tbptt "${DEC_TBPTT:-2}" --decoder-val-latents "${DEC_VAL:-48}" --decoder-lr "${DEC_LR:-2e-4}" \
    --decoder-noise "${DEC_NOISE:-0.3}" > "$OUT/decoder.out" 2>&1 &
  DEC=$!
else
  true & DEC=$!
fi
(
  if [ "${AUDIO_MINUTES:-0}" != 0 ]; then
    "$PY" -c "$ENTRY" "${COMMON[@]}" --device "$DEVICE" --stage audio --log-name train-audio.log \
      --out "$W/tiny-audio.safetensors" --audio-minutes "$AUDIO_MINUTES" --audio-steps 10000000 \
      --audio-clips "${AUDIO_CLIPS:-1024}" --audio-batch "${AUDIO_BATCH:-128}" > "$OUT/audio.out" 2>&1 || exit 1
  fi
  timeout -s INT -k 15 "$HARD" "$PY" -c "$ENTRY" "${COMMON[@]}" --device "$DEVICE" --deadline "$DEADLINE" \
    --stage dit --log-name train-dit.log --out "$W/tiny-dit.safetensors" \
    --clips "${CLIPS:-2048}" --val-clips "${VAL_CLIPS:-16}" --dit-batch "${DIT_BATCH:-64}" --dit-lr "${DIT_LR:-1e-3}" \
    --dit-steps 10000000 --rollout-batch "${ROLL_BATCH:-16}" --rollout-weight "${ROLL_WEIGHT:-1.0}" \
    > "$OUT/dit.out" 2>&1
) &
DIT=$!
wait $DEC; RC_DEC=$?
wait $DIT; RC_DIT=$?
echo "decoder stage exit $RC_DEC, dit stage exit $RC_DIT ($(( $(date +%s) - T0 )) s)"
tail -n 4 "$OUT"/*.out

# one weights file from whatever the stages saved (their last checkpoints; INIT_DIR's for a stage that saved none)
"$PY" -c "$ENTRY" "${COMMON[@]}" --device cpu --stage export --log-name train-export.log --out "$OUT/tiny.safetensors"
RC_EXP=$?
for f in dit.pt decoder.pt audio.pt; do
  if [ -f "$W/$f" ]; then cp "$W/$f" "$OUT/"; elif [ -f "$INIT/$f" ]; then cp "$INIT/$f" "$OUT/"; fi
done
cp "$INIT/vae.pt" "$OUT/"
ls -l "$OUT"
echo "done in $(( $(date +%s) - T0 )) s: decoder $RC_DEC, dit $RC_DIT, export $RC_EXP"
sleep 1  # let tee write run.out out
[ "$RC_EXP" = 0 ] && [ "$RC_DEC" = 0 ] && [ "$RC_DIT" = 0 ]
