#!/usr/bin/env bash
# The demo, on any CPU in about a minute: train a small TRAR-ViT on scikit-learn's handwritten
# digits (run `demo`, in output/demo/), predict the sample digits in pic/ and draw the routing
# picture of pic/1.jpg to output/demo/routing.png.
#
#   bash scripts/demo.sh            # what `make demo` runs
#   bash scripts/demo.sh compare    # TRAR-ViT against the same ViT without routing over several seeds
#                                   # (runs demo_trar_seedS and demo_plain_seedS): the validation curves
#                                   # to docs/convergence.png, the statistics to output/compare/summary.{json,md},
#                                   # and what the first seed's routers learned to docs/routing_layers.png
#   bash scripts/demo.sh recipes    # both models under the `vit` and the `deit` recipe over several seeds (runs
#                                   # demo_trar_seedS, demo_plain_seedS, demo_trar_deit_seedS, demo_plain_deit_seedS):
#                                   # the curves to docs/recipes.png, the statistics to output/recipes/summary.{json,md}
#                                   # and the deit runs' EMA weights to output/recipes/ema_summary.{json,md}
#
# Settings from the environment: SEEDS (a count N for seeds 1..N, or a list of distinct seeds such as "3 7 11";
# default 5), NUM_STEPS (1200), WARMUP_STEPS (50), EVAL_EVERY (50), OUTPUT_DIR (output), DOCS_DIR (docs),
# PY (.venv/bin/python).
#
# It replaces only run folders it made itself (they hold a $MARK file): a folder of the same name that it
# did not make is refused before any training, and left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-output}
DOCS_DIR=${DOCS_DIR:-docs}
NUM_STEPS=${NUM_STEPS:-1200}
WARMUP_STEPS=${WARMUP_STEPS:-50}
EVAL_EVERY=${EVAL_EVERY:-50}
SEEDS=${SEEDS:-5}
MARK=.made-by-demo.sh  # in every run folder this script made, and only those

# The `demo` model of model/config.py (a 4-layer, 64-wide routed ViT) on 32-px digits with 4-px patches (an
# 8x8 grid, one token per pixel of the 8x8 originals), trained from scratch.
DEMO_ARGS=(
  --dataset digits --model_type demo --img_size 32
  --num_steps "$NUM_STEPS" --warmup_steps "$WARMUP_STEPS" --eval_every "$EVAL_EVERY"
  --train_batch_size 32 --eval_batch_size 360 --num_workers 0
  --pretrained_dir none --device cpu --output_dir "$OUTPUT_DIR"
)
# The recipes the demo trains with (train.py's arguments after DEMO_ARGS). `vit` (the default recipe: SGD with
# warmup and cosine decay) with the demo's lr, weight decay instead of augmentation (flips would turn digits into
# other shapes). `deit` with every part on (AdamW, drop path, mixup/cutmix, label smoothing, RandAugment, erasing,
# EMA) and its own lr 1e-3, over the milder crop without flips; its EMA decay 0.99996 averages over 25,000 steps
# (1/15 of DeiT's 375,000), which in 1,200 steps would leave the average near the initial weights: 0.99 averages
# over 100 steps instead, about the same share of this run.
RECIPE_VIT=(--learning_rate 0.1 --weight_decay 5e-4 --augment none)
RECIPE_DEIT=(--recipe deit --augment crop --model_ema_decay 0.99)

check_ours() {  # check_ours NAME...: every run folder that exists was made by this script
  local name
  for name in "$@"; do
    if [[ -e $OUTPUT_DIR/$name && ! -e $OUTPUT_DIR/$name/$MARK ]]; then
      echo "demo.sh: error: $OUTPUT_DIR/$name exists and was not made by demo.sh: it is never replaced;" \
           "move it or set OUTPUT_DIR to another folder" >&2
      return 1
    fi
  done
}

train() {  # train NAME [extra train.py arguments]
  local name=$1 start=$SECONDS
  shift
  check_ours "$name"
  echo "== training run '$name' (logs in $OUTPUT_DIR/$name/)"
  mkdir -p "$OUTPUT_DIR/$name"
  echo "made by scripts/demo.sh, which replaces this run when it runs again" >"$OUTPUT_DIR/$name/$MARK"
  # a fresh run each time (old event files would mix into the curves): train.py replaces only its own files
  "$PY" train.py --name "$name" "${DEMO_ARGS[@]}" --overwrite "$@"
  "$PY" - "$OUTPUT_DIR/$name/results.json" $((SECONDS - start)) <<'PYTHON'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"== {sys.argv[1]}: best validation accuracy {r['best_acc']:.2%}, final {r['final_acc']:.2%} "
      f"after {r['steps']} steps; training {r['seconds']:.0f} s, {sys.argv[2]} s with start-up")
PYTHON
}

