#!/usr/bin/env bash
# One call (≤ 9 min wall) of training the next built-in avatar (configs/tiny-256.yaml: 256×256, 1-latent blocks,
# syllable-level visemes, a VAE that keeps the facial strokes) on the lent GPU machine. Each call resumes from the
# previous call's returned files:
#
#   scripts/device_train_tiny_v2.sh 1 SPEECH_NPZ            # the VAE (feature-weighted), then the wav2vec2 (visemes)
#   scripts/device_train_tiny_v2.sh 2 SPEECH_NPZ PREV_OUT   # the DiT on the new latents, the decoder beside it
#   scripts/device_train_tiny_v2.sh 3 SPEECH_NPZ PREV_OUT   # more DiT (new clips) and decoder
#
# SPEECH_NPZ: the espeak-ng bank (`live-avatar train-tiny --stage speech --work W`, here; the GPU host has no
# espeak-ng). PREV_OUT: the previous call's $OUT (vae.pt, audio.pt, dit.pt, decoder.pt). Carry .whl/server (diffusers,
# pydantic) plus those files. $OUT gets the .pt files, tiny-256.safetensors and the logs (*.out).
# Environment: OUT (default /tmp/out), MINUTES (training time of the call, default 7.5), DEVICE (cuda), PY (python3),
# SKIP_WHEELS=1 (no wheel install: a CPU dry run), WORKERS (renderer processes, 14), EXTRA (random characters besides
# the built-ins, 12), and the sizes below (VAE_BATCH, AUDIO_CLIPS, CLIPS, DIT_BATCH, DEC_STREAMS, …).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:?usage: scripts/device_train_tiny_v2.sh CALL SPEECH_NPZ [PREV_OUT]}
SPEECH=${2:?usage: scripts/device_train_tiny_v2.sh CALL SPEECH_NPZ [PREV_OUT]}
PREV=${3:-}
T0=$(date +%s)
export OUT=${OUT:-/tmp/out}
if [ -z "${SKIP_WHEELS:-}" ]; then
  . bench/device_run.sh || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
exec > >(tee "$OUT/run.out") 2>&1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7.5}
W=${WORK:-/tmp/tiny-v2-work}
rm -rf "$W" && mkdir -p "$W"
[ -n "$PREV" ] && for f in vae.pt audio.pt dit.pt decoder.pt; do [ -f "$PREV/$f" ] && cp "$PREV/$f" "$W/"; done
DEADLINE=$(awk -v t="$T0" -v m="$MINUTES" 'BEGIN { printf "%d", t + m * 60 }')
echo "start $(date -u +%FT%TZ) call=$CALL device=$DEVICE deadline=+$((DEADLINE - T0))s"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

ENTRY='import sys; from cli.main import build_parser; a = build_parser().parse_args(sys.argv[1:]); sys.exit(a.func(a))'
COMMON=(train-tiny --config configs/tiny-256.yaml --work "$W" --speech "$SPEECH" --extra-characters "${EXTRA:-12}"
        --seed 0 --data-seed "$CALL" --save-every "${SAVE_EVERY:-60}" --workers "${WORKERS:-14}" --threads 2
        --device "$DEVICE")
run() {  # run NAME ARGS...: one stage, logged to $OUT/NAME.out
  local name=$1
  shift
  "$PY" -c "$ENTRY" "${COMMON[@]}" --log-name "train-$name.log" --out "$W/tiny-$name.safetensors" "$@" \
    > "$OUT/$name.out" 2>&1
}
HALF=$(awk -v m="$MINUTES" 'BEGIN { printf "%.2f", m * 0.6 }')
if [ "$CALL" = 1 ]; then
  # the VAE on 128-px crops around the face, strokes weighted ×VAE_FEATURES, the mouth ×8; then the wav2vec2
  run vae --stage vae --vae-minutes "$HALF" --vae-steps 10000000 --vae-batch "${VAE_BATCH:-16}" --vae-crop 128 \
    --vae-latents 2 --vae-lr "${VAE_LR:-2e-3}" --vae-feature-weight "${VAE_FEATURES:-6}"
  RC1=$?
  run audio --stage audio --audio-minutes "${AUDIO_MINUTES:-2}" --audio-steps 10000000 --audio-clips "${AUDIO_CLIPS:-1024}" \
    --audio-val-clips "${AUDIO_VAL:-48}" --audio-batch "${AUDIO_BATCH:-128}" --blocks 18
  RC2=$?
else
  # the DiT (flow matching + the mouth on its own samples) and, beside it, the decoder on long streams
  run decoder --stage decoder --deadline "$DEADLINE" --decoder-streams "${DEC_STREAMS:-64}" --decoder-latents "${DEC_LATENTS:-60}" \
    --decoder-batch "${DEC_BATCH:-8}" --decoder-val-latents "${DEC_VAL:-48}" --decoder-lr "${DEC_LR:-2e-4}" --decoder-noise 0.1 &
  DEC=$!
  run dit --stage dit --deadline "$DEADLINE" --clips "${CLIPS:-2048}" --blocks 18 --val-clips "${VAL_CLIPS:-16}" \
    --dit-batch "${DIT_BATCH:-64}" --dit-lr "${DIT_LR:-1e-3}" --dit-steps 10000000 --rollout-batch "${ROLL_BATCH:-16}"
  RC2=$?
  wait $DEC
  RC1=$?
fi
"$PY" -c "$ENTRY" "${COMMON[@]}" --device cpu --stage export --log-name train-export.log \
  --out "$OUT/tiny-256.safetensors"
RC3=$?
for f in vae.pt audio.pt dit.pt decoder.pt; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
tail -n 3 "$OUT"/*.out
echo "done in $(( $(date +%s) - T0 )) s: $RC1 $RC2 $RC3"
sleep 1
[ "$RC1" = 0 ] && [ "$RC2" = 0 ] && [ "$RC3" = 0 ]
