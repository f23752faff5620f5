#!/usr/bin/env bash
# `ztt finetune --sharding fsdp` against `--sharding ddp` on GPUs (not run by the tests): the built-in
# SmolLM2-135M converted to a ZTT, healed a few steps each way under torchrun; prints each run's losses and
# every process's peak GPU memory (torch.cuda.max_memory_allocated, read through a sitecustomize hook).
#
#   bash bench/fsdp_gpu.sh                  # every GPU of this machine (one GPU works too: FSDP shards over 1)
#   NPROC=2 STEPS=30 BATCH=4 bash bench/fsdp_gpu.sh
#
# What to look for: the losses of the two runs agree to about 1e-4 relative (the same global batch, the
# arithmetic arranged differently), and each fsdp process's peak is below a ddp process's by about three
# quarters of the trained weights' gradients and Adam state divided over the processes. On one process
# --sharding fsdp trains exactly as ddp (nothing to shard): the peaks are then the same.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
STEPS=${STEPS:-20}
BATCH=${BATCH:-4}
SEQ=${SEQ:-512}
WORK=${WORK:-runs/bench-fsdp}
mkdir -p "$WORK/hook"

# each process reports its peak GPU memory when it exits
cat > "$WORK/hook/sitecustomize.py" <<'EOF'
import atexit, os, sys
def _peak():
    if "torch" not in sys.modules:
        return
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gib = torch.cuda.max_memory_allocated() / 2**30
        sys.stderr.write(f"PEAK rank {os.environ.get('RANK', '0')}: {gib:.3f} GiB allocated\n")
atexit.register(_peak)
EOF

if [ ! -f "$WORK/ztt/config.json" ]; then
  "$PY" -m ztt_cli convert smollm2-135m --out "$WORK/ztt" --overwrite
fi

for sharding in ddp fsdp; do
  echo "== --sharding $sharding, $NPROC process(es), $STEPS steps, batch $BATCH x $SEQ tokens per process"
  PYTHONPATH="$WORK/hook${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 \
    "$TORCHRUN" --nproc-per-node "$NPROC" -m ztt_cli finetune "$WORK/ztt" --data shakespeare \
    --out "$WORK/healed-$sharding" --overwrite --sharding "$sharding" --steps "$STEPS" --batch-size "$BATCH" \
    --seq-len "$SEQ" --log-every 1 --eval-every "$STEPS" --save-every "$STEPS" 2> "$WORK/$sharding.err" >/dev/null \
    || { tail -20 "$WORK/$sharding.err"; exit 1; }
  grep '^PEAK' "$WORK/$sharding.err" | sort
  "$PY" - "$WORK/healed-$sharding/train_log.jsonl" <<'EOF'
import json, sys
log = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in log if r["event"] == "step"]
print("losses:", " ".join(f"{r['loss']:.4f}" for r in steps))
print(f"tokens/s (last step): {steps[-1]['tokens_per_s']:.0f}")
print("validation loss:", [round(r["val_loss"], 4) for r in log if r["event"] == "val"])
EOF
done
