#!/usr/bin/env bash
# The embedded default: fine-tune SmolLM2-135M-Instruct on the bundled Capybara rows, then score the fine-tuned model
# against the base with BERTScore, offline. Run through `make demo`, which sets up the virtualenv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

asset() { "$PY" -m capyft.assets "$1" | sed -n "s/^$1: //p"; }
MODEL=$(asset smollm2)
ENCODER=$(asset minilm)
echo "== capyft demo: SmolLM2-135M-Instruct ($MODEL) on 10 bundled Capybara conversations"
echo "   This shows the pipeline working end to end offline; it is not a quality result."

"$PY" -m capyft fit --config configs/demo.yaml --model.model_name_or_path "$MODEL" "$@"
RUN=$(ls -td runs/demo/version_* | head -n 1)

"$PY" -m capyft test --config "$RUN/config.yaml" --ckpt_path "$RUN/checkpoints/last.ckpt" \
  --model.bertscore.model_type "$ENCODER" --model.compare_base true

cat <<MSG

== done. Everything is in $RUN:
   checkpoints/last.ckpt (the final adapter + optimizer + loop state), adapter/best and adapter/final (PEFT format),
   test-last/predictions.jsonl and test-last/test_metrics.json (BERTScore, fine-tuned vs base, with paired
   statistics), TensorBoard events (curves, validation answers, test examples).
   what was trained:  $PY -m capyft data --config configs/demo.yaml --model.model_name_or_path $MODEL
   curves:  .venv/bin/tensorboard --logdir runs/demo
   resume:  $PY -m capyft fit --config configs/demo.yaml --model.model_name_or_path $MODEL \\
              --ckpt_path $RUN/checkpoints/last.ckpt --trainer.max_steps 20
   real experiment (hub + GPU): $PY -m capyft fit --config configs/llama31-8b-capybara.yaml
MSG
