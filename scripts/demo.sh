#!/usr/bin/env bash
# The bundled demo: from a fresh clone to a trained, chatting (tiny) model in one command, offline, CPU or GPU.
#   bash scripts/demo.sh
# 1. creates .venv and installs requirements.txt (skipped when .venv already has them),
# 2. generates a small bilingual corpus (scripts/make_demo_data.py -> dataset/demo_*.jsonl),
# 3. pretrains and then SFT-trains a 1.6M-parameter MiniMind (out/demo/pretrain_128.pth, out/demo/full_sft_128.pth),
# 4. asks the chat model a few questions with eval_model.py.
# Takes about 4 minutes on 2 CPU cores (plus ~2 for the install), well under a minute on a GPU.
# Set PYTHON to use another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if ! .venv/bin/python -c "import torch, transformers, tokenizers" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --disable-pip-version-check -r requirements.txt
  fi
  PYTHON=.venv/bin/python
fi

OUT=out/demo
MODEL=(--dim 128 --n_layers 4 --n_heads 4 --n_kv_heads 2)
TRAIN=(--out_dir "$OUT" --max_seq_len 96 --batch_size 32 --accumulation_steps 1 --warmup_iters 20 --num_workers 0
       --log_interval 25 --save_interval 50 --dtype float32)

"$PYTHON" scripts/make_demo_data.py --out_dir dataset --n_pretrain 8000 --n_sft 4000
"$PYTHON" train_pretrain.py "${MODEL[@]}" "${TRAIN[@]}" --data_path dataset/demo_pretrain.jsonl --learning_rate 3e-3 --epochs 1
"$PYTHON" train_full_sft.py "${MODEL[@]}" "${TRAIN[@]}" --data_path dataset/demo_sft.jsonl --learning_rate 1e-3 --epochs 2

for question in "What is 12 + 7?" "你好" "天空是什么颜色的？" "What is 35 - 8?"; do
  "$PYTHON" eval_model.py "${MODEL[@]}" --out_dir "$OUT" --model_mode 1 --temperature 0 --max_new_tokens 48 --prompt "$question"
done
