"""Inference backends for a frozen :class:`Encoder`: the same (B, 3, H, W) -> (B, D) map, run faster.

``"eager"`` is the encoder itself (PyTorch, any device). ``"openvino"`` runs the encoder converted by
OpenVINO on the CPU in float32 (inference precision f32, one stream per thread, the batch split across
the streams); before its first output at a new image size it checks itself against the eager encoder on
the batch's first images and refuses (:class:`BackendUnavailableError`) beyond ``EXACT_TOLERANCE``.
``"auto"`` uses OpenVINO where the device is the CPU, the package is installed and the converted
encoder passes that check, and the eager encoder otherwise (with a warning when OpenVINO failed).
Every backend gives the eager float32 embeddings within ``EXACT_TOLERANCE``, so the choice is not part
of an embedding cache key.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from avalanche_dkvb.validation import check_positive_int

from .registry import Encoder

__all__ = [
    "BACKENDS",
    "EXACT_TOLERANCE",
    "BackendUnavailableError",
    "OpenVINOEncoder",
    "check_backend_settings",
    "inference_encoder",
    "max_relative_error",
    "resolve_device",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "openvino")
EXACT_TOLERANCE = 1e-4
"""Largest :func:`max_relative_error` of a backend's embeddings against the eager float32 encoder."""

_PROBE_IMAGES = 2


class BackendUnavailableError(RuntimeError):
    """A backend cannot run this encoder here (not installed, conversion failed, or results differ)."""


def max_relative_error(output: Tensor, reference: Tensor) -> float:
    """max |output - reference| / max |reference| over all entries (float64), for (B, D) embeddings."""
    output, reference = output.double(), reference.double()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((output - reference).abs().max() / scale)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given (CUDA checked)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch finds no CUDA device here; use 'cpu' or 'auto'.")
    return resolved


class OpenVINOEncoder(nn.Module):
    """``encoder`` run by OpenVINO on the CPU in float32: (B, 3, H, W) -> (B, D) float32 CPU tensors.

    The network is converted and compiled once per image size (H, W), on the first batch of that size,
    with dynamic batch; ``threads`` CPU threads run ``threads`` streams of one thread each, the batch
    split between them. The first ``min(B, 2)`` images of that batch are also run eagerly: a
    :func:`max_relative_error` above ``tolerance`` raises :class:`BackendUnavailableError`.
    """

    backend = "openvino"

    def __init__(self, encoder: Encoder, threads: int | None = None, tolerance: float = EXACT_TOLERANCE):
        super().__init__()
        try:
            import openvino
        except ImportError as error:
            raise BackendUnavailableError(
                "The openvino backend needs the package openvino (the project's 'openvino' extra): "
                "pip install openvino==2026.4.1, or use backend='eager'."
            ) from error
        threads = torch.get_num_threads() if threads is None else threads
        check_positive_int("threads", threads)
        self._openvino = openvino
        self._core = openvino.Core()
        self.encoder = encoder.to("cpu")
        self.threads = threads
        self.tolerance = tolerance
        self._compiled: dict[tuple[int, int], object] = {}  # (H, W) -> AsyncInferQueue

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float images -> (B, D) float32 embeddings (CPU)."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}.")
        size = (int(images.shape[2]), int(images.shape[3]))
        if size not in self._compiled:
            self._compiled[size] = self._compile(images)
        queue = self._compiled[size]
        chunks = np.array_split(images.detach().to("cpu", torch.float32).contiguous().numpy(),
                                min(self.threads, images.shape[0]))
        outputs: list[np.ndarray | None] = [None] * len(chunks)

        def collect(request, index):
            outputs[index] = request.get_output_tensor(0).data.copy()

        queue.set_callback(collect)
        for index, chunk in enumerate(chunks):
            queue.start_async(chunk, index, share_inputs=False)  # copied: the caller's images stay as they are
        queue.wait_all()
        return torch.from_numpy(np.concatenate(outputs))

    def _compile(self, images: Tensor):
        """Convert and compile for ``images``' (H, W); check against the eager encoder on its first images."""
        probe = images[:_PROBE_IMAGES].detach().to("cpu", torch.float32)
        try:
            model = self._openvino.convert_model(self.encoder.body, example_input=probe)
            model.reshape([-1, *probe.shape[1:]])
            compiled = self._core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": "f32",
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": self.threads,
            })
        except Exception as error:  # the converter raises many types for unsupported graphs
            raise BackendUnavailableError(
                f"OpenVINO could not convert encoder {self.encoder.spec.name!r} at "
                f"{probe.shape[2]}x{probe.shape[3]}: {type(error).__name__}: {error}"
            ) from error
        with torch.inference_mode():
            expected = self.encoder(probe)
        # share_inputs=False: OpenVINO may otherwise reuse (overwrite) the input's memory
        got = torch.from_numpy(compiled(probe.numpy(), share_inputs=False)[0].copy())
        error = max_relative_error(got, expected) if got.shape == expected.shape else math.inf
        if not error <= self.tolerance:
            raise BackendUnavailableError(
                f"OpenVINO's embeddings of encoder {self.encoder.spec.name!r} differ from eager float32 by "
                f"max relative error {error:.2e}; expected at most {self.tolerance:.0e}."
            )
        logger.info("openvino: %s compiled at %dx%d, %d stream(s), max relative error %.1e on %d images",
                    self.encoder.spec.name, probe.shape[2], probe.shape[3], self.threads, error, len(probe))
        return self._openvino.AsyncInferQueue(compiled, self.threads)


