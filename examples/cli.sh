#!/usr/bin/env bash
# The command-line way: list recipes, quantize to an artifact, evaluate it.
set -euo pipefail
qcompile recipes
qcompile quantize --model smollm2-135m --recipe w4-afpq --out "${1:-out/smol-afpq}" --quiet
qcompile eval --model "${1:-out/smol-afpq}" --windows 8 --json
