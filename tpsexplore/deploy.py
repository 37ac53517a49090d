"""Deployable forms of a (token-reduced) timm ViT or hierarchical backbone (PVT v1/v2, CvT, Swin): ONNX,
torch.export (.pt2), TorchScript and torch.compile.

Every reduction in `tpsexplore.reduce` has constant shapes at inference: its token counts are Python ints fixed
by the token schedule, so an exported graph is static except, when asked, for the batch dimension.

- ONNX: torch's torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``), opset 18 by default (17
  only where the exporter can convert the model down; otherwise refused with one line), one file with the
  weights inside, checked by ``onnx.checker``. While it traces, the reduction ops switch to forms that have ONNX
  equivalents (a TopK with a constant K instead of argsort, a matmul instead of cdist); eager numbers and speed
  are unchanged.
- pt2: ``torch.export.export`` + ``torch.export.save``; TorchScript: ``torch.jit.trace`` (deprecated by PyTorch).
- `compile_model`: ``torch.compile(model, fullgraph=True)``.

Exports run in eval mode with source tracking off; the model's mode, options and ``last_info`` are restored after.
Files are written atomically (`tpsexplore.manifest.atomic_write`). Bottom layer: imports `tpsexplore.manifest`
and torch, and onnx/onnxruntime lazily (the ``deploy`` extra); the model is any timm VisionTransformer or
hierarchical backbone, reduced by `tpsexplore.reduce.apply` or not (`input_shape` reads its image size).
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .manifest import atomic_write

FORMATS = ("onnx", "pt2", "torchscript")
MIN_OPSET = 17
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXAMPLE_BATCH = 2  # the batch a dynamic-batch export traces with (1 would let the exporter specialise on it)
_PROTO_LIMIT = 2**31 - 1  # protobuf's 2 GB: larger ONNX models need external data files


# ----------------------------------------------------------------------------- inputs and checks
def check_batch_size(batch_size: int | None) -> int | None:
    """``batch_size`` as given, or ValueError: a positive integer, or None for a dynamic batch."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not a positive integer (or None for a dynamic batch)")
    return batch_size


