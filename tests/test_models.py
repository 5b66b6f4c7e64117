"""Shapes, dtypes, conditioning and checkpoint loading of surrogate.models."""

import numpy as np
import pytest
import torch

from surrogate.geometry import Geometry, Layer
from surrogate.models import (
    FORMAT_VERSION,
    Critic,
    LayeredHead,
    ModelConfig,
    ModelError,
    ReadoutThreshold,
    ShowerShape,
    ShowerSums,
    build_models,
    head_info,
    load_generator,
    sample,
)
from surrogate.preprocess import Preprocessor
from surrogate.train import critic_physics

CFG = ModelConfig(n_voxels=7, cond_dim=3, z_dim=5, g_width=16, g_depth=2, d_width=16, d_depth=2)


@pytest.mark.parametrize("conditioning", ["concat", "film"])
@pytest.mark.parametrize("extras", [{}, {"spectral_norm": True, "minibatch_std": True, "critic_layernorm": False}])
def test_shapes_and_dtypes(conditioning, extras):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.to_dict(), "conditioning": conditioning, **extras})
    G, D = build_models(cfg)
    z, c = torch.randn(4, 5), torch.randn(4, 3)
    x = G(z, c)
    assert x.shape == (4, 7) and x.dtype == torch.float32
    assert D(x, c).shape == (4,) and D(x, c).dtype == torch.float32
    assert G.z_dim == 5 and G.cfg == cfg


def test_minibatch_std_critic_has_finite_penalty_gradients_with_constant_voxels():
    """An always-empty voxel is the same in every shower of a batch: std's gradient there is 0/0.
    The critic's minibatch std must keep the gradient penalty's double backward finite (it gave a
    NaN critic loss at step 1 of the default model)."""
    from surrogate.losses import gradient_penalty

    torch.manual_seed(0)
    D = Critic(ModelConfig(**{**CFG.to_dict(), "minibatch_std": True}))
    real, fake = torch.randn(8, 7), torch.randn(8, 7)
    real[:, 2] = fake[:, 2] = -3.0  # one voxel empty in every shower
    c = torch.randn(8, 3)
    gp = gradient_penalty(D, real, fake, c, 10.0, generator=torch.Generator().manual_seed(1))
    gp.backward()
    assert torch.isfinite(gp)
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)


def test_critic_has_no_batchnorm():
    for cfg in (CFG, ModelConfig(**{**CFG.to_dict(), "spectral_norm": True, "minibatch_std": True})):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in Critic(cfg).modules())


@pytest.mark.parametrize("conditioning", ["concat", "film"])
def test_conditioning_changes_outputs(conditioning):
    torch.manual_seed(1)
    G, D = build_models(ModelConfig(**{**CFG.to_dict(), "conditioning": conditioning}))
    z = torch.randn(6, 5)
    c1, c2 = torch.zeros(6, 3), torch.ones(6, 3)
    assert (G(z, c1) - G(z, c2)).abs().max() > 1e-4
    x = torch.randn(6, 7)
    assert (D(x, c1) - D(x, c2)).abs().max() > 1e-4


def test_config_rejects_bad_values():
    with pytest.raises(ModelError, match="conditioning"):
        ModelConfig(n_voxels=3, cond_dim=1, conditioning="sum")
    with pytest.raises(ModelError, match="unknown key"):
        ModelConfig.from_dict({**CFG.to_dict(), "width": 3})


def test_load_generator_and_sample_are_seeded(tmp_path):
    torch.manual_seed(2)
    G, _ = build_models(CFG)
    path = tmp_path / "generator.pt"
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": CFG.to_dict(),
            "ema_state_dict": G.state_dict(),
            "preprocessing": {},
            "condition_names": ["a", "b", "c"],
            "geometry": {},
            "step": 3,
        },
        path,
    )
    G2, meta = load_generator(path, "cpu")
    assert not G2.training and meta["step"] == 3 and "ema_state_dict" not in meta
    c = torch.rand(10, 3)
    a = sample(G2, c, seed=7, batch_size=4)
    assert a.shape == (10, 7) and torch.allclose(a, sample(G2, c.numpy(), seed=7), atol=1e-6)
    assert torch.allclose(a, sample(G, c, seed=7, batch_size=100), atol=1e-6)
    assert not torch.equal(a, sample(G2, c, seed=8))