demo() {
  check_ours demo
  train demo "${RECIPE_VIT[@]}"
  echo "== predicting the digits in pic/ (file names give the true label)"
  "$PY" test.py --ckpt "$OUTPUT_DIR/demo/best.ckpt" --image pic/
  "$PY" test.py --ckpt "$OUTPUT_DIR/demo/best.ckpt" --image pic/1.jpg --routing_plot "$OUTPUT_DIR/demo/routing.png" >/dev/null
  echo "== wrote $OUTPUT_DIR/demo/routing.png: the last layer's CLS attention and each layer's routing weights"
}

seed_list() {  # SEEDS as one seed a line: one number N means seeds 1..N, several distinct numbers are the seeds
  local seed seen=' '
  if [[ $SEEDS =~ ^[[:space:]]*[1-9][0-9]*[[:space:]]*$ ]]; then
    seq 1 $((10#${SEEDS//[[:space:]]/}))
  elif [[ $SEEDS =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)+[[:space:]]*$ ]]; then
    for seed in $SEEDS; do
      seed=$((10#$seed))  # 007 is seed 7
      if [[ $seen == *" $seed "* ]]; then
        echo "demo.sh: error: SEEDS='$SEEDS' gives seed $seed twice; expected distinct seeds" >&2
        return 2
      fi
      seen+="$seed "
    done
    xargs -n 1 <<<"$seen"
  else
    echo "demo.sh: error: SEEDS='$SEEDS'; expected a count (5 for seeds 1 to 5) or several seeds (\"3 7 11\")" >&2
    return 2
  fi
}

over_seeds() {  # over_seeds MODEL...: train each model (run-name stem) once per seed; model_args gives its arguments
  local seeds seed model
  seeds=$(seed_list)
  for seed in $seeds; do  # every run folder checked before the first run trains
    for model in "$@"; do check_ours "demo_${model}_seed$seed"; done
  done
  for seed in $seeds; do
    for model in "$@"; do
      # shellcheck disable=SC2046  # model_args prints words without spaces
      train "demo_${model}_seed$seed" --seed "$seed" $(model_args "$model")
    done
  done
}

model_args() {  # model_args MODEL: train.py's arguments for the model and recipe its run-name stem names
  case $1 in
    trar) echo "${RECIPE_VIT[*]}" ;;
    plain) echo "${RECIPE_VIT[*]} --orders none" ;;
    trar_deit) echo "${RECIPE_DEIT[*]}" ;;
    plain_deit) echo "${RECIPE_DEIT[*]} --orders none" ;;
  esac
}

runs_of() {  # runs_of MODEL: the run folders of that model, one per seed
  local seed
  for seed in $(seed_list); do echo "$OUTPUT_DIR/demo_${1}_seed$seed"; done
}

compare() {
  over_seeds trar plain
  mkdir -p "$DOCS_DIR"
  local trar plain
  mapfile -t trar < <(runs_of trar)
  mapfile -t plain < <(runs_of plain)
  "$PY" scripts/plot_curves.py --model "TRAR-ViT, orders [0, 1, 2]" "${trar[@]}" --model "plain ViT" "${plain[@]}" \
    --out "$DOCS_DIR/convergence.png" --summary "$OUTPUT_DIR/compare/summary"
  "$PY" scripts/plot_routing.py "${trar[0]}" --out "$DOCS_DIR/routing_layers.png"
}

recipes() {
  over_seeds trar plain trar_deit plain_deit
  mkdir -p "$DOCS_DIR"
  local trar plain trar_deit plain_deit
  mapfile -t trar < <(runs_of trar)
  mapfile -t plain < <(runs_of plain)
  mapfile -t trar_deit < <(runs_of trar_deit)
  mapfile -t plain_deit < <(runs_of plain_deit)
  # the live weights' accuracy (the deit runs log the EMA's too, under val/ema_accuracy)
  "$PY" scripts/plot_curves.py --tag val/accuracy --title 'Validation accuracy on digits: vit and deit recipes' \
    --model "TRAR-ViT, vit" "${trar[@]}" --model "plain ViT, vit" "${plain[@]}" \
    --model "TRAR-ViT, deit" "${trar_deit[@]}" --model "plain ViT, deit" "${plain_deit[@]}" \
    --out "$DOCS_DIR/recipes.png" --summary "$OUTPUT_DIR/recipes/summary"
  "$PY" scripts/plot_curves.py --tag val/ema_accuracy --title "deit recipe: the EMA weights' validation accuracy" \
    --model "TRAR-ViT, deit, EMA" "${trar_deit[@]}" --model "plain ViT, deit, EMA" "${plain_deit[@]}" \
    --out "$OUTPUT_DIR/recipes/ema.png" --summary "$OUTPUT_DIR/recipes/ema_summary"
}

main() {
  case ${1:-} in
    '') demo ;;
    compare) compare ;;
    recipes) recipes ;;
    *) echo "demo.sh: error: unknown mode '$1'; expected nothing, 'compare' or 'recipes'" >&2; exit 2 ;;
  esac
}

main "$@"; exit  # on one line: bash has read it all before main runs, so editing this file mid-run is safe