def example_input(model: nn.Module, batch_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """A seeded random image batch (B, C, H, W) of the model's input geometry, on its device and dtype.

    B is ``batch_size``, or `EXAMPLE_BATCH` for a dynamic-batch export.
    """
    channels, height, width = input_shape(model)
    ref = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(check_batch_size(batch_size) or EXAMPLE_BATCH, channels, height, width, generator=g)
    return x.to(device=ref.device, dtype=ref.dtype)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images ``model`` takes: a timm ViT's or Swin's patch embedding, PVT v1 / CvT's own
    ``in_chans`` and ``img_size``, else the ``pretrained_cfg`` input size (PVT v2, set by
    `tpsexplore.backbones.build_timm_model`)."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None and hasattr(embed, "proj"):
        height, width = embed.img_size
        return int(embed.proj.in_channels), int(height), int(width)
    if getattr(model, "img_size", None) is not None and getattr(model, "in_chans", None) is not None:
        height, width = (model.img_size, model.img_size) if isinstance(model.img_size, int) else model.img_size
        return int(model.in_chans), int(height), int(width)
    channels, height, width = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    return int(channels), int(height), int(width)


def _batch_dim(batch_size: int | None) -> tuple[dict[int, Any], ...] | None:
    """torch.export dynamic_shapes for the one image argument: dimension 0 free when the batch is dynamic."""
    if batch_size is not None:
        return None
    return ({0: torch.export.Dim("batch", min=1)},)


@contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no source tracking while exporting; mode, options and ``last_info`` restored after.

    Tracing runs the forward with symbolic tensors, which would otherwise be left in ``last_info``.
    """
    was_training = model.training
    options = getattr(model, "tps_options", None)
    had_info = "tps_last_info" in model.__dict__
    info = model.__dict__.get("tps_last_info")
    tracking = options.get("track_sources", False) if options is not None else False
    model.eval()
    if options is not None:
        options["track_sources"] = False
    try:
        yield model
    finally:
        model.train(was_training)
        if options is not None:  # the same dict object: torch.export swaps module attributes for copies
            options["track_sources"] = tracking
            model.tps_options = options
        if had_info:
            model.tps_last_info = info
        elif "tps_last_info" in model.__dict__:
            del model.tps_last_info


def _metadata(model: nn.Module, batch_size: int | None) -> dict[str, str]:
    """What an exported file records about itself: the reduction config and the batch size."""
    config = getattr(model, "tps_config", None)
    backbone = getattr(getattr(model, "tps_backbone", None), "timm_name", None) or \
        getattr(model, "default_cfg", {}).get("architecture", "")
    return {
        "tpsexplore.reduction": config.to_json() if config is not None else "{}",
        "tpsexplore.label": config.label if config is not None else "baseline",
        "tpsexplore.backbone": str(backbone or ""),
        "tpsexplore.batch_size": "dynamic" if batch_size is None else str(batch_size),
    }


# ----------------------------------------------------------------------------- torch.export
def export_program(model: nn.Module, batch_size: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the model in eval mode; ``batch_size=None`` leaves the batch dynamic."""
    batch_size = check_batch_size(batch_size)
    with export_mode(model), torch.no_grad():
        return torch.export.export(model, (example_input(model, batch_size),), dynamic_shapes=_batch_dim(batch_size))


def export_pt2(model: nn.Module, path: str | Path, *, batch_size: int | None = None) -> Path:
    """Write the model as a torch.export program (``torch.export.save``, load with `load_pt2`); returns ``path``.

    The file carries ``tpsexplore.json`` (the reduction config and batch size) as an extra file.
    """
    import json

    program = export_program(model, batch_size)
    extra = {"tpsexplore.json": json.dumps(_metadata(model, batch_size))}
    return atomic_write(path, lambda f: torch.export.save(program, f, extra_files=extra))


def load_pt2(path: str | Path) -> torch.export.ExportedProgram:
    """An exported program written by `export_pt2`; ``load_pt2(p).module()`` is callable on images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    return torch.export.load(path)


# ----------------------------------------------------------------------------- ONNX
def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset: {opset!r} is not supported; allowed: an integer >= {MIN_OPSET}")
    return opset


def onnx_model(model: nn.Module, *, batch_size: int | None = None, opset: int = DEFAULT_OPSET,
               optimize: bool = True):
    """The model as an ``onnx.ModelProto`` through the torch.export-based exporter, checked by onnx.checker.

    Input ``images`` (B, C, H, W) and output ``logits``; B is named ``batch`` when ``batch_size`` is None.
    """
    import onnx

    batch_size = check_batch_size(batch_size)
    check_opset(opset)
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # exporter-internal deprecations
        with _quiet():
            program = torch.onnx.export(
                model, (example_input(model, batch_size),), None, dynamo=True, opset_version=opset,
                dynamic_shapes=_batch_dim(batch_size), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                optimize=optimize, external_data=False)
    proto = program.model_proto
    written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:  # the exporter writes 18 natively and keeps 18 when converting down fails
        raise ValueError(f"opset: {opset} could not be written for this model (the exporter writes {written} and "
                         f"could not convert it down); use {written} or later")
    for key, value in _metadata(model, batch_size).items():
        proto.metadata_props.add(key=key, value=value)
    if proto.ByteSize() > _PROTO_LIMIT:
        raise ValueError(f"model: {proto.ByteSize() / 2**30:.1f} GiB is over ONNX's 2 GiB single-file limit")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module, path: str | Path, *, batch_size: int | None = None, opset: int = DEFAULT_OPSET,
                optimize: bool = True) -> Path:
    """Write the model as one ONNX file (weights inside, opset >= 17, onnx.checker passed); returns ``path``.

    ``batch_size=None`` gives a dynamic batch dimension; an integer fixes it (every shape is then static).
    """
    proto = onnx_model(model, batch_size=batch_size, opset=opset, optimize=optimize)
    return atomic_write(path, proto.SerializeToString())


def onnxruntime_session(path: str | Path, *, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime InferenceSession for ``path``: all graph optimisations on, ``threads`` intra-op threads
    (None: onnxruntime's default), ``providers`` (None: every available one, in onnxruntime's order)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: {threads!r} is not a positive integer")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=providers or ort.get_available_providers())


def run_onnx(session, images: torch.Tensor) -> torch.Tensor:
    """Logits from an onnxruntime session for an image batch (a CPU float tensor comes back)."""
    name = session.get_inputs()[0].name
    out = session.run(None, {name: images.detach().to("cpu", torch.float32).numpy()})[0]
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- TorchScript and compile
def export_torchscript(model: nn.Module, path: str | Path, *, batch_size: int = 1) -> Path:
    """Write a traced TorchScript module (``torch.jit.trace``, deprecated by PyTorch but still loadable with
    ``torch.jit.load``). The trace is taken at ``batch_size``; the reduction's token counts are constants in it."""
    batch_size = check_batch_size(batch_size) or 1
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
        traced = torch.jit.trace(model, (example_input(model, batch_size),), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files=_metadata(model, batch_size))
    return atomic_write(path, buf.getvalue())


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model, fullgraph=True)`` in eval mode: the whole reduced forward is one graph, so a
    graph break raises instead of silently running pieces eagerly. ``options`` go to torch.compile."""
    model.eval()
    return torch.compile(model, fullgraph=True, **options)


def export_model(model: nn.Module, path: str | Path, format: str, *, batch_size: int | None = None,
                 opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` in ``format`` (onnx, pt2 or torchscript) to ``path``; returns ``path``.

    TorchScript needs a fixed batch size (1 when None).
    """
    if format == "onnx":
        return export_onnx(model, path, batch_size=batch_size, opset=opset)
    if format == "pt2":
        return export_pt2(model, path, batch_size=batch_size)
    if format == "torchscript":
        return export_torchscript(model, path, batch_size=batch_size or 1)
    raise ValueError(f"format: {format!r} is not supported; allowed: {', '.join(FORMATS)}")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the ONNX exporter's progress lines on stdout (printed unconditionally) and its converters' log
    records below ERROR (a failed down-conversion is reported by `onnx_model` as one line instead)."""
    import contextlib
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
