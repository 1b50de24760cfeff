#!/usr/bin/env bash
# train.sh with mixed precision (native torch.amp). FP16_OPT_LEVEL: O0 fp32, O1/O2 autocast with loss
# scaling, O3 pure low precision (see train.py --help). Add `--amp_dtype bf16` for bfloat16.
set -euo pipefail
cd "$(dirname "$0")"
FP16_OPT_LEVEL=${FP16_OPT_LEVEL:-O2}
exec bash train.sh --fp16 --fp16_opt_level "$FP16_OPT_LEVEL" "$@"