def test_load_generator_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"format_version": 99, "model_config": CFG.to_dict(), "ema_state_dict": {}}, bad)
    with pytest.raises(ModelError, match="bad.pt.*format_version"):
        load_generator(bad)


# --------------------------------------------------------------------------- layered output, physics critic

GEOM = Geometry("tiny", (Layer(0, (0.0, 5.0, 20.0), 2), Layer(1, (0.0,), 1), Layer(2, (0.0, 10.0, 30.0, 90.0), 1)))


@pytest.fixture(scope="module")
def fitted():
    """A Preprocessor fitted on random sparse showers of GEOM (7 voxels in layers 0 and 2)."""
    rng = np.random.default_rng(5)
    n = 300
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(np.float32)
    showers = (rng.gamma(0.5, 1.0, (n, 7)) * (rng.random((n, 7)) < 0.6) * energies / 5).astype(np.float32)
    pre = Preprocessor.fit(showers, energies, None, None, {"epsilon": 1e-8})
    return pre, showers, energies


def _layered(pre, **kw):
    cfg = ModelConfig(
        n_voxels=7, cond_dim=1, z_dim=4, g_width=16, g_depth=2, d_width=16, d_depth=2, output="layered", **kw
    )
    return cfg, head_info(pre, GEOM)


def test_layered_head_builds_total_times_layer_share_times_shape(fitted):
    pre, _, _ = fitted
    _, info = _layered(pre)
    head = LayeredHead(info)
    assert head.n_in == 1 + 2 + 7
    h = torch.randn(50, head.n_in, generator=torch.Generator().manual_seed(0))
    h[:, 0] = torch.linspace(-6.0, 3.0, 50)  # log(E_dep / E_inc), up to the cap log(4)
    energies = np.full((50, 1), 1e4, dtype=np.float32)
    showers = pre.inverse_showers(head(h).detach().numpy(), energies)
    u = showers.astype(np.float64) / 1e4
    total = np.exp(np.minimum(h[:, 0].numpy(), np.log(4.0)))
    np.testing.assert_allclose(u.sum(axis=1), total, rtol=1e-4)
    layer_share = torch.softmax(h[:, 1:3], dim=1).numpy()
    np.testing.assert_allclose(u[:, :4].sum(axis=1) / u.sum(axis=1), layer_share[:, 0], rtol=1e-4)
    shape2 = torch.softmax(h[:, 7:10], dim=1).numpy()
    np.testing.assert_allclose(u[:, 4:] / u[:, 4:].sum(axis=1, keepdims=True), shape2, rtol=1e-3, atol=1e-6)
    # never below the empty-voxel value of the preprocessing
    floor = (np.log(pre.epsilon) - pre.mean) / pre.std
    assert (head(h).detach().numpy() >= floor - 1e-5).all()


def test_shower_sums_are_the_log_layer_and_total_energies(fitted):
    pre, showers, energies = fitted
    info = critic_physics(pre, GEOM, showers, energies)
    sums = ShowerSums(info, weight=3.0)
    got = sums(torch.from_numpy(pre.transform_showers(showers, energies))).numpy()
    u = showers.astype(np.float64) / energies
    expected = np.log(np.column_stack([u[:, :4].sum(1), u[:, 4:].sum(1), u.sum(1)]) + ShowerSums.DELTA)
    np.testing.assert_allclose(got, 3.0 * (expected - expected.mean(axis=0)), rtol=1e-3, atol=1e-3)


