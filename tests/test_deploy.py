"""Exported forms of every reduction (issue 10, part 3), on real models: ONNX run by onnxruntime, torch.export,
TorchScript and torch.compile(fullgraph=True). No mocks: real exporters, real onnxruntime sessions, real Dynamo.

What the default run covers, on a random-init DeiT-Tiny with 32-px images and 8-px patches (16 patch tokens,
2 blocks, two chained reduction stages at blocks 0 and 1; ToMe r=3 in both blocks):

- every registered method x every treatment it allows (`VARIANTS`, built from the registry, so a new method or
  treatment is covered by itself), plus similarity's 'pre' placement and its diversity-aware selection:
  ONNX (opset 18) with a dynamic batch: exported at batch 2, onnx.checker passes, every TopK has a constant K,
  no data-dependent ops; onnxruntime logits at batch 1 and 3 match the eager patched model to 1e-4;
- `CORE`: each method's own treatment plus similarity's 'pre' placement and diversity (every code path: the
  other variants only recombine a policy and a treatment covered here):
  * ONNX with a fixed batch (every shape static);
  * torch.export with a dynamic batch, saved and loaded: matches eager to 1e-5 at batch 2 and 3;
  * torch.compile(fullgraph=True) graph capture: one graph, no recompilation over repeated calls at one batch
    size, outputs equal to eager, `last_info` still right (Dynamo's "eager" backend: capture is what can fail);
  * a TorchScript trace;
- torch.compile with inductor (the default backend) for ToMe;
- opset 17 is written when the exporter can convert down, and refused with one line when it cannot;
- the ops the ONNX path swaps in give the eager values (eager outputs themselves are pinned by test_reduce.py).

Slow (``pytest -m slow tests/test_deploy.py``, ~6 more minutes): fixed-batch ONNX, torch.export and
torch.compile capture for the other variants, inductor for every method, and ONNX parity on DeiT-S (224 px, random init) for eTPS, EViT, Top-K (keep 0.7 at [3,6,9]) and
ToMe (r=13) with a dynamic batch.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from tpsexplore import ReductionConfig, create_backbone  # noqa: E402
from tpsexplore import deploy  # noqa: E402
from tpsexplore.reduce import apply, last_info, ops, token_schedule, track_sources  # noqa: E402
from tpsexplore.reduce.methods import METHODS  # noqa: E402

TINY = dict(img_size=32, patch_size=8, num_classes=10, depth=2)
LOCATIONS = (0, 1)
ONNX_TOL = 1e-4
PT2_TOL = 1e-5
DATA_DEPENDENT_OPS = {"NonZero", "Loop", "If", "Scan", "Unique", "Compress"}


def representative(method: str, treatment: str | None = None, **kw) -> ReductionConfig:
    """The config each method is exported at: keep 0.7 at blocks 0 and 1, ToMe r=3 in every block."""
    if METHODS[method].policy == "merge":
        return ReductionConfig(method, r=3)
    if method == "similarity":
        kw.setdefault("similarity_placement", "layerwise")
    return ReductionConfig(method, LOCATIONS, (0.7,), treatment=treatment, **kw)


VARIANTS = {f"{m}+{t}": representative(m, t) for m, spec in METHODS.items() for t in spec.treatments}
VARIANTS["similarity+drop@pre"] = ReductionConfig("similarity", (0,), (0.7,))  # the default placement
VARIANTS["similarity+drop+diversity"] = representative("similarity", "drop", diversity=0.5)
OWN = [f"{m}+{spec.treatment}" for m, spec in METHODS.items()]  # each method's own treatment
CORE = OWN + ["similarity+drop@pre", "similarity+drop+diversity"]
OTHER = [n for n in VARIANTS if n not in CORE]
INDUCTOR_DEFAULT = ("tome+merge",)  # inductor (slow to compile) in the default run; every method under `slow`


def test_variants_cover_every_method_and_treatment():
    combos = {(c.method, c.effective_treatment) for c in VARIANTS.values()}
    assert combos == {(m, t) for m, spec in METHODS.items() for t in spec.treatments}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone("deit_t", weights="random", **TINY).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return {b: torch.randn(b, 3, 32, 32, generator=g) for b in (1, 2, 3)}


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def reduced(model, config):
    apply(model, config)
    return model


def eager(model, x):
    with torch.no_grad():
        return model(x)


def check_graph(proto, dynamic: bool) -> None:
    """opset >= 17, constant TopK K (TensorRT needs it), no data-dependent ops, the batch dim as asked."""
    graph = proto.graph
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= deploy.MIN_OPSET
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    topk = [n for n in graph.node if n.op_type == "TopK"]
    assert topk and all(n.input[1] in constants for n in topk)
    assert not DATA_DEPENDENT_OPS & {n.op_type for n in graph.node}
    (inp,), (out,) = graph.input, graph.output
    assert inp.name == deploy.INPUT_NAME and out.name == deploy.OUTPUT_NAME
    dims = inp.type.tensor_type.shape.dim
    if dynamic:
        assert dims[0].dim_param and not dims[0].HasField("dim_value")
    else:
        assert all(d.HasField("dim_value") for d in dims)
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_dynamic_batch_matches_eager(tiny, images, tmp_path, name):
    model = reduced(tiny, VARIANTS[name])
    path = deploy.export_onnx(model, tmp_path / "m.onnx", batch_size=None)
    proto = onnx.load(path)
    check_graph(proto, dynamic=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ReductionConfig.from_json(meta["tpsexplore.reduction"]) == VARIANTS[name]
    assert meta["tpsexplore.batch_size"] == "dynamic"
    session = deploy.onnxruntime_session(path, threads=1)
    for b in (1, 3):  # exported at batch 2
        got = deploy.run_onnx(session, images[b])
        assert got.shape == (b, 10)
        torch.testing.assert_close(got, eager(model, images[b]), atol=ONNX_TOL, rtol=0)


def _fixed_batch(tiny, images, tmp_path, name):
    model = reduced(tiny, VARIANTS[name])
    path = deploy.export_onnx(model, tmp_path / "m.onnx", batch_size=3)
    proto = onnx.load(path)
    check_graph(proto, dynamic=False)
    session = deploy.onnxruntime_session(path, threads=1)
    torch.testing.assert_close(deploy.run_onnx(session, images[3]), eager(model, images[3]), atol=ONNX_TOL, rtol=0)


@pytest.mark.parametrize("name", CORE)
def test_onnx_fixed_batch_matches_eager(tiny, images, tmp_path, name):
    _fixed_batch(tiny, images, tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER)
def test_onnx_fixed_batch_matches_eager_other_variants(tiny, images, tmp_path, name):
    _fixed_batch(tiny, images, tmp_path, name)


def test_onnx_opset_17_is_written_or_refused(tiny, images, tmp_path):
    """The exporter writes opset 18; 17 needs a down-conversion, which must never silently give 18."""
    base = create_backbone("deit_t", weights="random", **TINY).eval()
    path = deploy.export_onnx(base, tmp_path / "base.onnx", batch_size=1, opset=17)
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [17]
    session = deploy.onnxruntime_session(path, threads=1)
    torch.testing.assert_close(deploy.run_onnx(session, images[1]), eager(base, images[1]), atol=ONNX_TOL, rtol=0)
    model = reduced(tiny, VARIANTS["topk+drop"])
    try:
        path = deploy.export_onnx(model, tmp_path / "m.onnx", batch_size=1, opset=17)
    except ValueError as exc:
        assert str(exc).startswith("opset: 17 could not be written") and "\n" not in str(exc)
        assert not (tmp_path / "m.onnx").exists()
    else:
        assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [17]


# ----------------------------------------------------------------------------- torch.export
def _pt2(tiny, images, tmp_path, name):
    model = reduced(tiny, VARIANTS[name])
    path = deploy.export_pt2(model, tmp_path / "m.pt2", batch_size=None)
    program = deploy.load_pt2(path).module()
    for b in (2, 3):
        with torch.no_grad():
            got = program(images[b])
        torch.testing.assert_close(got, eager(model, images[b]), atol=PT2_TOL, rtol=0)


@pytest.mark.parametrize("name", CORE)
def test_pt2_dynamic_batch_matches_eager(tiny, images, tmp_path, name):
    _pt2(tiny, images, tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER)
def test_pt2_dynamic_batch_matches_eager_other_variants(tiny, images, tmp_path, name):
    _pt2(tiny, images, tmp_path, name)


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", CORE)
def test_torchscript_trace_matches_eager(tiny, images, tmp_path, name):
    model = reduced(tiny, VARIANTS[name])
    path = deploy.export_torchscript(model, tmp_path / "m.ts", batch_size=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        traced = torch.jit.load(str(path))
    with torch.no_grad():
        got = traced(images[2])
    torch.testing.assert_close(got, eager(model, images[2]), atol=PT2_TOL, rtol=0)


# ----------------------------------------------------------------------------- torch.compile
class CountingBackend:
    """A Dynamo backend that counts the graphs it is handed and runs them as captured."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _capture(tiny, images, name):
    config = VARIANTS[name]
    model = reduced(tiny, config)
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = deploy.compile_model(model, backend=backend)
    with torch.no_grad():
        first = compiled(images[2])
        with torch.compiler.set_stance("fail_on_recompile"):  # a recompile raises here
            for _ in range(3):
                again = compiled(images[2].clone())
    assert backend.graphs == 1
    assert torch.equal(first, again)
    torch.testing.assert_close(first, eager(model, images[2]), atol=PT2_TOL, rtol=0)
    sched = token_schedule(config, num_patches=16, num_prefix=1, depth=TINY["depth"])
    compiled(images[2])
    assert last_info(model).token_counts == list(sched.blocks)  # bookkeeping survives compilation
    torch._dynamo.reset()


