"""The qcompile-domain ONNX functions against the PyTorch references, on ragged shapes.

Each function is wrapped in a one-node model and run by ORT and by ``onnx.reference``.
Weight dequantization must be bit-exact (same fp32 products as the reference); dynamic
activation quantize-dequantize must be bit-exact too (same fp32 divisions, roundings and
products); the Hadamard function matches the butterfly reference to 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("onnxruntime")

import onnx.reference  # noqa: E402
import onnxruntime as ort  # noqa: E402

from qcompile.backends.onnx.functions import (  # noqa: E402
    activation_function,
    dequant_weight_function,
    hadamard_function,
)
from qcompile.formats import fake_quantize, pack_codes, parse_format, quantize  # noqa: E402
from qcompile.hadamard import hadamard_transform  # noqa: E402
from qcompile.ops import dequantize_weight  # noqa: E402


def _model(fn: onnx.FunctionProto, inputs: dict[str, np.ndarray], out_dims: int,
           opset: int) -> onnx.ModelProto:
    vis = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                         list(v.shape)) for k, v in inputs.items()]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * out_dims)
    node = helper.make_node(fn.name, list(inputs), ["out"], domain="qcompile")
    del fn.opset_import[:]
    fn.opset_import.append(helper.make_opsetid("", opset))
    model = helper.make_model(helper.make_graph([node], "g", vis, [out]), functions=[fn],
                              opset_imports=[helper.make_opsetid("", opset),
                                             helper.make_opsetid("qcompile", 1)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (a,) = sess.run(None, feeds)
    (b,) = onnx.reference.ReferenceEvaluator(model).run(None, feeds)
    return a, b


WEIGHT_FORMATS = ["fp4_e2m1/g128", "fp4_e2m1/g128/asym", "nf4/g64", "nf4/g32/asym",
                  "fp4_e2m1/g64/po2", "fp4_e2m1/g128/m2", "mxfp4", "nvfp4", "int3/g128/asym",
                  "int2/g32", "int4/g128/m2", "fp8_e4m3/g64/asym", "fp6_e2m3/g32",
                  "int8/channel", "fp4_e2m1/tensor"]


@pytest.mark.parametrize("k", [576, 1000])
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_dequant_weight_function_is_bit_exact(fmt, k):
    spec = parse_format(fmt)
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(k)) * 0.05
    q = quantize(w, spec)
    packed = pack_codes(q.codes, spec.bits)
    expected = dequantize_weight(packed, q.scale, q.scale_neg, q.zero, q.outer, str(spec), k,
                                 torch.float32).numpy()
    feeds = {"packed": packed.numpy(), "scale": q.scale.numpy()}
    for name, t in (("scale_neg", q.scale_neg), ("zero", q.zero), ("outer", q.outer)):
        if t is not None:
            feeds[name] = t.numpy()
    fn = dequant_weight_function(spec, k, has_neg=q.scale_neg is not None,
                                 has_zero=q.zero is not None, has_outer=q.outer is not None)
    assert list(fn.input) == list(feeds)
    for got in _run_both(_model(fn, feeds, 2, 18), feeds):
        np.testing.assert_array_equal(got, expected)


ACT_FORMATS = ["int8/token", "fp8_e4m3/token", "fp8_e5m2/token", "int4/token/asym",
               "int4/token", "fp4_e2m1/token/asym", "fp4_e2m1/token", "nf4/g32",
               "nf4/g32/asym", "int8/g64/bf16", "fp4_e2m1/tensor", "int8/tensor",
               "fp3_e2m0/token", "fp6_e3m2/token/clip0.9"]


@pytest.mark.parametrize("fmt", ACT_FORMATS)
def test_activation_function_is_bit_exact(fmt):
    spec = parse_format(fmt)
    k = 192
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 0, :8] = torch.tensor([0.0, -0.0, 0.25, -0.75, 1.25, 2.5, -5.0, 3.0])  # ties on grids
    x[1, 1] = 0.0  # an all-zero token: scale 1
    expected = fake_quantize(x, spec).numpy()
    fn = activation_function(spec, k)
    feeds = {"x": x.numpy()}
    for got in _run_both(_model(fn, feeds, 3, 21), feeds):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("size, width", [(16, 64), (64, 64), (160, 160), (576, 576),
                                         (96, 192), (1536, 1536)])
def test_hadamard_function_matches_butterfly(size, width):
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(size))
    expected = hadamard_transform(x, size).numpy()
    fn = hadamard_function(size)
    feeds = {"x": x.numpy()}
    for got in _run_both(_model(fn, feeds, 3, 18), feeds):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_activation_function_rejects_formats_without_lowering():
    from qcompile.errors import FormatError

    with pytest.raises(FormatError, match="int8/token/po2 has no ONNX lowering"):
        activation_function(parse_format("int8/token/po2"), 64)
    with pytest.raises(FormatError, match="int4/g48 has no ONNX lowering for rows of 64"):
        activation_function(parse_format("int4/g48"), 64)