def test_physics_critic_embeds_the_sums_and_refuses_bad_setups(fitted):
    pre, showers, energies = fitted
    cfg, info = _layered(pre, critic_physics_weight=10.0)
    physics = critic_physics(pre, GEOM, showers, energies)
    torch.manual_seed(3)
    G, D = build_models(cfg, info, physics)
    x = G(torch.randn(5, 4), torch.zeros(5, 1))
    c = torch.zeros(5, 1)
    assert D.embed(x, c).shape == (5, 7 + 3) and D(x, c).shape == (5,)
    assert torch.equal(D(x, c), D.score(D.embed(x, c), c))
    with pytest.raises(ModelError, match="physics inputs need the preprocessing"):
        build_models(cfg, info, None)
    with pytest.raises(ModelError, match="needs the preprocessing"):
        build_models(ModelConfig(**{**cfg.to_dict(), "critic_physics_weight": 0.0}), None, None)
    with pytest.raises(ModelError, match="physics information was given"):
        build_models(ModelConfig(**{**cfg.to_dict(), "critic_physics_weight": 0.0}), info, physics)


def test_layered_generator_loads_from_its_checkpoint_alone(tmp_path, fitted):
    pre, _, _ = fitted
    cfg, info = _layered(pre)
    torch.manual_seed(4)
    G, _ = build_models(cfg, info)
    path = tmp_path / "generator.pt"
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": cfg.to_dict(),
            "ema_state_dict": G.state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": ["log_energy"],
            "geometry": GEOM.to_dict(),
            "step": 1,
        },
        path,
    )
    G2, _ = load_generator(path)
    c = torch.rand(6, 1)
    assert torch.equal(sample(G2, c, seed=1), sample(G, c, seed=1))
    torch.save(
        {"format_version": FORMAT_VERSION, "model_config": cfg.to_dict(), "ema_state_dict": G.state_dict(), "step": 1},
        tmp_path / "bare.pt",
    )
    with pytest.raises(ModelError, match="bare.pt.*needs the checkpoint's preprocessing and geometry"):
        load_generator(tmp_path / "bare.pt")


def test_symmetric_generator_spreads_orientations_and_stays_seeded(fitted):
    pre, _, _ = fitted
    cfg, _ = _layered(pre, symmetry="rotate_reflect")
    info = head_info(pre, GEOM, "rotate_reflect")
    assert info["orientations"].shape == (4, 7)  # layer 0 has 2 angular bins: 2 rotations x mirror
    torch.manual_seed(6)
    G, _ = build_models(cfg, info)
    c = torch.zeros(4000, 1)
    x = sample(G, c, seed=2).numpy()
    assert np.array_equal(x, sample(G, c, seed=2).numpy())

    def half_ratio(gen):
        u = pre.inverse_showers(sample(gen, c, seed=2).numpy(), np.full((4000, 1), 1e4, dtype=np.float32))
        return u[:, :2].sum(1).mean() / u[:, 2:4].sum(1).mean()  # layer 0's two angular halves

    assert abs(half_ratio(G) - 1) < 0.01  # measured 1.0001
    torch.manual_seed(6)
    plain, _ = build_models(ModelConfig(**{**cfg.to_dict(), "symmetry": "none"}), head_info(pre, GEOM))
    assert abs(half_ratio(plain) - 1) > 0.02  # the same network without it: measured 0.966
    with pytest.raises(ModelError, match="symmetry needs output 'layered'"):
        ModelConfig(n_voxels=7, cond_dim=1, symmetry="rotate")


def _conditions(pre, energies):
    """The first condition column (log E scaled to [-1, 1]) as the preprocessing writes it, (N, 1)."""
    return torch.from_numpy(pre.transform_conditions(energies))


def test_shower_shape_is_the_validation_features(fitted):
    """Centroids and widths equal surrogate.features' (known answer); soft hits follow the sparsity."""
    from surrogate.features import compute_features

    pre, showers, energies = fitted
    info = critic_physics(pre, GEOM, showers, energies, threshold_mev=1e-3)
    shape = ShowerShape(info, weight=2.0)
    x, c = torch.from_numpy(pre.transform_showers(showers, energies)), _conditions(pre, energies)
    raw = shape.raw(x, c).double().numpy()
    f = compute_features(showers, energies, GEOM, threshold=1e-3)
    for j, layer in enumerate((0, 2)):
        np.testing.assert_allclose(raw[:, j], f[f"centre_x_{layer}"], rtol=1e-3, atol=1e-2)
        np.testing.assert_allclose(raw[:, 2 + j], f[f"centre_y_{layer}"], rtol=1e-3, atol=1e-2)
        has = f[f"width_x_{layer}"] > 1.0
        wx = np.sqrt(np.maximum(raw[:, 4 + j] ** 2 - ShowerShape.VAR_FLOOR, 0))
        np.testing.assert_allclose(wx[has], f[f"width_x_{layer}"][has], rtol=2e-3)
        # hits far above the threshold count fully, empty voxels not at all
        assert np.corrcoef(raw[:, 8 + j], f[f"sparsity_{layer}"])[0, 1] > 0.95
    out = shape(x, c).numpy()  # standardised on the same sample, times the weight
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-3)
    spread = out.std(axis=0, ddof=1)
    assert np.allclose(spread[spread > 0.1], 2.0, rtol=1e-2) and (spread > 0.1).sum() == 6  # x of the 2-bin layer is 0


