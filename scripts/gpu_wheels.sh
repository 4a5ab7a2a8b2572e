#!/usr/bin/env bash
# Wheels of the Python packages moelora needs that the GPU machine's image lacks, into .whl/ (git
# ignores it). The device tool carries that folder to a machine without network, which installs
# them with pip --no-index (BENCHMARKS.md, "GPU check"). Versions: those installed here, where the
# tests pass. The image has torch, transformers, peft, accelerate, tokenizers, safetensors,
# tensorboard and matplotlib (python 3.12, x86-64); see /work/.library/device/KINDS.md.
#
#   bash scripts/gpu_wheels.sh [PYTHON]      # from the repository root; PYTHON: the project's
set -euo pipefail
python=${1:-python3}
out=.whl
# On PyPI as wheels (bitsandbytes' holds its CUDA 13 library: 43 MB of the 64 MiB a call carries).
binary=(bitsandbytes datasets dill multiprocess hydra-core omegaconf hjson pydantic pydantic-core
  annotated-types typing-inspection typing-extensions)
# On PyPI as source only: built here into pure-Python wheels (DeepSpeed without prebuilt ops; the
# presets use torch's AdamW, so it compiles none).
source=(antlr4-python3-runtime deepspeed)

pins() {
  "$python" -c 'import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "$@"
}

rm -rf "$out" && mkdir -p "$out"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2046  # the pins are words
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$out" $(pins "${binary[@]}")
# shellcheck disable=SC2046
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" \
  $(pins "${source[@]}")
ls "$out"
du -sh "$out"