class _AutoEncoder(nn.Module):
    """OpenVINO while it works, then (warning once) the eager encoder: (B, 3, H, W) -> (B, D)."""

    def __init__(self, fast: OpenVINOEncoder):
        super().__init__()
        self.fast: OpenVINOEncoder | None = fast
        self.encoder = fast.encoder

    def forward(self, images: Tensor) -> Tensor:
        if self.fast is not None:
            try:
                return self.fast(images)
            except BackendUnavailableError as error:
                warnings.warn(f"{error}; falling back to the eager encoder.", RuntimeWarning, stacklevel=2)
                self.fast = None
        return self.encoder(images)

    @property
    def backend(self) -> str:
        """The backend running now: "openvino" or "eager"."""
        return "openvino" if self.fast is not None else "eager"


def check_backend_settings(backend: str, device: str | torch.device, threads: int | None) -> torch.device:
    """Check :func:`inference_encoder`'s settings (before any work); returns the resolved device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if threads is not None:
        check_positive_int("threads", threads)
    device = resolve_device(device)
    if backend == "openvino" and device.type != "cpu":
        raise ValueError(f"backend 'openvino' runs on the CPU only, got device {str(device)!r}; use 'eager' or 'auto'.")
    return device


def inference_encoder(
    encoder: Encoder, backend: str = "auto", device: str | torch.device = "cpu", threads: int | None = None
) -> nn.Module:
    """``encoder`` behind ``backend`` (one of ``BACKENDS``) on ``device`` ("cpu", "cuda", "auto"):
    a module (B, 3, H, W) -> (B, D) whose outputs equal the eager encoder's within ``EXACT_TOLERANCE``;
    its ``backend`` says which backend runs it ("eager" or "openvino").

    "openvino" needs the CPU; "auto" picks it on the CPU when installed (else eager, and eager on CUDA).
    ``threads``: OpenVINO's CPU threads (default: torch's). Settings are checked before any conversion.
    """
    if not isinstance(encoder, Encoder):
        raise TypeError(f"encoder must be an avalanche_dkvb.encoders.Encoder, got {type(encoder).__name__}.")
    device = check_backend_settings(backend, device, threads)
    if backend == "eager" or device.type != "cpu":
        return encoder.to(device)
    if backend == "openvino":
        return OpenVINOEncoder(encoder, threads)
    try:
        return _AutoEncoder(OpenVINOEncoder(encoder, threads))
    except BackendUnavailableError as error:
        logger.info("backend auto: %s; using the eager encoder.", error)
        return encoder.to(device)
