"""Fast inference-only copies of descriptor networks (extraction, mining, evaluation).

Measured on a 2-core AMD EPYC (``bench/p1_speedup.py``, docs/design.md "Fast extraction"): for
MobileNetV3-L + NetVLAD at 480x640 ONNX Runtime is by far the fastest CPU path, then
``torch.compile`` (but ~35 s to compile, again after every weight change), then
BatchNorm folding + channels_last; ``torch.jit.freeze`` adds nothing over the latter.
VGG16 is compute-bound and gains less. So the default path is: fold BatchNorm, export
to ONNX in memory and run it with ONNX Runtime; without onnxruntime, or off the CPU,
fold BatchNorm and run channels_last in PyTorch. Every optimised copy is checked
against eager fp32 on an example batch and replaced by the eager copy if it disagrees.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnxruntime", "torch"]

# Largest |optimised - eager fp32| accepted on any descriptor element.
TOLERANCE = 1e-4
ONNX_OPSET = 17
# Input pixels per ONNX Runtime run (OnnxDescriptorNet): one 480x640 image.
RUN_PIXELS = 480 * 640


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval mode) with every Conv -> BatchNorm pair folded into one conv.

    Uses torch.fx tracing, so it also finds pairs that are not neighbours in an
    ``nn.Sequential`` (ResNet blocks); a network fx cannot trace is returned unfolded.
    """
    net = copy.deepcopy(net).eval().requires_grad_(False)
    try:
        return fuse(net, inplace=True)
    except Exception as exc:  # fx fails in many ways on dynamic control flow
        log.warning(
            "cannot trace %s for BatchNorm folding (%s); kept unfolded", type(net).__name__, exc
        )
        return net


def export_onnx(net: nn.Module, example: Tensor, f: str | os.PathLike | io.BytesIO) -> None:
    """Write ``net`` (eval mode) as ONNX (opset 17) to ``f``; batch, height and width are dynamic.

    Uses the TorchScript-based exporter: the torch.export-based one needs onnxscript,
    which the project does not depend on.
    """
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "descriptors": {0: "batch"}}
    with warnings.catch_warnings():
        # Deprecation notices of the TorchScript-based exporter: nothing a user can act on.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # nn.TransformerEncoderLayer's fused inference kernel has no ONNX form (BoQ uses it).
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                net.eval(),
                (example,),
                f,
                opset_version=ONNX_OPSET,
                input_names=["images"],
                output_names=["descriptors"],
                dynamic_axes=axes,
                dynamo=False,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


