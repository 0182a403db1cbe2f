#!/bin/bash
# Prepare, on this (CPU) machine, what a GPU device machine needs to run the project: the
# Python packages its image lacks or holds in another version, as wheels in .whl/ (ignored,
# carried with the device tool's `carry: [".whl"]`). The device has no network.
#
#   bash benchmarks/device_prep.sh            # once per machine; about 15 MB
#
# On the device, each call then starts with
#
#   bash benchmarks/device_setup.sh && export PYTHONPATH=/tmp/site
#
# which installs the wheels and this working tree (qcompile, with its torch.compile backend
# entry point) into /tmp/site. The device image's python is 3.12 with torch, triton,
# accelerate, safetensors, ml-dtypes and an older transformers; gguf and platformdirs are not
# there, and transformers is carried at the version this machine's tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
tf=$(python3 -c "import transformers; print(transformers.__version__)")
hub=$(python3 -c "import huggingface_hub; print(huggingface_hub.__version__)")
tok=$(python3 -c "import tokenizers; print(tokenizers.__version__)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "gguf>=0.10" platformdirs "transformers==$tf" "huggingface_hub==$hub" "tokenizers==$tok"
# The requirements of huggingface_hub (2.x imports httpx2 at `import transformers`) and of
# transformers (regex, typer, safetensors at versions the image may lack), with their
# dependencies; numpy and torch stay the image's.
reqs=$(python3 - <<'PY'
from importlib.metadata import requires
out = []
for dist in ("huggingface_hub", "transformers"):
    for r in requires(dist) or []:
        if "extra" in r or "python_version" in r:
            continue
        spec = r.split(";")[0].replace(" ", "")
        name = spec.split("<")[0].split(">")[0].split("=")[0].split("!")[0].lower()
        if name not in ("numpy", "torch", "huggingface-hub", "tokenizers"):
            out.append(spec)
print(" ".join(out))
PY
)
# shellcheck disable=SC2086  # one word per requirement
python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $reqs
ls -la .whl
du -sh .whl