@pytest.mark.parametrize("name", CORE)
def test_compile_fullgraph_captures_once(tiny, images, name):
    _capture(tiny, images, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER)
def test_compile_fullgraph_captures_once_other_variants(tiny, images, name):
    _capture(tiny, images, name)


def _inductor(tiny, images, name):
    model = reduced(tiny, VARIANTS[name])
    torch._dynamo.reset()
    compiled = deploy.compile_model(model)  # the default backend, inductor
    with torch.no_grad():
        first = compiled(images[2])
        with torch.compiler.set_stance("fail_on_recompile"):
            again = compiled(images[2].clone())
    torch.testing.assert_close(first, eager(model, images[2]), atol=ONNX_TOL, rtol=0)
    assert torch.equal(first, again)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", INDUCTOR_DEFAULT)
def test_compile_inductor(tiny, images, name):
    _inductor(tiny, images, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in OWN if n not in INDUCTOR_DEFAULT])
def test_compile_inductor_other_methods(tiny, images, name):
    _inductor(tiny, images, name)


# ----------------------------------------------------------------------------- DeiT-S
DEIT_S = {"tome": ReductionConfig("tome", r=13), **{m: ReductionConfig(m, (3, 6, 9), (0.7,))
                                                      for m in ("etps", "evit", "topk")}}


