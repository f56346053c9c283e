#!/usr/bin/env bash
# The GPU checks in one go, for a session that is lent a device machine (one H100/H200: < 8 minutes):
# the CUDA smoke tests (bf16, channels_last, fused SGD, single-GPU DDP, post-processing on the device),
# then `python -m iemask.benchmark` at the paper's settings. Everything lands in $OUT (or $1): the
# pytest log, the benchmark JSON and its tables, nvidia-smi. Record the figures in docs/benchmarks.md.
#
# The device image has torch, torchvision, lightning and torchmetrics but not hydra-core, omegaconf,
# pycocotools, faster-coco-eval or wandb, and cannot download. Before the call, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     hydra-core omegaconf antlr4-python3-runtime pycocotools faster-coco-eval wandb pytest-timeout
# then run it with the device tool:  bash scripts/gpu_check.sh   (the .whl folder travels with the tree)
set -uo pipefail
out="${OUT:-${1:-runs/gpu_check}}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
if [ -d .whl ]; then
    python3 -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -3
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
status=0
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log" || status=1
timeout 300 python3 -m iemask.benchmark benchmark.output="$out/benchmark.json" 2>&1 | tee "$out/benchmark.log" || status=1
exit $status
