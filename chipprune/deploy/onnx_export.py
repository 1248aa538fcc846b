"""Export to ONNX with torch's exporter (the torch.export-based one, torch's default since
2.9; the TorchScript exporter is deprecated), and the parity check against PyTorch.

The graph takes what the PyTorch model takes: float32 images already normalised, (N, C, H, W)
with N dynamic; the normalisation is written into the file's metadata (`normalise_mean`,
`normalise_std`, per channel on the 0-1 scale) so a deployer can reproduce it.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "images", "logits"
OPSET = 18  # the exporter's own default opset at torch 2.9+


class ExportError(RuntimeError):
    """The model could not be exported (the message names the failing op where torch does)."""


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: str | Path,
                metadata: Mapping[str, str] = ()) -> None:
    """Write `model` (eval mode, float32, CPU) as ONNX at `path`, batch dimension dynamic.
    The caller writes `path` atomically (a temporary folder or file it then moves)."""
    model = model.eval()
    example = (torch.zeros(2, *input_shape),)  # 2, not 1: a batch of 1 specialises N
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(
                model, example, dynamo=True, opset_version=OPSET,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
    except Exception as e:  # torch.export / onnxscript errors name the op that failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {first}") from e
    for key, value in dict(metadata).items():
        program.model.metadata_props[key] = str(value)
    program.save(str(path))


def normalisation_metadata(mean: list[float], std: list[float]) -> dict[str, str]:
    return {"normalise_mean": json.dumps(mean), "normalise_std": json.dumps(std)}


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float  # max |logit_onnx - logit_torch| over the images and classes
    max_abs_logit: float  # the scale the difference is held against
    top1_agreement: float  # fraction of images whose argmax agrees

    def within(self, tolerance: float) -> bool:
        """max |difference| <= tolerance * max(1, max |logit|): absolute for logits of
        order one, relative for large ones."""
        return self.max_abs_diff <= tolerance * max(1.0, self.max_abs_logit)


@torch.no_grad()
def parity(model: nn.Module, session, images: torch.Tensor) -> Parity:
    """PyTorch against an ONNX Runtime session on the same float32 `images` (N, C, H, W)."""
    model = model.eval()
    ref = model(images).float().cpu().numpy()
    got = session.run([OUTPUT], {INPUT: images.float().cpu().numpy()})[0]
    if got.shape != ref.shape:
        raise ExportError(f"ONNX output shape {got.shape}, PyTorch {ref.shape}")
    return Parity(
        images=int(images.shape[0]),
        max_abs_diff=float(np.abs(got - ref).max()),
        max_abs_logit=float(np.abs(ref).max()),
        top1_agreement=float((got.argmax(1) == ref.argmax(1)).mean()),
    )