@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    return create_backbone("deit_s", weights="random").eval()


def _deit_s_onnx(deit_s, tmp_path, method):
    model = reduced(deit_s, DEIT_S[method])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    path = deploy.export_onnx(model, tmp_path / "s.onnx", batch_size=None)
    session = deploy.onnxruntime_session(path)
    torch.testing.assert_close(deploy.run_onnx(session, x), eager(model, x), atol=ONNX_TOL, rtol=0)
    assert last_info(model).token_counts == list(token_schedule(DEIT_S[method]).blocks)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DEIT_S))
def test_deit_s_onnx(deit_s, tmp_path, method):
    _deit_s_onnx(deit_s, tmp_path, method)


# ----------------------------------------------------------------------------- the swapped ops
def test_onnx_forms_give_the_eager_values():
    g = torch.Generator().manual_seed(3)
    for batch, grid, k in [(2, 14, 35), (4, 4, 3), (3, 24, 100), (2, 7, 1)]:
        ids = torch.stack([torch.randperm(grid * grid, generator=g) for _ in range(batch)])
        coords = torch.stack([ids.div(grid, rounding_mode="floor"), ids.remainder(grid)], dim=-1).float()
        assert torch.equal(ops.nearest_distance_matmul(coords, coords[:, :k]),
                           torch.cdist(coords, coords[:, :k]).amin(dim=-1))
    scores = torch.randn(4, 50, generator=g)
    assert torch.equal(ops.descending_order(scores), scores.argsort(dim=-1, descending=True))
    assert torch.equal(scores.topk(50, dim=-1).indices, scores.argsort(dim=-1, descending=True))  # no ties
    idx = torch.stack([torch.randperm(30, generator=g) for _ in range(3)]).unsqueeze(-1)
    assert torch.equal(ops.ascending_indices(idx), idx.topk(30, dim=1, largest=False).values)


# ----------------------------------------------------------------------------- the API around the exports
def test_export_keeps_the_model_state(tiny, images, tmp_path):
    model = reduced(tiny, VARIANTS["evit+fuse"])
    eager(model, images[3])
    info = last_info(model)
    model.train()
    with track_sources(model):
        deploy.export_pt2(model, tmp_path / "m.pt2", batch_size=2)
        assert model.training and model.tps_options["track_sources"]
    assert last_info(model) is info  # not the tracer's symbolic tensors
    model.eval()


def test_export_writes_atomically_and_refuses_bad_input(tiny, tmp_path):
    model = reduced(tiny, VARIANTS["topk+drop"])
    target = tmp_path / "m.pt2"
    target.write_bytes(b"old")
    for bad, match in [(dict(batch_size=0), "batch_size: 0"), (dict(batch_size=2.0), "batch_size: 2.0"),
                       (dict(opset=16), "opset: 16")]:
        with pytest.raises(ValueError, match=match):
            deploy.export_model(model, target, "onnx", **bad)
    with pytest.raises(ValueError, match="format: 'tflite'"):
        deploy.export_model(model, target, "tflite")
    assert target.read_bytes() == b"old"  # refused before anything was written
    deploy.export_model(model, target, "pt2", batch_size=1)
    assert target.stat().st_size > 1000 and os.listdir(tmp_path) == ["m.pt2"]  # replaced, no temp files left
    with pytest.raises(FileNotFoundError, match="path: "):
        deploy.onnxruntime_session(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="path: "):
        deploy.load_pt2(tmp_path / "missing.pt2")


def test_pt2_records_the_config(tiny, tmp_path):
    model = reduced(tiny, VARIANTS["tome+merge"])
    path = deploy.export_pt2(model, tmp_path / "m.pt2", batch_size=4)
    extra = {"tpsexplore.json": ""}
    torch.export.load(path, extra_files=extra)
    meta = json.loads(extra["tpsexplore.json"])
    assert meta["tpsexplore.label"] == "tome r3" and meta["tpsexplore.batch_size"] == "4"
    assert math.isclose(json.loads(meta["tpsexplore.reduction"])["r"], 3)
