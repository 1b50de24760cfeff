#!/usr/bin/env bash
# The demo, on any CPU in about a minute: train a small TRAR-ViT on scikit-learn's handwritten
# digits (run `demo`, in output/demo/), predict the sample digits in pic/ and draw the routing
# picture of pic/1.jpg to output/demo/routing.png.
#
#   bash scripts/demo.sh            # what `make demo` runs
#   bash scripts/demo.sh compare    # also trains the same model without routing (run `demo_plain`)
#                                   # and draws both validation curves to docs/convergence.png
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-output}

# A 4-layer, 64-wide ViT on 32-px digits with 4-px patches (an 8x8 grid, one token per pixel of the 8x8
# originals), every block routed over global attention (order 0), the 3x3 (order 1) and the 5x5
# neighbourhood (order 2). No dropout and no augmentation (flips would turn digits into other shapes);
# weight decay instead. SGD with warmup and cosine decay, as train.py always uses.
DEMO_ARGS=(
  --dataset digits --model_type testing --img_size 32 --orders 0,1,2
  --set hidden_size=64 --set transformer.num_layers=4 --set transformer.num_heads=4
  --set transformer.mlp_dim=128 --set transformer.dropout_rate=0.0
  --num_steps 1200 --warmup_steps 50 --eval_every 50 --learning_rate 0.1 --weight_decay 5e-4
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

train demo
echo "== predicting the digits in pic/ (file names give the true label)"
"$PY" test.py --ckpt "$OUTPUT_DIR/demo/best.ckpt" --image pic/
"$PY" test.py --ckpt "$OUTPUT_DIR/demo/best.ckpt" --image pic/1.jpg --routing_plot "$OUTPUT_DIR/demo/routing.png" >/dev/null
echo "== wrote $OUTPUT_DIR/demo/routing.png: the last layer's CLS attention and each layer's routing weights"

if [[ ${1:-} == compare ]]; then
  train demo_plain --orders none
  "$PY" scripts/plot_curves.py "$OUTPUT_DIR/demo" "$OUTPUT_DIR/demo_plain" \
    --labels "TRAR-ViT, orders [0, 1, 2]" "plain ViT" --out docs/convergence.png
fi
