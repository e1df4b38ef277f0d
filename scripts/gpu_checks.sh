#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with one CUDA GPU (H100: MFU against 989 TFLOP/s bf16).
# Writes its figures under ${OUT:-gpu_checks}/ and prints them:
#   1. bench 125m at B16 x T1024, bf16 + compile: ours vs HF Llama of the same dims (tok/s, MFU, peak memory)
#   2. bench 1b at B8 x T2048, bf16 + compile, ours only (tok/s, MFU, peak memory)
#   3. DPO vs SFT step time, 125m, B16 x T512, bf16 + compile
#   4. a real 60-step run through run.py on the gpu trainer (bf16 autocast, compile, fused AdamW, fused loss,
#      checkpoint, results.json)
# Usage: bash scripts/gpu_checks.sh            (STEPS=n changes the timed steps of each bench)
set -euo pipefail
out=${OUT:-gpu_checks}
steps=${STEPS:-20}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python -m llm.bench --model 125m --batch-size 16 --seq-len 1024 --compile --steps "$steps" --warmup 5 \
  --json "$out/bench_125m.json" 2>&1 | tee "$out/bench_125m.txt"
python -m llm.bench --model 1b --batch-size 8 --seq-len 2048 --compile --only ours --steps "$steps" --warmup 5 \
  --json "$out/bench_1b.json" 2>&1 | tee "$out/bench_1b.txt"
python -m llm.bench --sft-vs-dpo --model 125m --batch-size 16 --seq-len 512 --compile --steps "$steps" --warmup 5 \
  --json "$out/sft_vs_dpo_125m.json" 2>&1 | tee "$out/sft_vs_dpo_125m.txt"
python run.py model=125m trainer=gpu trainer.max_steps=60 trainer.eval_every=30 trainer.save_every=60 \
  trainer.log_every=10 logger=none hydra.run.dir="$out/run_125m" 2>&1 | tail -n 20 | tee "$out/run_125m.txt"
python -c "import json; print(json.dumps(json.load(open('$out/run_125m/results.json')), indent=1))"