def test_readout_threshold_zeroes_faint_voxels_and_passes_gradients(fitted):
    pre, showers, energies = fitted
    info = critic_physics(pre, GEOM, showers, energies, threshold_mev=1.0)
    thr = ReadoutThreshold(info)
    e = np.full((2, 1), 1e4, dtype=np.float32)
    mev = np.array([[0.5, 2.0, 0, 0, 0, 300.0, 0.99], [1.01, 0, 0, 0, 0, 0, 50.0]], dtype=np.float32)
    x = torch.from_numpy(pre.transform_showers(mev, e)).requires_grad_(True)
    y = thr(x, _conditions(pre, e))
    back = pre.inverse_showers(y.detach().numpy(), e)
    expected = np.where(mev >= 1.0, mev, 0.0)
    np.testing.assert_allclose(back, expected, rtol=1e-3, atol=1e-6)
    y.sum().backward()  # straight through: every voxel, cut or not, gets the gradient
    assert torch.equal(x.grad, torch.ones_like(x))
    # real showers were read out with the threshold: unchanged
    real = torch.from_numpy(pre.transform_showers(np.where(showers >= 1.0, showers, 0), energies))
    assert torch.equal(thr(real, _conditions(pre, energies)), real)


def test_critic_with_shape_and_threshold_embeds_them(fitted):
    pre, showers, energies = fitted
    cfg, info = _layered(pre, critic_physics_weight=1.0, critic_shape_weight=3.0, critic_threshold=True)
    torch.manual_seed(5)
    G, D = build_models(cfg, info, critic_physics(pre, GEOM, showers, energies))
    c = _conditions(pre, energies[:6])
    x = G(torch.randn(6, 4), c)
    assert D.embed(x, c).shape == (6, 7 + 3 + 5 * 2) and D(x, c).shape == (6,)
    loss = D(x, c).sum()
    loss.backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize(
    "voxels, v0_range, v1_range",
    [("mean", (4040, 4060), (445, 455)), ("log_mean", (4490, 4500), (1.0, 10.0)), ("median", (4495, 4500), (0, 1.0))],
)
def test_template_voxel_shares_of_a_rarely_hit_voxel(fitted, voxels, v0_range, v1_range):
    """Known answer: in a 5 GeV shower layer 0 holds 4.5 GeV, all of it in voxel 0 in 90% of the
    showers and in voxel 1 in the other 10%; layer 2 holds 0.5 GeV in voxel 4; threshold 1 MeV.
    The mean template puts 10% of the layer (450 MeV) in voxel 1 of every shower; log_mean gives it
    the geometric mean of its floored share (~3 MeV); median the floor, half the threshold."""
    from surrogate.train import response_template

    pre, _, _ = fitted
    n = 200
    energies = np.linspace(4990.0, 5010.0, n, dtype=np.float32).reshape(n, 1)  # two knots, 10% rare in each
    showers = np.zeros((n, 7), np.float32)
    rare = np.arange(n) % 10 == 0
    showers[~rare, 0] = 0.9 * energies[~rare, 0]
    showers[rare, 1] = 0.9 * energies[rare, 0]
    showers[:, 4] = 0.1 * energies[:, 0]
    tpl = response_template(pre, GEOM, showers, energies, None, knots=2, voxels=voxels, threshold_mev=1.0)
    _, info = _layered(pre, template_knots=2)
    head = LayeredHead({**info, "template": tpl}, template_knots=2)
    e = np.array([[5000.0]], np.float32)
    out = pre.inverse_showers(head(torch.zeros(1, head.n_in), None, _conditions(pre, e)).detach().numpy(), e)[0]
    assert v0_range[0] < out[0] < v0_range[1] and v1_range[0] <= out[1] < v1_range[1], (voxels, out)
    np.testing.assert_allclose(out.sum(), 5000.0, rtol=1e-3)
    np.testing.assert_allclose(out[4:].sum(), 500.0, rtol=1e-3)


