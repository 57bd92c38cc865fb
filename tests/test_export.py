"""Export with dynamic sizes: one torch.export program or ONNX file for every batch and H, W."""
import functools
import os

import pytest
import torch

import twins
from twins.attention import LocallyGroupedAttention
from twins.export import MIN_SIZE, Pyramid, export_program

from conftest import load_module

# (batch, H, W) run through one exported graph. The micro models have 4x4 windows: 224 pads
# the last two stages on both sides; 128 pads nothing and leaves the last stage one window;
# 97x65 pads the third stage's height only and the last stage to a single window; 64x200 is
# the smallest height with a wide, padded grid.
SIZES = [(2, 224, 224), (1, 128, 128), (3, 97, 65), (1, 64, 200)]


@functools.lru_cache(maxsize=None)
def exported(name, pyramid=False):
    torch.manual_seed(0)
    model = twins.create_model(name, num_classes=0 if pyramid else 10).eval()
    model = Pyramid(model) if pyramid else model
    return model, export_program(model, max_size=1024)


@pytest.mark.parametrize("size", [(8, 8), (8, 6), (5, 8), (3, 2), (4, 4), (9, 13)])
@pytest.mark.parametrize("batch", [1, 3])
def test_symbolic_window_attention_equals_the_plain_forward(size, batch):
    # The gather form taken for symbolic sizes, run here on plain sizes, against the pad,
    # permute and crop of the eager path: with and without padding, on one side or both, and
    # for a single window.
    torch.manual_seed(0)
    attn = LocallyGroupedAttention(dim=24, num_heads=3, window_size=4).eval()
    x = torch.randn(batch, size[0] * size[1], 24)
    with torch.no_grad():
        expected = attn(x, size)
        got = attn._forward_symbolic(x, size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["alt_gvt_micro", "pcpvt_micro"])
def test_exported_program_runs_at_every_size(name):
    model, program = exported(name)
    module = program.module()
    for batch, h, w in SIZES:
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), rtol=0, atol=1e-5)
    # The program holds no assertion that some sizes would fail at run time.
    assert not [n for n in program.graph.nodes if "assert" in str(n.target)]


def test_exported_pyramid_gives_every_stage_map():
    model, program = exported("alt_gvt_micro", pyramid=True)
    module = program.module()
    for batch, h, w in SIZES[2:]:
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            expected = model(x)
            got = module(x)
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-4)


def test_export_size_range_errors():
    model = twins.create_model("pcpvt_micro")
    with pytest.raises(ValueError, match=f"at least {MIN_SIZE}"):
        export_program(model, min_size=32)
    with pytest.raises(ValueError, match="must lie within"):
        export_program(model, img_size=(224, 2000), max_size=1024)


def test_export_onnx_tool_writes_a_file_onnxruntime_agrees_with(tmp_path):
    tool = load_module("tools/export_onnx.py")
    output = tmp_path / "svt.onnx"
    errors = tool.main(["--model", "alt_gvt_micro", "--output", str(output), "--img-size", "128x160",
                        "--check", "97x65", "224"])
    assert output.is_file() and os.listdir(tmp_path) == ["svt.onnx"]  # no temporary left
    assert len(errors) == 2 and max(errors) < 1e-5

    import onnx
    graph = onnx.load(str(output)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "images" and graph.output[0].name == "logits"
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))


def test_export_onnx_tool_errors(tmp_path):
    tool = load_module("tools/export_onnx.py")
    output = str(tmp_path / "m.onnx")
    with pytest.raises(SystemExit, match="does not exist"):
        tool.main(["--model", "alt_gvt_micro", "--checkpoint", str(tmp_path / "none.pth"),
                   "--output", output])
    with pytest.raises(SystemExit, match="alt_gvt_small"):  # the message lists the names
        tool.main(["--model", "alt_gvt_smal", "--output", output])
    with pytest.raises(SystemExit, match="does not exist"):
        tool.main(["--model", "alt_gvt_micro", "--output", str(tmp_path / "no" / "m.onnx")])
    with pytest.raises(SystemExit, match="must lie within"):
        tool.main(["--model", "alt_gvt_micro", "--output", output, "--img-size", "5000"])
    assert os.listdir(tmp_path) == []
