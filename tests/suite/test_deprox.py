"""DE-Prox DEQ, unrolled and zero-filled baselines: fixed points, gradients, training."""

import numpy as np
import pytest
import torch

from fastmri.evaluate import psnr as fastmri_psnr
from suite.data.fastmri import FastMRISliceDataset
from suite.data.synth import write_synthetic_dataset
from suite.models.deprox import SOLVERS, DEProx, Unrolled, ZeroFilled, chan_to_last, last_to_chan
from suite.models.dncnn import ConvOperatorSpectralNorm, DnCNN
from suite.physics import make_mri_physics

H, W = 16, 15


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin contention on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(batch=2, coils=0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 1, 1, W, 1, generator=gen) < 0.35).to(dtype)
    mask[..., W // 2 - 1 : W // 2 + 2, :] = 1
    maps = None
    if coils:
        maps = torch.randn(batch, coils, H, W, 2, generator=gen, dtype=dtype)
        maps = maps / maps.pow(2).sum(dim=(1, -1), keepdim=True).sqrt().unsqueeze(1)[:, 0]
    physics = make_mri_physics(mask, maps)
    x_true = torch.randn(batch, H, W, 2, generator=gen, dtype=dtype)
    return physics, physics.A(x_true), last_to_chan(x_true)


def _contractive_denoiser(dtype=torch.float32, seed=0):
    """Non-residual, conv norms <= 0.9: R is 0.9**3-Lipschitz, so the iteration contracts."""
    torch.manual_seed(seed)
    return DnCNN(depth=3, width=6, residual=False, sn_coeff=0.9).to(dtype)


def _step(model, x, y, physics):
    """The DE-Prox map recomputed from its definition: R(x - eta * A^H (A x - y))."""
    grad = last_to_chan(physics.A_adjoint(physics.A(chan_to_last(x)) - y))
    return model.denoiser(x - model.eta * grad)


def test_zero_filled_is_adjoint_of_measurements():
    physics, y, _ = _problem(coils=3)
    x, info = ZeroFilled()(y, physics)
    torch.testing.assert_close(x, last_to_chan(physics.A_adjoint(y)))
    assert x.shape == (2, 2, H, W) and list(ZeroFilled().parameters()) == []
    assert info["nstep"].tolist() == [0, 0] and torch.isnan(info["abs_lowest"]).all()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("coils", [0, 3])
def test_solvers_reach_the_fixed_point(solver, coils):
    physics, y, _ = _problem(coils=coils)
    model = DEProx(_contractive_denoiser(), eta=0.8, solver=solver, f_max_iter=60, f_tol=1e-5).eval()
    with torch.no_grad():
        x, info = model(y, physics)
        fx = _step(model, x, y, physics)
    assert x.shape == (2, 2, H, W)
    assert set(info) == {"nstep", "abs_lowest", "rel_lowest"} and all(v.shape == (2,) for v in info.values())
    rel = ((fx - x).flatten(1).norm(dim=1) / fx.flatten(1).norm(dim=1)).max()
    assert rel < 1e-4
    assert info["rel_lowest"].max() < 1e-4 and info["nstep"].max() < 60
    x0 = last_to_chan(physics.A_adjoint(y))
    assert (x - x0).norm() > 0.1 * x0.norm()  # it moved away from the initialisation


def test_ift_gradient_matches_backprop_through_the_converged_iteration():
    physics, y, target = _problem(dtype=torch.float64, seed=1)
    denoiser = _contractive_denoiser(torch.float64, seed=1)
    denoiser.sn_power_iters = 0  # both models must see the same normalised weights
    deq = DEProx(denoiser, eta=1.0, solver="anderson", f_max_iter=80, b_max_iter=80, f_tol=1e-12, b_tol=1e-12)
    unrolled = Unrolled(denoiser, eta=1.0, n_iter=80)
    seen = []
    grads = []
    for model in (deq, unrolled):
        model.train()
        model.zero_grad()
        kwargs = {"backward_writer": seen.append} if model is deq else {}
        x, _ = model(y, physics, **kwargs)
        ((x - target) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8 * grads[1].abs().max())
    assert grads[1].abs().max() > 0
    assert len(seen) == 1 and set(deq.last_backward_info) == {"nstep", "abs_lowest", "rel_lowest"}
    assert deq.last_backward_info["nstep"].shape == (2,)


def test_phantom_gradient():
    physics, y, target = _problem()
    model = DEProx(_contractive_denoiser(), ift=False, grad=3, f_max_iter=20).train()
    x, _ = model(y, physics)
    ((x - target) ** 2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().max() > 0 for p in model.parameters())
    assert model.last_backward_info == {}  # no backward solver with the phantom gradient


def test_unrolled_is_k_steps_of_the_same_map():
    physics, y, _ = _problem(coils=2)
    model = Unrolled(_contractive_denoiser(), eta=0.7, n_iter=3).eval()
    with torch.no_grad():
        x, info = model(y, physics)
        ref = last_to_chan(physics.A_adjoint(y))
        prev = ref
        for _ in range(3):
            prev, ref = ref, _step(model, ref, y, physics)
    torch.testing.assert_close(x, ref)
    assert info["nstep"].tolist() == [3.0, 3.0]
    torch.testing.assert_close(info["abs_lowest"], (ref - prev).flatten(1).norm(dim=1))


def test_spectral_norm_power_iteration_runs_once_per_training_step(monkeypatch):
    calls = []
    original = ConvOperatorSpectralNorm.power_iteration

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    physics, y, target = _problem()
    model = DEProx(_contractive_denoiser(), f_max_iter=10).train()
    model(y, physics)  # first step initialises
    monkeypatch.setattr(ConvOperatorSpectralNorm, "power_iteration", counting)
    x, _ = model(y, physics)
    ((x - target) ** 2).mean().backward()
    assert len(calls) == 3 and len(set(map(id, calls))) == 3  # one per conv, not per solver call
    # the denoiser on its own (pre-training) still updates on every training forward
    assert model.denoiser.sn_update_on_forward
    calls.clear()
    model.denoiser(torch.randn(1, 2, H, W))
    assert len(calls) == 3


def test_default_denoiser_and_bad_arguments():
    model = DEProx()
    convs = list(model.denoiser.convs())
    assert len(convs) == 17 and convs[1].out_channels == 64
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.denoiser.modules())
    assert model.solver == "anderson" and model.ift
    with pytest.raises(ValueError, match="unknown solver 'newton'; valid: anderson, broyden, fixed_point_iter"):
        DEProx(solver="newton")
    with pytest.raises(ValueError, match="unknown b_solver 'lbfgs'"):
        DEProx(b_solver="lbfgs")
    with pytest.raises(ValueError, match="unknown core"):
        DEProx(core="fancy")
    with pytest.raises(ValueError, match="unknown stop_mode"):
        DEProx(stop_mode="max")
    with pytest.raises(ValueError, match="eta must be"):
        DEProx(eta=0.0)
    with pytest.raises(ValueError, match="grad must be"):
        DEProx(grad=0)
    with pytest.raises(ValueError, match="n_iter must be"):
        Unrolled(n_iter=0)
    with pytest.raises(TypeError, match="nn.Module"):
        DEProx(denoiser=lambda x: x)