def test_template_voxels_rejects_an_unknown_rule(fitted):
    from surrogate.train import TrainError, response_template

    pre, showers, energies = fitted
    with pytest.raises(TrainError, match="template_voxels 'mode'"):
        response_template(pre, GEOM, showers, energies, None, knots=2, voxels="mode")


def test_response_template_is_the_mean_shower_and_loads_with_the_generator(tmp_path, fitted):
    """With zero raw outputs the layered head gives the fitted template: exp(mean log response) and
    the mean layer shares; its buffers travel in the checkpoint, so a loaded generator is the same."""
    from surrogate.train import response_template

    pre, showers, energies = fitted
    tpl = response_template(pre, GEOM, showers, energies, None, knots=4)
    assert tpl["knots"].shape == (1, 4) and tpl["values"].shape == (1, 4, 2 + 2 + 7)
    assert np.all(np.diff(tpl["knots"][0]) > 0)
    cfg, info = _layered(pre, template_knots=4)
    head = LayeredHead({**info, "template": tpl}, template_knots=4)
    c = _conditions(pre, energies)
    out = pre.inverse_showers(head(torch.zeros(len(c), head.n_in), None, c).detach().numpy(), energies)
    # at a knot the template is that knot's values exactly
    at = np.argmin(np.abs(c[:, 0].numpy()[:, None] - tpl["knots"][0][None, :]), axis=0)
    u = out[at].astype(np.float64) / energies[at]
    np.testing.assert_allclose(np.log(u.sum(axis=1)), tpl["values"][0, :, 0], atol=0.02)
    share0 = np.exp(tpl["values"][0, :, 2])
    np.testing.assert_allclose(
        u[:, :4].sum(axis=1) / u.sum(axis=1), share0 / (share0 + np.exp(tpl["values"][0, :, 3])), rtol=1e-3
    )
    torch.manual_seed(6)
    G, _ = build_models(cfg, {**info, "template": tpl})
    path = tmp_path / "generator.pt"
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": cfg.to_dict(),
            "ema_state_dict": G.state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": pre.condition_names,
            "geometry": GEOM.to_dict(),
            "step": 1,
        },
        path,
    )
    G2, _ = load_generator(path)
    z = torch.randn(8, 4)
    assert torch.equal(G.eval()(z, c[:8]), G2(z, c[:8]))
    with pytest.raises(ModelError, match="template_knots"):
        ModelConfig(**{**cfg.to_dict(), "template_knots": 1})


def test_packed_critic_scores_packs_and_its_penalty_is_per_pack():
    from surrogate.losses import gradient_penalty

    torch.manual_seed(7)
    cfg = ModelConfig(**{**CFG.to_dict(), "critic_pack": 2})
    _, D = build_models(cfg)
    x, c = torch.randn(6, 7), torch.randn(6, 3)
    assert D(x, c).shape == (3,)
    # a pack is one input: swapping members of a pack changes its score, not the others'
    swapped = x[[1, 0, 2, 3, 4, 5]]
    cs = c[[1, 0, 2, 3, 4, 5]]
    d0, d1 = D(x, c), D(swapped, cs)
    assert not torch.allclose(d0[0], d1[0]) and torch.equal(d0[1:], d1[1:])
    gp = gradient_penalty(D, x, torch.randn(6, 7), c, lam=1.0, generator=torch.Generator().manual_seed(0), pack=2)
    assert gp.ndim == 0 and torch.isfinite(gp)
    with pytest.raises(ModelError, match="packs of 2"):
        D(x[:5], c[:5])
