#!/usr/bin/env bash
# Fine-tune ViT (+TRAR) from Google's ImageNet-21k checkpoint. Every variable can be overridden from the
# environment (e.g. `DATASET=cifar10 IMG_SIZE=224 bash train.sh`); extra arguments go to train.py
# (e.g. `bash train.sh --orders 0,1,2,3 --set transformer.routing=hard`).
#
# Preemption. RESUME=auto makes the same command continue the run's own last.ckpt when there is one (its
# settings must match) and start afresh otherwise, so a job can simply be run again:
# - torchrun restarts killed processes by itself: TORCHRUN_ARGS="--standalone --max-restarts 3" RESUME=auto;
# - SLURM runs a requeued job's script again, the same command; lost work is at most EVAL_EVERY steps (the
#   checkpoint interval). In the batch script:
#       #SBATCH --requeue                  # a preempted job goes back to the queue
#       #SBATCH --signal=B:USR1@120        # near the time limit, USR1 to the batch script...
#       trap 'scontrol requeue "$SLURM_JOB_ID"' USR1   # ...which requeues the job itself
#       RESUME=auto NAME=my_run bash train.sh & wait
#   Keep NAME fixed and leave --overwrite out of a requeued command.
set -euo pipefail
cd "$(dirname "$0")"

DATASET=${DATASET:-imagenet}              # cifar10, cifar100, imagenet or digits
if [[ $DATASET == imagenet ]]; then default_data=./data/imagenet; else default_data=./data; fi
DATA_DIR=${DATA_DIR:-$default_data}       # imagenet: train/ and val/ ImageFolder trees below it
MODEL_TYPE=${MODEL_TYPE:-ViT-B_16}
IMG_SIZE=${IMG_SIZE:-384}                 # 224 or 384
NAME=${NAME:-${DATASET}_vit_trar}           # a second run of one NAME is refused: set RESUME_PATH, NAME or --overwrite
GPUS=${GPUS:-0,1,2,3,4,5,6,7}             # devices to use; one process per device
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-512} # global batch over all processes
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-64}
GRAD_STEPS=${GRAD_STEPS:-1}               # gradient accumulation steps
NUM_STEPS=${NUM_STEPS:-20000}
WARMUP_STEPS=${WARMUP_STEPS:-1000}
DECAY_TYPE=${DECAY_TYPE:-cosine}          # cosine or linear
RESUME_PATH=${RESUME_PATH:-}              # e.g. output/$NAME/last.ckpt
RESUME=${RESUME:-}                        # auto: continue output/$NAME/last.ckpt if there is one, else start
EVAL_EVERY=${EVAL_EVERY:-100}             # steps between evaluations and checkpoints
PRETRAINED_DIR=${PRETRAINED_DIR:-checkpoint/$MODEL_TYPE.npz}
TORCHRUN_ARGS=${TORCHRUN_ARGS:---standalone}  # multi-node: --nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500

if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

IFS=',' read -r -a devices <<< "$GPUS"
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  export CUDA_VISIBLE_DEVICES=$GPUS
  NPROC=${NPROC:-${#devices[@]}}
else
  echo "train.sh: no CUDA GPU found, training on the CPU" >&2
  NPROC=${NPROC:-1}
fi

args=(--name "$NAME" --dataset "$DATASET" --data_dir "$DATA_DIR" --model_type "$MODEL_TYPE"
      --img_size "$IMG_SIZE" --train_batch_size "$TRAIN_BATCH_SIZE" --eval_batch_size "$EVAL_BATCH_SIZE"
      --gradient_accumulation_steps "$GRAD_STEPS" --num_steps "$NUM_STEPS" --warmup_steps "$WARMUP_STEPS"
      --decay_type "$DECAY_TYPE" --pretrained_dir "$PRETRAINED_DIR" --eval_every "$EVAL_EVERY")
[[ -n "$RESUME_PATH" ]] && args+=(--resume_path "$RESUME_PATH")
[[ -n "$RESUME" ]] && args+=(--resume "$RESUME")

if (( NPROC > 1 )); then
  # torchrun (utils/launch.py) that ends a failed run with its one-line error, once, instead of one per process
  # shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
  exec "$PYTHON" -m utils.launch $TORCHRUN_ARGS --nproc_per_node="$NPROC" train.py "${args[@]}" "$@"
fi
exec "$PYTHON" train.py "${args[@]}" "$@"
