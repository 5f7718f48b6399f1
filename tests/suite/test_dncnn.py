"""DnCNN: architecture and conv-operator spectral normalisation (Lipschitz bounds)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jvp, vjp

from suite.models.dncnn import DnCNN, conv_operator_norm

SIZE = (13, 12)


def _dense_conv_norm(weight: torch.Tensor, size, padding: int) -> float:
    """Exact operator norm: the convolution as a dense matrix, largest singular value."""
    c_in = weight.shape[1]
    n = c_in * size[0] * size[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *size)
    cols = F.conv2d(basis, weight.double(), padding=padding).reshape(n, -1)
    return float(torch.linalg.matrix_norm(cols.T, ord=2))


def _autograd_power_iteration(fn, x_shape, n_iter=40, seed=0) -> float:
    """||J|| of ``fn`` at a random point by power iteration on J^T J (autograd JVP/VJP).

    Independent of the module's conv_transpose2d-based estimate.
    """
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*x_shape, generator=gen)
    v = torch.randn(*x_shape, generator=gen)
    v = v / v.norm()
    for _ in range(n_iter):
        _, jv = jvp(fn, x0, v)
        _, v = vjp(fn, x0, jv)
        v = v / v.norm()
    _, jv = jvp(fn, x0, v)
    return float(jv.detach().norm())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin contention on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_default_architecture():
    net = DnCNN()
    convs = list(net.convs())
    assert len(convs) == 17
    assert [c.out_channels for c in convs] == [64] * 16 + [2] and convs[0].in_channels == 2
    assert all(c.kernel_size == (3, 3) for c in convs)
    x = torch.randn(2, 2, 7, 6)
    net.eval()
    assert net(x).shape == x.shape
    # residual learning: output = x - N(x)
    torch.testing.assert_close(net(x), x - net.body(x))


def test_conv_operator_norm_matches_dense_svd_not_weight_matrix_norm():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    exact = _dense_conv_norm(w, (7, 6), 1)
    est = conv_operator_norm(w, (7, 6), 1, n_iter=500)
    assert est == pytest.approx(exact, rel=1e-4)
    matrix = float(torch.linalg.matrix_norm(w.reshape(3, -1), ord=2))
    assert abs(matrix - exact) / exact > 0.05  # the reshaped-matrix norm is a different number


def _scaled_up(net: DnCNN, factor: float) -> None:
    with torch.no_grad():
        for conv in net.convs():
            conv.parametrizations.weight.original.mul_(factor)


def test_spectral_norm_bounds_each_conv_after_scaling_and_training():
    torch.manual_seed(0)
    net = DnCNN(depth=5, width=8, residual=False)
    _scaled_up(net, 10.0)
    net.train()
    net(torch.randn(2, 2, *SIZE))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(20):
        x = torch.randn(4, 2, *SIZE)
        loss = ((net(x) - 3 * x) ** 2).mean()  # pushes the gain up against the constraint
        opt.zero_grad()
        loss.backward()
        opt.step()
    net(torch.randn(1, 2, *SIZE))  # the next training forward catches up with the last step
    for size in (SIZE, (48, 47)):  # the 32 x 32 probe covers smaller and larger inputs
        norms = []
        for conv in net.convs():
            w = conv.weight.detach()
            norms.append(_autograd_power_iteration(lambda v, w=w: F.conv2d(v, w, padding=1), (1, w.shape[1], *size)))
        assert max(norms) <= 1.05
        assert max(norms) > 0.9  # the constraint is active, not trivially satisfied
    raw = [conv_operator_norm(c.parametrizations.weight.original, SIZE, 1) for c in net.convs()]
    assert min(raw) > 1.5  # the raw weights alone would violate it


def test_network_lipschitz_estimate_and_bound():
    torch.manual_seed(1)
    net = DnCNN(depth=5, width=8, residual=False)
    _scaled_up(net, 10.0)
    net.train()
    net(torch.randn(1, 2, *SIZE))  # one power-iteration step at this size
    net.eval()
    lip = max(_autograd_power_iteration(net, (1, 2, *SIZE), seed=s) for s in range(2))
    assert lip <= 1.05
    assert net.lipschitz_upper_bound(SIZE, n_iter=50) <= 1.05
    residual = DnCNN(depth=5, width=8, residual=True)
    _scaled_up(residual, 10.0)
    residual.train()
    residual(torch.randn(1, 2, *SIZE))
    assert residual.lipschitz_upper_bound(SIZE, n_iter=50) <= 2.05


def test_without_spectral_norm_the_bound_fails():
    torch.manual_seed(2)
    net = DnCNN(depth=5, width=8, residual=False, spectral_norm=False)
    with torch.no_grad():
        for conv in net.convs():
            conv.weight.mul_(10.0)
    net.eval()
    assert _autograd_power_iteration(net, (1, 2, *SIZE)) > 2.0


def test_group_norm_option_and_its_bound():
    net = DnCNN(depth=4, width=8, norm="group", num_groups=4)
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 2
    assert net(torch.randn(2, 2, *SIZE)).shape == (2, 2, *SIZE)
    assert max(net.conv_operator_norms(SIZE)) <= 1.05
    with pytest.raises(ValueError, match="not 1-Lipschitz"):
        net.lipschitz_upper_bound(SIZE)


def test_probe_following_the_input_size():
    torch.manual_seed(3)
    net = DnCNN(depth=3, width=6, residual=False, sn_probe_size=None)
    _scaled_up(net, 10.0)
    net.train()
    for size in (SIZE, (24, 21)):
        net(torch.randn(1, 2, *size))
        conv = next(net.convs())
        assert conv.parametrizations.weight[0].u.shape[-2:] == size
        assert max(net.conv_operator_norms(size, n_iter=60)) <= 1.05


def test_state_dict_roundtrip_across_sizes():
    a = DnCNN(depth=3, width=4, sn_probe_size=None)
    a.train()
    a(torch.randn(1, 2, 20, 18))  # the probe vector follows the input size
    b = DnCNN(depth=3, width=4, sn_probe_size=None)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(1, 2, 20, 18)
    torch.testing.assert_close(a(x), b(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        DnCNN(norm="layer")
    with pytest.raises(ValueError, match="residual=True needs"):
        DnCNN(in_channels=2, out_channels=1)
    with pytest.raises(ValueError, match="depth"):
        DnCNN(depth=1)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DnCNN(kernel_size=4)
    with pytest.raises(ValueError, match="num_groups"):
        DnCNN(width=10, norm="group", num_groups=4)
    with pytest.raises(ValueError, match="sn_probe_size"):
        DnCNN(sn_probe_size=(2, 2))
