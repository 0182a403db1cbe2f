#!/bin/bash
# On a GPU device machine (no network): install the wheels that benchmarks/device_prep.sh put
# in .whl/ and this working tree into /tmp/site. Use: bash benchmarks/device_setup.sh &&
# export PYTHONPATH=/tmp/site
set -eu
cd "$(dirname "$0")/.."
py=${PY:-python3}
if ls .whl/*.whl > /dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
# --no-build-isolation: the image's setuptools builds it (nothing can be fetched there).
$py -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .
# From /tmp: in the repository root, ``import qcompile`` would find the source folder, which
# lacks the qcompile.backends / qcompile.passes mapping of the installed package.
(cd /tmp && PYTHONPATH=/tmp/site $py -c "import qcompile.backends.triton, transformers, triton, torch; print('qcompile', qcompile.backends.triton.__file__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'torch', torch.__version__)")
