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
#
# Settings from the environment: SEEDS (a count N for seeds 1..N, or a list such as "3 7 11"; default 5),
# NUM_STEPS (1200), WARMUP_STEPS (50), EVAL_EVERY (50), OUTPUT_DIR (output), DOCS_DIR (docs), PY (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-output}
DOCS_DIR=${DOCS_DIR:-docs}
NUM_STEPS=${NUM_STEPS:-1200}
WARMUP_STEPS=${WARMUP_STEPS:-50}
EVAL_EVERY=${EVAL_EVERY:-50}
SEEDS=${SEEDS:-5}

# A 4-layer, 64-wide ViT on 32-px digits with 4-px patches (an 8x8 grid, one token per pixel of the 8x8
# originals), every block routed over global attention (order 0), the 3x3 (order 1) and the 5x5
# neighbourhood (order 2). No dropout and no augmentation (flips would turn digits into other shapes);
# weight decay instead. SGD with warmup and cosine decay, as train.py always uses.
DEMO_ARGS=(
  --dataset digits --model_type testing --img_size 32 --orders 0,1,2
  --set hidden_size=64 --set transformer.num_layers=4 --set transformer.num_heads=4
  --set transformer.mlp_dim=128 --set transformer.dropout_rate=0.0
  --num_steps "$NUM_STEPS" --warmup_steps "$WARMUP_STEPS" --eval_every "$EVAL_EVERY" --learning_rate 0.1 --weight_decay 5e-4
  --train_batch_size 32 --eval_batch_size 360 --augment none --num_workers 0
  --pretrained_dir none --device cpu --output_dir "$OUTPUT_DIR"
)

train() {  # train NAME [extra train.py arguments]
  local name=$1 start=$SECONDS
  shift
  echo "== training run '$name' (logs in $OUTPUT_DIR/$name/)"
  rm -rf "${OUTPUT_DIR:?}/$name"  # a fresh run each time: old event files would mix into the curves
  "$PY" train.py --name "$name" "${DEMO_ARGS[@]}" "$@"
  "$PY" - "$OUTPUT_DIR/$name/results.json" $((SECONDS - start)) <<'PYTHON'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"== {sys.argv[1]}: best validation accuracy {r['best_acc']:.2%}, final {r['final_acc']:.2%} "
      f"after {r['steps']} steps; training {r['seconds']:.0f} s, {sys.argv[2]} s with start-up")
PYTHON
}

demo() {
  train demo
  echo "== predicting the digits in pic/ (file names give the true label)"
  "$PY" test.py --ckpt "$OUTPUT_DIR/demo/best.ckpt" --image pic/
  "$PY" test.py --ckpt "$OUTPUT_DIR/demo/best.ckpt" --image pic/1.jpg --routing_plot "$OUTPUT_DIR/demo/routing.png" >/dev/null
  echo "== wrote $OUTPUT_DIR/demo/routing.png: the last layer's CLS attention and each layer's routing weights"
}

seed_list() {  # SEEDS as one seed a line: one number N means seeds 1..N, several numbers are the seeds
  if [[ $SEEDS =~ ^[[:space:]]*[1-9][0-9]*[[:space:]]*$ ]]; then
    seq 1 $((SEEDS))
  elif [[ $SEEDS =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)+[[:space:]]*$ ]]; then
    xargs -n 1 <<<"$SEEDS"
  else
    echo "demo.sh: error: SEEDS='$SEEDS'; expected a count (5 for seeds 1 to 5) or several seeds (\"3 7 11\")" >&2
    return 2
  fi
}

compare() {
  local seeds seed trar=() plain=()
  seeds=$(seed_list)
  for seed in $seeds; do
    train "demo_trar_seed$seed" --seed "$seed"
    train "demo_plain_seed$seed" --seed "$seed" --orders none
    trar+=("$OUTPUT_DIR/demo_trar_seed$seed")
    plain+=("$OUTPUT_DIR/demo_plain_seed$seed")
  done
  mkdir -p "$DOCS_DIR"
  "$PY" scripts/plot_curves.py --model "TRAR-ViT, orders [0, 1, 2]" "${trar[@]}" --model "plain ViT" "${plain[@]}" \
    --out "$DOCS_DIR/convergence.png" --summary "$OUTPUT_DIR/compare/summary"
  "$PY" scripts/plot_routing.py "${trar[0]}" --out "$DOCS_DIR/routing_layers.png"
}

main() {
  case ${1:-} in
    '') demo ;;
    compare) compare ;;
    *) echo "demo.sh: error: unknown mode '$1'; expected nothing or 'compare'" >&2; exit 2 ;;
  esac
}

main "$@"; exit  # on one line: bash has read it all before main runs, so editing this file mid-run is safe
