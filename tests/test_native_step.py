"""The fast step's C++ kernels (avalanche_dkvb.native_step) against the torch step they replace."""

import platform
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avalanche_dkvb.fast_path import Kernels, gather_mean, logit_gradient, scatter_update, torch_threads
from avalanche_dkvb.native import toolchain_available
from avalanche_dkvb.native_step import can_use_native_step, native_step

pytestmark = pytest.mark.skipif(not toolchain_available(),
                                reason="no C++ compiler or no ninja: the step kernels cannot be built")


@pytest.fixture(scope="module")
def kernels():
    built = native_step()
    assert built is not None, "a C++ compiler and ninja are present, so the step kernels must build"
    return built


def _batch(C=8, K=32, V=5, b=40, top_k=1, seed=0, row_type=torch.int32):
    """Values (C*K, V), rows (b, C*k) with top_k distinct keys per codebook, labels (b,)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(C * K, V, generator=g)
    keys = torch.stack([torch.randperm(K, generator=g)[:top_k] for _ in range(b * C)]).view(b, C, top_k)
    rows = (keys + torch.arange(C).view(1, C, 1) * K).flatten(1).to(row_type)
    return values, rows, torch.randint(V, (b,), generator=g)


# value sizes through each kernel: fixed-size with a tail only (5), a vector and a tail (10), two vectors (16),
# and the general kernels beyond 16 (17, 40)
VALUE_SIZES = [5, 10, 16, 17, 40]


@pytest.mark.parametrize("row_type", [torch.int32, torch.long])
@pytest.mark.parametrize("top_k, scale", [(1, 1), (3, 3), (3, 1)])
@pytest.mark.parametrize("value_size", VALUE_SIZES)
def test_gather_mean_equals_torch(kernels, row_type, top_k, scale, value_size):
    values, rows, _ = _batch(V=value_size, top_k=top_k, row_type=row_type)
    expected = gather_mean(values, rows.long()) * scale
    torch.testing.assert_close(kernels.gather_mean(values, rows, scale), expected, rtol=1e-6, atol=1e-6)


# logits a few apart, nearly equal, and thousands apart (their exponentials underflow below -708)
@pytest.mark.parametrize("scale, num_classes", [(3.0, 10), (1e-3, 7), (30.0, 7), (3000.0, 7)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_cross_entropy_and_gradient_equal_torch(kernels, smoothing, scale, num_classes):
    g = torch.Generator().manual_seed(1)
    logits = scale * torch.randn(64, num_classes, generator=g)
    y = torch.randint(num_classes, (64,), generator=g)
    loss, gradient = kernels.cross_entropy(logits, y, smoothing)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, label_smoothing=smoothing), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient, logit_gradient(logits, y, smoothing), rtol=1e-5, atol=1e-8)
    autograd = logits.clone().requires_grad_()
    F.cross_entropy(autograd, y, label_smoothing=smoothing).backward()
    torch.testing.assert_close(gradient, autograd.grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_refuses_a_label_out_of_range(kernels):
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]), 0.0)


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("value_size", VALUE_SIZES)
def test_scatter_add_equals_index_add_with_repeated_rows(kernels, top_k, value_size):
    values, rows, _ = _batch(K=4, V=value_size, b=50, top_k=top_k)  # 50 samples on 4 keys: every row is hit many times
    gradient = torch.randn(len(rows), values.shape[1], generator=torch.Generator().manual_seed(2))
    expected = values.clone()
    scatter_update(expected, rows.long(), gradient * -0.25)
    kernels.scatter_add(values, rows, gradient, -0.25, top_k)
    assert torch.equal(values, expected)  # same update, added row by row in the same order


@pytest.mark.parametrize("top_k, value_size", [(2, 5), (1, 10), (1, 40)])
def test_scatter_add_is_the_same_on_one_thread_and_two(kernels, top_k, value_size):
    values, rows, _ = _batch(C=16, K=4, V=value_size, top_k=top_k)
    gradient = torch.randn(len(rows), values.shape[1], generator=torch.Generator().manual_seed(3))
    one, two = values.clone(), values.clone()
    with torch_threads(1):
        kernels.scatter_add(one, rows, gradient, 0.5, top_k)
    with torch_threads(2):
        kernels.scatter_add(two, rows, gradient, 0.5, top_k)
    assert torch.equal(one, two)


def test_bad_inputs_are_refused(kernels):
    values, rows, y = _batch()
    with pytest.raises(RuntimeError, match="values must be"):
        kernels.gather_mean(values.double(), rows, 1)
    with pytest.raises(RuntimeError, match="rows must be"):
        kernels.gather_mean(values, rows.float(), 1)
    with pytest.raises(RuntimeError, match="group must divide"):
        kernels.scatter_add(values, rows, torch.zeros(len(rows), values.shape[1]), 1.0, 3)


def test_kernels_choose_native_on_cpu_float32_only():
    values = torch.zeros(4, 2)
    compiled, eager = Kernels(compiled=True), Kernels(compiled=False)
    compiled.prepare(values)
    eager.prepare(values)
    assert compiled.native is not None and eager.native is None
    assert can_use_native_step(values) and not can_use_native_step(values.double())
    compiled.prepare(values.double())
    assert compiled.native is None


def _huge_pages_can_collapse() -> bool:
    """Linux 6.1 or later (MADV_COLLAPSE) with transparent huge pages not switched off."""
    if platform.system() != "Linux":
        return False
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return (major, minor) >= (6, 1) and setting.exists() and "[never]" not in setting.read_text()


def test_collapse_to_huge_pages_keeps_the_contents(kernels):
    assert kernels.collapse_to_huge_pages(torch.randn(100, 10)) == 0  # no aligned 2 MiB inside it
    table = torch.randn(4, 2**20)  # 16 MiB: at least 7 aligned huge pages, whatever its start
    before = table.clone()
    collapsed = kernels.collapse_to_huge_pages(table)
    assert torch.equal(table, before)
    assert collapsed % 2**21 == 0 and collapsed <= table.numel() * table.element_size()
    if _huge_pages_can_collapse():
        assert collapsed >= 7 * 2**21
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.collapse_to_huge_pages(table.t())