def _volume_psnr(x, batch):
    """fastMRI's PSNR (volume maximum) of raw-unit magnitudes, averaged over volumes."""
    std = batch["std"].view(-1, 1, 1)
    pred = (torch.linalg.vector_norm(x, dim=1) * std).detach().numpy()
    gt = (torch.linalg.vector_norm(batch["target_complex"], dim=-1) * std).numpy()
    names = np.array(batch["fname"])
    return float(np.mean([fastmri_psnr(gt[names == n], pred[names == n]) for n in np.unique(names)]))


def test_tiny_deprox_training_beats_zero_filled(tmp_path):
    write_synthetic_dataset(tmp_path, n_volumes=2, n_slices=4, shape=(36, 37), recon_size=(32, 33), seed=3)
    ds = FastMRISliceDataset(tmp_path, slice_range=None, crop_size=(32, 33), accelerations=(4,),
                             center_fractions=(0.08,))
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    physics = make_mri_physics(batch["mask"])
    target = last_to_chan(batch["target_complex"])
    torch.manual_seed(0)
    model = DEProx(DnCNN(depth=5, width=8), eta=1.0, f_max_iter=12, b_max_iter=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        x, _ = model(batch["kspace"], physics)
        loss = ((x - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, info = model(batch["kspace"], physics)
        zf, _ = ZeroFilled()(batch["kspace"], physics)
    gain = _volume_psnr(x, batch) - _volume_psnr(zf, batch)
    assert gain > 1.0, gain
    assert torch.isfinite(info["rel_lowest"]).all()
