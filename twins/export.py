"""Export with dynamic batch and image sizes: `torch.export` programs and ONNX files.

One exported graph serves every batch size and every height and width from `MIN_SIZE` to the
given maximum. The window attention of SVT has a form for symbolic sizes with no branch on
them (`LocallyGroupedAttention._forward_symbolic`); without it an exported SVT ran only at
input sizes that pad (or do not pad) the same stages and give the same stages a single window.

Below 64 pixels a side the last stage's convolutions would give maps of a single row or
column, and PyTorch's convolution decides its output layout by a guard on that, so dynamic
exports start at 64 (the models themselves run from 32).
"""
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoint import write_atomic

MIN_SIZE = 64
# The example batch the graph is traced with: PyTorch specialises a dynamic size whose example
# is 1, so the traced batch is 2 (the exported graph takes any batch).
_TRACE_BATCH = 2


class Pyramid(nn.Module):
    """`model.forward_pyramid` as a module's forward, for exporting a dense-prediction backbone."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.model = model
        self.out_indices = tuple(out_indices)
        self.in_chans = model.in_chans

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_pyramid(x, self.out_indices)


def _example(model: nn.Module, img_size: Tuple[int, int], min_size: int, max_size: int
             ) -> torch.Tensor:
    if min_size < MIN_SIZE:
        raise ValueError(f"dynamic exports take inputs of at least {MIN_SIZE} pixels a side, "
                         f"got min_size={min_size}")
    if not all(min_size <= s <= max_size for s in img_size):
        raise ValueError(f"the example size {img_size[0]}x{img_size[1]} must lie within "
                         f"{min_size}..{max_size}")
    param = next(model.parameters())
    return torch.randn(_TRACE_BATCH, model.in_chans, *img_size, device=param.device,
                       dtype=param.dtype)


def export_program(model: nn.Module, img_size: Tuple[int, int] = (224, 224), *,
                   min_size: int = MIN_SIZE, max_size: int = 4096,
                   max_batch: int = 1024) -> torch.export.ExportedProgram:
    """`torch.export` of `model` in eval mode with dynamic batch, height and width.

    Args:
        model: a Twins model, or `Pyramid(model)` for the stage maps.
        img_size: (H, W) of the example traced; any size in range works afterwards.
        min_size, max_size: the range of H and W the program accepts.
        max_batch: the largest batch it accepts.
    """
    model.eval()
    example = _example(model, img_size, min_size, max_size)
    Dim = torch.export.Dim
    dims = {0: Dim("batch", min=1, max=max_batch), 2: Dim("height", min=min_size, max=max_size),
            3: Dim("width", min=min_size, max=max_size)}
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=(dims,))


def export_onnx(model: nn.Module, path: Union[str, os.PathLike],
                img_size: Tuple[int, int] = (224, 224), *, min_size: int = MIN_SIZE,
                max_size: int = 4096, output_names: Optional[Sequence[str]] = None) -> Path:
    """Write `model` as an ONNX file with dynamic batch, height and width (input "images"),
    atomically (`checkpoint.write_atomic`: a failed export leaves no partial file). Returns
    the path."""
    program = export_program(model, img_size, min_size=min_size, max_size=max_size)
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, input_names=["images"],
                                     output_names=list(output_names) if output_names else None)
    path = Path(path)
    # One file: every Twins model is far below ONNX's 2 GB limit for inline weights.
    write_atomic(path, lambda f: onnx_program.save(f, external_data=False))
    return path
