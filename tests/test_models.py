"""Shapes, dtypes, conditioning and checkpoint loading of surrogate.models."""

import pytest
import torch

from surrogate.models import (
    FORMAT_VERSION,
    Critic,
    ModelConfig,
    ModelError,
    build_models,
    load_generator,
    sample,
)

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
    torch.save({"format_version": FORMAT_VERSION, "model_config": CFG.to_dict(), "ema_state_dict": G.state_dict(),
                "preprocessing": {}, "condition_names": ["a", "b", "c"], "geometry": {}, "step": 3}, path)
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
