"""GlobalBatchNorm2d in one process (a one-rank gloo group): BatchNorm2d's maths, memory and dtype.

The two-process equivalence with one process on the same global batch is tested in test_model.py.
"""

from __future__ import annotations


import pytest
import torch

from dgucdir.bench_bn import compare_batchnorm, one_rank_group, saved_activation_bytes
from dgucdir.model.batchnorm import GlobalBatchNorm2d, _GlobalBatchNorm

CPU = torch.device("cpu")


@pytest.fixture()
def group():
    with one_rank_group(CPU):
        yield


def _pair(c=3, dtype=torch.float32):
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2.0)
        plain.bias.uniform_(-1.0, 1.0)
    ours = GlobalBatchNorm2d(c).to(dtype)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


def test_gradients_equal_the_numerical_jacobian_in_float64(group):
    """The hand-written backward against finite differences (input, weight and bias)."""
    _, bn = _pair(dtype=torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: _GlobalBatchNorm.apply(*t, bn), (x, w, b))


def test_one_rank_equals_batchnorm2d_outputs_gradients_and_running_statistics(group):
    plain, ours = _pair(c=4)
    x = (torch.randn(6, 4, 7, 7) * 3 + 5).to(memory_format=torch.channels_last)
    dy = torch.randn(6, 4, 7, 7)
    grads = []
    for m in (plain, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * dy).sum().backward()
        grads.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)
    assert ours.num_batches_tracked == plain.num_batches_tracked == 1


def test_bf16_input_gives_bf16_output_close_to_float32(group):
    _, bn = _pair(c=8)
    x = torch.randn(4, 8, 6, 6)
    y16, y32 = bn(x.bfloat16()), bn(x)
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05  # bf16 rounding of values of order 1-3


def test_forward_keeps_only_its_input_for_backward(group):
    """Saved for backward: the input (no float64 copies), plus per-channel vectors; as BatchNorm2d."""
    plain, ours = _pair(c=16)
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    theirs = saved_activation_bytes(lambda: plain(x).sum())
    mine = saved_activation_bytes(lambda: ours(x).sum())
    assert x.numel() * 4 <= mine <= x.numel() * 4 + 16 * 4 * 8
    assert mine <= theirs * 1.05


def test_a_backbone_of_global_batchnorm_keeps_what_batchnorm2d_keeps():
    """The whole narrow ResNet: same features and gradients, saved memory within 5% of BatchNorm2d's."""
    r = compare_batchnorm(CPU, "resnet_narrow", 32, 4, repeat=1)
    assert r["saved_ratio"] <= 1.05, r
    assert r["feature_rel_diff"] < 1e-5 and r["grad_max_rel_diff"] < 1e-4, r
