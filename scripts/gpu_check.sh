#!/usr/bin/env bash
# The one prepared device check (issue 14): on a machine with a CUDA GPU and its own PyTorch
# (no network), run the CUDA tests and `loramix bench` at a 1B-class shape, and write every result
# under $OUT (default: gpu-check/):
#   results.json   GPU, versions, the pytest summary line, and the three bench results
#   pytest.txt     the CUDA tests' output;   bench*.json  each bench's own JSON
# loramix runs from src/ without installing its dependencies: the machine's torch, transformers and
# peft are used as they are. Wheels for missing packages (the authors' `mixlora` for the bench
# baseline) travel in .whl/ and go to /tmp/site. Budget: about 8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

echo "== CUDA tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rfEs tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt"

# A 1B-class random Llama (hidden 2048, 16 layers, FFN 5632), batch 8 x 512, bf16 base, fp32 adapters.
SHAPE=(--device cuda --dtype bfloat16 --layers 16 --hidden 2048 --intermediate 5632 --heads 16 --kv-heads 16
       --vocab 32000 --batch 8 --seq-len 512 --rank 16 --experts 8 --top-k 2)
if [ "${GPU_CHECK_DRY_RUN:-}" = 1 ]; then  # the script's own logic, on a CPU, at a toy shape
    SHAPE=(--device cpu --dtype bfloat16 --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 4
           --vocab 256 --batch 2 --seq-len 32 --rank 4 --experts 4 --top-k 2)
fi
echo "== bench"
timeout 150 "$PY" -m loramix bench "${SHAPE[@]}" --steps 10 --warmup 3 \
    --variants peft-lora,loramix-lora,loramix-mixlora,loramix-mixlora-naive,authors-mixlora --json "$OUT/bench.json"
for n in 2 4; do
    echo "== bench --multi $n"
    timeout 90 "$PY" -m loramix bench "${SHAPE[@]}" --batch 4 --steps 6 --warmup 2 --multi "$n" --json "$OUT/bench-multi$n.json"
done

"$PY" - "$OUT" <<'PY'
import json, sys, platform
from pathlib import Path
out = Path(sys.argv[1])
import torch, transformers
try:
    import peft
    peft_version = peft.__version__
except ImportError:
    peft_version = None
lines = (out / "pytest.txt").read_text(errors="replace").strip().splitlines() if (out / "pytest.txt").exists() else []
result = {
    "gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None,
    "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "transformers": transformers.__version__, "peft": peft_version,
    "pytest_summary": lines[-1] if lines else None,
}
for name in ("bench", "bench-multi2", "bench-multi4"):
    path = out / f"{name}.json"
    result[name] = json.loads(path.read_text()) if path.exists() else None
(out / "results.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if not k.startswith("bench")}, indent=2))
PY
