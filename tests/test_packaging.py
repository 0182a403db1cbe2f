"""The wheel carries passes/ and backends/ inside qcompile; importing qcompile stays light."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_passes_and_backends(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("qcompile_llm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in [
        "qcompile/__init__.py",
        "qcompile/formats/__init__.py",
        "qcompile/passes/__init__.py",
        "qcompile/passes/quantize.py",
        "qcompile/passes/cleanup.py",
        "qcompile/backends/__init__.py",
        "qcompile/backends/reference.py",
        "qcompile/data/wikitext-2/test.txt",
        "qcompile/data/wikitext-2/valid.txt",
    ]:
        assert expected in names, expected
    assert not any(n.startswith(("passes/", "backends/", "tests/")) for n in names)
    meta = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    assert "qcompile = qcompile.cli:main" in entry_points


def test_import_is_light():
    code = (
        "import sys, qcompile, qcompile.pipeline, qcompile.recipes;"
        "heavy = [m for m in ('triton', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_installed_package_resolves_passes_and_backends():
    import qcompile.backends.reference as ref
    import qcompile.passes.quantize as q

    assert Path(q.__file__).resolve() == ROOT / "passes" / "quantize.py"
    assert Path(ref.__file__).resolve() == ROOT / "backends" / "reference.py"
