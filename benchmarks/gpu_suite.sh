#!/usr/bin/env bash
# The one-call device check: CUDA-marked tests, host reads and device syncs per step, optimizer step time of the coca
# and distill objectives against clip (ViT-B-32 / coca_ViT-B-32 towers, bf16, batch 256, grad_accum 1 and 2), a
# Hugging Face (XLM-R) text tower against open_clip's of the same shape, then
# training throughput of vlpretrain against open_clip_train for ViT-B-32 and ViT-B-16 (bf16, batch 256, with and
# without torch.compile): samples/s, ratio, MFU, peak memory.
#
#   bash benchmarks/gpu_suite.sh          # on a GPU machine, about 10 minutes; wheels in .whl/ are installed first
#   bash benchmarks/gpu_suite.sh --dry    # anywhere: CPU, tiny model, a few steps (CI runs this so it never rots)
#
# The GPU image we measure on has torch but lacks open_clip_torch, webdataset, ftfy, braceexpand and deepspeed:
# put their wheels in .whl/ beside the repo (`pip download --no-deps ... -d .whl`, and for DeepSpeed
# `pip wheel --no-deps deepspeed -w .whl`); they are installed without network into a private folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/vlpretrain/torch_extensions}
if [[ $DRY == 0 ]] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlpretrain-site \
    .whl/*.whl
  export PYTHONPATH=/tmp/vlpretrain-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== environment"
$PY - <<'PY'
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}  cuda {torch.version.cuda}  gpu: {gpu}")
PY

if [[ $DRY == 1 ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  MODELS=(tiny-vit)
  ARGS=(--batch-size 8 --steps 6 --warmup 2 --log-every 2 --precision fp32 --workers 0)
  COMPILE=("")
else
  export DS_ACCELERATOR=cuda
  MODELS=(ViT-B-32 ViT-B-16)
  ARGS=(--batch-size 256 --steps 50 --warmup 20 --log-every 10 --precision bf16 --workers 8)
  COMPILE=("" "--compile")
  echo "== CUDA tests"
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
fi

echo "== host reads and device syncs per training step"
if [[ $DRY == 1 ]]; then
  $PY benchmarks/host_syncs.py --batch-size 4 --quick
else
  $PY benchmarks/host_syncs.py --batch-size 32
fi

echo "== objective step time (clip, distill, coca)"
if [[ $DRY == 1 ]]; then
  $PY benchmarks/objectives.py --size tiny --batch 4 --steps 2 --warmup 1
else
  $PY benchmarks/objectives.py --size ViT-B-32 --batch 256 --steps 10 --warmup 3
fi

echo "== HF text tower step time (XLM-R layout vs open_clip's text transformer, same shape)"
if ! $PY -c "import transformers, tokenizers" 2>/dev/null; then
  echo "skipped: transformers / tokenizers not installed (put their wheels in .whl/)"
elif [[ $DRY == 1 ]]; then
  $PY benchmarks/hf_text_tower.py --size tiny --batch 4 --steps 2 --warmup 1
else
  $PY benchmarks/hf_text_tower.py --size base --batch 256 --steps 20 --warmup 5 --precision bf16
fi

echo "== training throughput (vlpretrain vs open_clip_train)"
for model in "${MODELS[@]}"; do
  for compile in "${COMPILE[@]}"; do
    echo "-- $model ${compile:-eager}"
    # shellcheck disable=SC2086
    $PY benchmarks/train_throughput.py --model "$model" "${ARGS[@]}" $compile
  done
done
echo "== gpu_suite done"