class OnnxDescriptorNet(nn.Module):
    """Runs an exported descriptor network (file or bytes) with ONNX Runtime on the CPU.

    Behaves like the network for extraction: ``net(images) -> descriptors`` (torch
    tensors, on the images' device), ``descriptor_dim``, ``eval()`` / ``train()``.

    ``threads`` (default: PyTorch's) parallelise over the batch, not inside operators: a
    batch is split into ``threads`` parts, each described by a single-threaded run
    (concurrent runs of one session are safe and release the GIL). Operator-level
    threads meet at a barrier after every operator, hundreds per MobileNetV3 forward,
    and wait there for any thread the OS preempted: on 2 busy cores the student ran 14 %
    faster split (interleaved A/B, 480x640, batch 8), the compute-bound teacher the same.
    Descriptors are identical either way. A batch smaller than ``threads`` leaves
    threads idle: describe batches of at least ``threads`` images.

    ``run_pixels``: each thread feeds its part in runs of at most this many input pixels
    (at least one image). One 480x640 image a run made the student and the teacher 17-18 %
    faster than a thread's 4 images in one run (interleaved, batch 8, 2 threads).
    """

    def __init__(
        self, model: str | os.PathLike | bytes, threads: int | None = None, run_pixels: int = RUN_PIXELS
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        self.run_pixels = run_pixels

        # Same thread budget as PyTorch, so backends compare (and share cores) fairly.
        self.threads = max(1, threads or torch.get_num_threads())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # each run on its caller's thread, see above
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model if isinstance(model, bytes) else os.fspath(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        dim = self.session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise ValueError(
                f"{model if not isinstance(model, bytes) else 'ONNX model'}: "
                f"descriptor size is not fixed (output shape {dim!r})"
            )
        self.descriptor_dim = dim
        self._pool: ThreadPoolExecutor | None = None  # created on the first split batch

    def _run(self, array: np.ndarray) -> np.ndarray:
        # Runs of at most ``run_pixels`` input pixels: a 480x640 image at a time keeps the
        # early layers' activations in cache, a batch of them does not.
        step = max(1, self.run_pixels // (array.shape[2] * array.shape[3]))
        parts = [self.session.run(None, {self.input_name: array[i : i + step]})[0] for i in range(0, len(array), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def forward(self, images: Tensor) -> Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        parts = min(self.threads, len(array))
        if parts <= 1:
            descriptors = self._run(array)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="onnxruntime")
            chunks = np.array_split(array, parts)  # contiguous views along the batch
            others = [self._pool.submit(self._run, chunk) for chunk in chunks[1:]]
            descriptors = np.concatenate([self._run(chunks[0]), *(f.result() for f in others)])
        return torch.from_numpy(descriptors).to(images.device)


class ChannelsLast(nn.Module):
    """Feeds ``body`` channels_last images: NHWC convolutions are much faster on CPU."""

    def __init__(self, body: nn.Module, descriptor_dim: int | None) -> None:
        super().__init__()
        self.body = body.to(memory_format=torch.channels_last)
        self.descriptor_dim = descriptor_dim

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images.contiguous(memory_format=torch.channels_last))


def _worth_onnxruntime(net: nn.Module) -> bool:
    """A CPU network with weights (a parameter-free one like RawPixels gains nothing)."""
    params = list(net.parameters())
    return bool(params) and all(t.device.type == "cpu" for t in (*params, *net.buffers()))


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def optimize_for_inference(
    net: nn.Module, example: Tensor | None = None, backend: Backend = "auto"
) -> nn.Module:
    """An inference-only copy of ``net`` (eval mode, no gradients) whose descriptors equal
    eager fp32 ones within ``TOLERANCE``; ``net`` itself is left untouched.

    ``example``: a batch of the images it will see (default: one random 224x224 image),
    used to export and to check the result. ``backend``: 'onnxruntime', 'torch' (fold
    BatchNorm + channels_last) or 'auto' (ONNX Runtime when installed and ``net`` has
    weights, all on the CPU). A network a backend cannot handle falls back, with a
    warning, to the next one and finally to a plain eval-mode copy.
    """
    if backend not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"backend={backend!r}: choose 'auto', 'onnxruntime' or 'torch'")
    if isinstance(net, OnnxDescriptorNet):  # already on the fast path
        return net
    eager = copy.deepcopy(net).eval().requires_grad_(False)
    device = next(iter(eager.parameters()), torch.empty(0)).device
    example = (torch.randn(1, 3, 224, 224) if example is None else example).to(device)
    reference = eager(example)
    dim = getattr(net, "descriptor_dim", None)
    folded = fold_batchnorm(eager)
    if backend == "auto":
        backend = (
            "onnxruntime" if _onnxruntime_available() and _worth_onnxruntime(eager) else "torch"
        )
    candidates: list[tuple[str, nn.Module]] = []
    if backend == "onnxruntime":
        try:
            buffer = io.BytesIO()
            export_onnx(folded, example, buffer)
            candidates.append(("onnxruntime", OnnxDescriptorNet(buffer.getvalue())))
        except Exception as exc:  # any export failure means "not exportable"
            warnings.warn(
                f"ONNX export of {type(net).__name__} failed ({str(exc).splitlines()[0]}); "
                "using PyTorch",
                stacklevel=2,
            )
    candidates.append(("torch", ChannelsLast(folded, dim)))
    for name, candidate in candidates:
        error = (candidate(example) - reference).abs().max().item()
        if error <= TOLERANCE:
            return candidate
        warnings.warn(
            f"{name} inference path differs from eager fp32 by {error:.2e} "
            f"(> {TOLERANCE}); not used",
            stacklevel=2,
        )
    return eager
