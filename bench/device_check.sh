#!/usr/bin/env bash
# The GPU checks, as one script for a GPU machine (nothing in the project needs one):
#   OUT=bench/results bash bench/device_check.sh
# 1. training throughput in bf16 (bench/train_bench.py): ViT-B/16 and ViT-S/16 at 224 px and the
#    pipeline's model at its batch, LayerShuffle vs sequential vs timm's plain loop, against the
#    bf16 matmul peak measured in the same run; ViT-B/16 again with its blocks torch.compile'd;
# 2. the runtime on ONNX Runtime's CUDA provider (bench/runtime_bench.py), where the installed
#    onnxruntime has it;
# 3. the data path on CUDA (bench/data_bench.py): a generated 224 px ImageFolder prepared, then one
#    ViT-S/16 LayerShuffle epoch read from the prepared files (DataLoader workers, pinned memory,
#    augmentation on the GPU), its images/s next to step 1's (batches already on the GPU); with
#    two GPUs or more, the same epoch under torchrun with NCCL;
# 4. the default pipeline's stages on CUDA (bench/pipeline_device.py: no DVC, MLflow off).
# Each step has its own time limit (about 9 minutes in all), so one that hangs costs only its own
# slot; every result lands in $OUT as it is written, with this script's log (device_check.log).
# Uses python3 (the machine's own torch, timm, onnx, onnxruntime; the library from src/).
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
nproc
$PY -c "import torch, timm, onnx, onnxruntime as o; print('torch', torch.__version__, 'timm', \
timm.__version__, 'onnx', onnx.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"

step() {  # step SECONDS COMMAND...: run with a time limit, say how it ended
    local limit=$1; shift
    echo "== $* (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@"
    echo "== exit $? after $((SECONDS - started)) s"
}

BENCH="bench/train_bench.py --device cuda --dtype bf16 --peak-size 8192 --rounds 3 --steps 20"
step 70 $PY $BENCH --arch vit_b --batch 256 --out "$OUT/train_cuda_vit_b_b256.json"
step 45 $PY $BENCH --arch vit_s --batch 256 --out "$OUT/train_cuda_vit_s_b256.json"
step 35 $PY $BENCH --arch default --batch 64 --out "$OUT/train_cuda_default_b64.json"
step 120 $PY $BENCH --arch vit_b --batch 256 --compile --out "$OUT/train_cuda_vit_b_b256_compile.json"
if $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    step 45 $PY bench/runtime_bench.py --provider cuda --models default vit_s --batches 1 64 \
        --repeats 3 --out "$OUT/runtime_cuda.json"
else
    echo "== runtime on CUDA skipped: this onnxruntime has no CUDAExecutionProvider"
fi
DATA=/tmp/anyorder-data-bench
step 90 $PY bench/data_bench.py --sizes 6000 --device cuda --arch vit_s --no-throughput \
    --work "$DATA" --out "$OUT/data_cuda_vit_s.json"
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
    step 90 $PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
        bench/data_bench.py --epoch-only "$DATA/prepared6000" --device cuda --arch vit_s
else
    echo "== torchrun with NCCL skipped: $GPUS GPU (it needs two or more)"
fi
step "${PIPELINE_LIMIT:-170}" $PY bench/pipeline_device.py --workers 4 \
    --deadline "$(( ${PIPELINE_LIMIT:-170} - 15 ))" --out "$OUT/pipeline_cuda.json"
