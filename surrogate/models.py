"""Networks of the conditional WGAN-GP: generator G(z, c) and critic D(x, c), built from a dataclass.

Input and output sizes come from the data (``n_voxels``, ``cond_dim``); latent size, widths and
depths from config. Each network keeps the :class:`ModelConfig` it was built with, and the
generator exposes ``z_dim`` so sampling code never hard-codes a latent size.

The generator's output is matched to the preprocessing (standardised log or logit of E_vox/E_inc):
``layered`` (the default) builds the voxels as E_dep/E_inc x layer shares x shares within the
layer and maps them through the forward transform, so they never go below the empty-voxel value;
``linear`` emits one unbounded value per voxel. The critic has no BatchNorm (the gradient
penalty is per sample); LayerNorm, spectral normalisation, a minibatch standard-deviation
feature and the log layer and total energies as extra inputs (``critic_physics_weight``) are options.

Structure (``g_structure``, ``d_structure``): ``dense`` (the default) maps the hidden layer to every
voxel logit with one linear layer, and the critic reads every voxel with one; both then hold
``width x voxels`` weights, 10 M at the 40,500 voxels of CaloChallenge dataset 3. ``per_layer``
shares the weights over the layers of one binning instead (:class:`LayerDecoder`,
:class:`LayerEncoder`): a layer is a code of ``layer_width`` features (the hidden state modulated
by that layer's learned scale and offset), and one linear map per layer shape turns a code into
the layer's (alpha, r) voxels, or a layer's voxels into a code. The parameters then grow with the
voxels of one layer, not with all of them (measured counts in :class:`LayerDecoder`'s docstring).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT_VERSION",
    "ModelError",
    "ModelConfig",
    "Generator",
    "Critic",
    "build_models",
    "count_parameters",
    "load_generator",
    "sample",
]

FORMAT_VERSION = 1  # of results/train/generator.pt
OUTPUTS = ("linear", "layered")
SYMMETRIES = ("none", "rotate", "rotate_reflect")
STRUCTURES = ("dense", "per_layer")
# ModelConfig fields left out of to_dict() at their defaults: a default model's checkpoint (and its
# bytes) stays what it was before the fields existed
_OMITTED_AT_DEFAULT = ("g_structure", "d_structure", "g_layer_width", "d_layer_width", "layer_shapes")


class ModelError(ValueError):
    """A model configuration or checkpoint that cannot be used, with a message naming it."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild G and D (stored in every checkpoint)."""

    n_voxels: int  # V, output width of G and input width of D (from the data)
    cond_dim: int  # C, width of the preprocessed condition vector (from the data)
    z_dim: int = 64  # latent size
    g_width: int = 256  # hidden units per generator layer
    g_depth: int = 3  # hidden layers of the generator
    d_width: int = 256  # hidden units per critic layer
    d_depth: int = 3  # hidden layers of the critic
    conditioning: str = "concat"  # concat: c joins the input; film: c also scales/shifts every hidden layer
    critic_layernorm: bool = True  # LayerNorm after each critic hidden layer (never BatchNorm)
    spectral_norm: bool = False  # spectral normalisation of the critic's linear layers
    minibatch_std: bool = False  # append the batch's mean per-voxel std as a critic feature
    output: str = "linear"  # linear | layered (see Generator)
    symmetry: str = "none"  # none | rotate | rotate_reflect: layered showers turned to a random orientation
    critic_physics_weight: float = 0.0  # > 0: the critic also sees log layer and total energies, x this weight
    critic_shape_weight: float = 0.0  # > 0: ... and per-layer centroids, widths and soft hit fractions, x this weight
    critic_threshold: bool = False  # the critic sees showers with the readout threshold applied (as generate writes)
    template_knots: int = 0  # > 0 (layered only): G corrects a fitted per-condition mean shower (ResponseTemplate)
    critic_pack: int = 1  # the critic scores packs of this many showers together (PacGAN), against mode dropping
    critic_physics_knots: int = (
        0  # > 0: the critic's log energies are standardised per condition (fitted at these knots)
    )
    g_structure: str = "dense"  # dense | per_layer: voxel logits from one linear layer, or LayerDecoder
    d_structure: str = "dense"  # dense | per_layer: the critic reads the voxels with one linear layer, or LayerEncoder
    g_layer_width: int = 64  # per_layer: features of a layer's code in the generator
    d_layer_width: int = 64  # per_layer: features of a layer's code in the critic
    layer_shapes: tuple[tuple[int, int], ...] = ()  # per_layer: (n_alpha, n_r) of every active layer (from the data)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_shapes", tuple((int(a), int(r)) for a, r in self.layer_shapes))
        positive = ("n_voxels", "cond_dim", "z_dim", "g_width", "g_depth", "d_width", "d_depth", "critic_pack")
        for name in (*positive, "g_layer_width", "d_layer_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "cond_dim" else 1):
                raise ModelError(f"model config: {name} must be a positive integer, got {value!r}")
        for name in ("critic_physics_weight", "critic_shape_weight"):
            if not getattr(self, name) >= 0:
                raise ModelError(f"model config: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.conditioning not in ("concat", "film"):
            raise ModelError(f"model config: conditioning must be 'concat' or 'film', got {self.conditioning!r}")
        if self.symmetry not in SYMMETRIES:
            raise ModelError(f"model config: symmetry must be one of {', '.join(SYMMETRIES)}, got {self.symmetry!r}")
        for name in ("template_knots", "critic_physics_knots"):
            k = getattr(self, name)
            if not isinstance(k, int) or k < 0 or k == 1:
                raise ModelError(f"model config: {name} must be 0 (off) or >= 2, got {k!r}")
        if self.template_knots and self.output != "layered":
            raise ModelError("model config: template_knots needs output 'layered'")
        if self.symmetry != "none" and self.output != "layered":
            raise ModelError("model config: symmetry needs output 'layered'")
        if self.output not in OUTPUTS:
            raise ModelError(f"model config: output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        for name in ("g_structure", "d_structure"):
            if getattr(self, name) not in STRUCTURES:
                allowed = ", ".join(STRUCTURES)
                raise ModelError(f"model config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.g_structure == "per_layer" and self.output != "layered":
            raise ModelError("model config: generator structure 'per_layer' needs output 'layered'")
        if "per_layer" in (self.g_structure, self.d_structure):
            n = sum(a * r for a, r in self.layer_shapes)
            if n != self.n_voxels:
                raise ModelError(
                    f"model config: structure 'per_layer' needs layer_shapes of the {self.n_voxels} voxels, "
                    f"got {len(self.layer_shapes)} layers of {n}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _OMITTED_AT_DEFAULT:
            if d[name] == defaults[name]:
                del d[name]
        if self.layer_shapes:
            d["layer_shapes"] = [list(s) for s in self.layer_shapes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


class _FiLMBlock(nn.Module):
    """Linear -> LeakyReLU, then h * (1 + gamma(c)) + beta(c) (identity at initialisation)."""

    def __init__(self, n_in: int, n_out: int, cond_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.film = nn.Linear(cond_dim, 2 * n_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = nn.functional.leaky_relu(self.linear(h), 0.2)
        gamma, beta = self.film(c).chunk(2, dim=1)
        return h * (1 + gamma) + beta


def head_info(pre: Any, geometry: Any, symmetry: str = "none") -> dict[str, Any]:
    """What the ``layered`` output needs from a fitted Preprocessor and a Geometry (and the symmetry)."""
    orientations = (
        geometry.orientations(reflect=symmetry == "rotate_reflect")
        if symmetry != "none"
        else np.arange(geometry.n_voxels)[None, :]
    )
    return {
        "shift": pre.mean,
        "scale": pre.std,
        "transform": pre.voxel_transform,
        "epsilon": pre.epsilon,
        "logit_alpha": pre.logit_alpha,
        "layer_sizes": [layer.n_r * layer.n_alpha for layer in geometry.active_layers],
        "orientations": orientations,
        "n_particles": max(len(pre.particles), 1),
    }


class ResponseTemplate(nn.Module):
    """Conditions (B, C) -> (B, 2 + L + V): a fitted mean shower per incident energy and particle.

    Columns: the mean and the log spread of log(E_dep / E_inc), then the log mean share of each
    layer in E_dep, then the log mean share of each voxel in its layer. Fitted on the training
    showers (:func:`surrogate.train.response_template`) at ``K`` knots in log E per particle
    (medians of energy quantile bins) and interpolated linearly in log E between them, constant
    beyond the ends. The energy is the first condition column, the particle the one-hot columns
    at the end (one particle: no columns). Buffers only, saved with the weights.

    The layered head adds these to the generator's raw outputs, so the network outputs the
    *standardised* response (a resolution of 1% at 1 TeV and 10% at 1 GeV are then one target)
    and corrections to the mean longitudinal and lateral profile, not the profile itself. The
    MLP was seen to give every energy the same relative spread of E_dep (too wide at high
    energy: resolution ratios of 2-7): a spread that must shrink tenfold across the range is
    hard for a network to learn in a few thousand steps, and easy to fit beforehand.
    """

    def __init__(self, knots: int, n_particles: int, width: int, fitted: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.n_particles = int(n_particles)
        k = torch.zeros(self.n_particles, knots)
        v = torch.zeros(self.n_particles, knots, width)
        if fitted is not None:
            k = torch.as_tensor(np.asarray(fitted["knots"], dtype=np.float32))
            v = torch.as_tensor(np.asarray(fitted["values"], dtype=np.float32))
            if k.shape != (self.n_particles, knots) or v.shape != (self.n_particles, knots, width):
                raise ModelError(
                    f"response template: knots {tuple(k.shape)} and values {tuple(v.shape)}, expected "
                    f"({self.n_particles}, {knots}) and ({self.n_particles}, {knots}, {width})"
                )
        self.register_buffer("knots", k)
        self.register_buffer("values", v)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = c[:, 0].float()
        out = None
        for p in range(self.n_particles):
            k, v = self.knots[p], self.values[p]
            xc = torch.clamp(x, k[0], k[-1])
            hi = torch.clamp(torch.searchsorted(k, xc.contiguous()), 1, len(k) - 1)
            lo_k, hi_k = k[hi - 1], k[hi]
            t = ((xc - lo_k) / torch.clamp(hi_k - lo_k, min=1e-12)).unsqueeze(1)
            val = (1 - t) * v[hi - 1] + t * v[hi]
            if self.n_particles > 1:
                val = val * c[:, c.shape[1] - self.n_particles + p : c.shape[1] - self.n_particles + p + 1].float()
            out = val if out is None else out + val
        return out


class LayeredHead(nn.Module):
    """h (B, 1 + L + V) -> (B, V) network-space voxels built as total x layer share x shape in the layer.

    ``h[:, 0]`` is log(E_dep / E_inc) (capped at ``LOG_MAX_RATIO``), ``h[:, 1 : 1 + L]`` the
    logits of the layers' shares of E_dep, and the rest, layer by layer, the logits of each
    voxel's share of its layer. So u = E_vox / E_inc is positive, sums exactly to the total, and
    one output sets the response: errors in the many outer voxels cannot pile up into the
    energy (with a per-voxel output, exp() of the standardised log scale turns small errors in
    rarely hit voxels into large energies). u then goes through the preprocessing's forward
    transform, in log space (``logaddexp``) so tiny shares land smoothly on the empty-voxel floor.
    """

    LOG_MAX_RATIO = math.log(4.0)

    def __init__(self, info: dict[str, Any], template_knots: int = 0) -> None:
        super().__init__()
        self.layer_sizes = [int(n) for n in info["layer_sizes"]]
        self.transform = str(info["transform"])
        self.log_epsilon = math.log(float(info["epsilon"]))
        self.alpha = float(info["logit_alpha"])
        if self.transform not in ("log", "logit"):
            raise ModelError(f"layered output: unknown voxel transform {self.transform!r}")
        self.register_buffer("shift", torch.as_tensor(np.asarray(info["shift"], dtype=np.float32)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(info["scale"], dtype=np.float32)))
        # rebuilt from the geometry on load, so not stored with the weights
        self.register_buffer(
            "orientations", torch.as_tensor(np.asarray(info["orientations"], dtype=np.int64)), persistent=False
        )
        if sum(self.layer_sizes) != len(self.shift):
            raise ModelError(
                f"layered output: layers of {sum(self.layer_sizes)} voxels, preprocessing of {len(self.shift)}"
            )
        self.template = None
        if template_knots:
            width = 2 + len(self.layer_sizes) + len(self.shift)
            self.template = ResponseTemplate(
                template_knots, int(info.get("n_particles", 1)), width, info.get("template")
            )

    @property
    def n_in(self) -> int:
        return 1 + len(self.layer_sizes) + sum(self.layer_sizes)

    @property
    def n_orientations(self) -> int:
        return int(self.orientations.shape[0])

    def forward(
        self, h: torch.Tensor, orientation: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h (B, n_in) -> (B, V); ``orientation`` (B,) int64 picks a row of ``orientations`` per shower;
        ``c`` (B, C), the conditions, is needed with a template."""
        h = h.float()
        n_layers = len(self.layer_sizes)
        if self.template is not None:
            if c is None:
                raise ModelError("layered output with a template needs the conditions")
            t = self.template(c)
            total = t[:, :1] + torch.exp(t[:, 1:2]) * h[:, :1]
            h = torch.cat([total, h[:, 1:] + t[:, 2:]], dim=1)
        log_total = torch.clamp(h[:, :1], max=self.LOG_MAX_RATIO)
        log_layer = torch.log_softmax(h[:, 1 : 1 + n_layers], dim=1) + log_total
        if len(set(self.layer_sizes)) == 1 and n_layers > 1:  # equal layers (CaloChallenge 2, 3): one reshape
            v = h[:, 1 + n_layers :].unflatten(1, (n_layers, self.layer_sizes[0]))  # (a dynamic batch in ONNX)
            log_u = (torch.log_softmax(v, dim=2) + log_layer.unsqueeze(2)).flatten(1)
        else:
            blocks = torch.split(h[:, 1 + n_layers :], self.layer_sizes, dim=1)
            log_u = torch.cat([torch.log_softmax(b, dim=1) + log_layer[:, i : i + 1] for i, b in enumerate(blocks)], 1)
        if orientation is not None and self.n_orientations > 1:
            log_u = log_u.gather(1, self.orientations[orientation])
        if self.transform == "log":
            y = torch.logaddexp(log_u, torch.full_like(log_u, self.log_epsilon))
        else:
            sq = self.alpha + (1 - 2 * self.alpha) * torch.clamp(torch.exp(log_u), max=1.0)
            y = torch.log(sq) - torch.log1p(-sq)
        return (y - self.shift) / self.scale


def _shape_groups(layer_shapes: tuple[tuple[int, int], ...]) -> list[tuple[tuple[int, int], list[int]]]:
    """The active layers grouped by their (n_alpha, n_r): [(shape, [layer indices]), ...] in order of first use."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(layer_shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return list(groups.items())


class LayerDecoder(nn.Module):
    """Hidden state h (B, W) -> (B, V) voxel logits, layer by layer, from weights shared over the layers.

    Each active layer l gets a code ``g_l = act(mix(act(proj(h) * (1 + gamma_l) + beta_l)))`` of F
    features (``proj`` and ``mix`` shared, ``gamma_l`` and ``beta_l`` that layer's own), and one linear map
    per layer shape (n_alpha, n_r) turns a code into that layer's n_alpha x n_r logits. Parameters:
    W F + 2 L F + F^2 + sum over shapes (F + 1) n_alpha n_r, against W V for a dense output. With W 256,
    F 64: 6,480 voxels (45 layers of 16 x 9) 43 k instead of 1.66 M, 40,500 voxels (45 of 50 x 18)
    80 k instead of 10.4 M.
    """

    def __init__(self, width: int, layer_shapes: tuple[tuple[int, int], ...], features: int) -> None:
        super().__init__()
        n_layers = len(layer_shapes)
        self.proj = nn.Linear(width, features)
        self.gamma = nn.Parameter(torch.zeros(n_layers, features))
        self.beta = nn.Parameter(torch.randn(n_layers, features))  # tells the layers apart from the start
        self.mix = nn.Linear(features, features)
        groups = _shape_groups(layer_shapes)
        self.maps = nn.ModuleList(nn.Linear(features, a * r) for (a, r), _ in groups)
        for k, (_, layers) in enumerate(groups):
            self.register_buffer(f"layers_{k}", torch.tensor(layers, dtype=torch.int64), persistent=False)
        # the groups' outputs, concatenated, back into layer order (None: already in it)
        sizes = [a * r for a, r in layer_shapes]
        starts = np.cumsum([0, *sizes])
        order = np.concatenate([np.arange(starts[i], starts[i + 1]) for _, layers in groups for i in layers])
        inverse = np.argsort(order) if np.any(order != np.arange(len(order))) else None
        self.register_buffer(
            "inverse", None if inverse is None else torch.as_tensor(inverse, dtype=torch.int64), persistent=False
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = self.proj(h).unsqueeze(1) * (1 + self.gamma) + self.beta  # (B, L, F)
        g = nn.functional.leaky_relu(self.mix(nn.functional.leaky_relu(f, 0.2)), 0.2)
        parts = [m(g.index_select(1, getattr(self, f"layers_{k}"))).flatten(1) for k, m in enumerate(self.maps)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if self.inverse is None else out.index_select(1, self.inverse)


class LayerEncoder(nn.Module):
    """Voxels x (B, V) -> (B, L F / 4) layer codes: the critic's :class:`LayerDecoder`.

    Each layer's n_alpha x n_r voxels go through one linear map per layer shape (shared by the
    layers of that shape) to F features, plus that layer's own offset, then a shared map to F / 4;
    the codes of all layers, concatenated, are what the critic's MLP reads instead of the voxels.
    Parameters: sum over shapes (n_alpha n_r + 1) F + L F + F^2 / 4, and L F / 4 inputs of the MLP.
    """

    def __init__(self, layer_shapes: tuple[tuple[int, int], ...], features: int) -> None:
        super().__init__()
        self.sizes = [a * r for a, r in layer_shapes]
        self.groups = _shape_groups(layer_shapes)
        self.maps = nn.ModuleList(nn.Linear(a * r, features) for (a, r), _ in self.groups)
        self.offset = nn.Parameter(torch.zeros(len(layer_shapes), features))
        self.mix = nn.Linear(features, max(1, features // 4))
        # the groups' codes, concatenated, back into layer order
        order = np.argsort([i for _, members in self.groups for i in members])
        self.register_buffer("order", torch.as_tensor(order, dtype=torch.int64), persistent=False)

    @property
    def n_out(self) -> int:
        return len(self.sizes) * self.mix.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 1:
            codes = self.maps[0](x.unflatten(1, (len(self.sizes), self.sizes[0])))
        else:
            layers = torch.split(x, self.sizes, dim=1)
            parts = [
                m(torch.stack([layers[i] for i in members], dim=1))
                for m, (_, members) in zip(self.maps, self.groups, strict=True)
            ]
            codes = torch.cat(parts, dim=1).index_select(1, self.order)
        f = nn.functional.leaky_relu(codes + self.offset, 0.2)
        return nn.functional.leaky_relu(self.mix(f), 0.2).flatten(1)


class Generator(nn.Module):
    """G(z (B, z_dim), c (B, C)) -> (B, V) preprocessed voxels.

    ``output`` (from the config): ``linear``: unbounded, one value per voxel; ``layered``:
    :class:`LayeredHead`, which needs ``head`` (:func:`head_info`; its arrays are buffers, saved
    with the weights).

    ``symmetry`` (layered only): each generated shower is turned about its axis to one of the
    geometry's orientations (:meth:`surrogate.geometry.Geometry.orientations`), picked by the
    latent, so the sample is exactly symmetric and the network learns one orientation. Without
    it the generator was seen to collapse onto a few fixed azimuthal patterns (centroid
    distributions with spikes). Use it only where the data have the symmetry: the reference
    simulator's showers do (uniform azimuth); real showers away from normal incidence are
    stretched along eta and do not.
    """

    def __init__(self, cfg: ModelConfig, head: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        widths = [cfg.z_dim + cfg.cond_dim] + [cfg.g_width] * cfg.g_depth
        if cfg.conditioning == "film" and cfg.cond_dim > 0:
            self.blocks = nn.ModuleList(_FiLMBlock(a, b, cfg.cond_dim) for a, b in itertools.pairwise(widths))
        else:
            self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        if cfg.output != "linear" and head is None:
            raise ModelError(f"model config: output {cfg.output!r} needs the preprocessing (head_info)")
        self.head = LayeredHead(head, cfg.template_knots) if cfg.output == "layered" else None
        self.voxels: LayerDecoder | None = None
        if cfg.g_structure == "per_layer":  # the total and the layer shares here, the voxel shares there
            self.out = nn.Linear(widths[-1], 1 + len(cfg.layer_shapes))
            self.voxels = LayerDecoder(widths[-1], cfg.layer_shapes, cfg.g_layer_width)
        else:
            self.out = nn.Linear(widths[-1], self.head.n_in if self.head is not None else cfg.n_voxels)
        if self.head is not None and len(self.head.shift) != cfg.n_voxels:
            raise ModelError(f"layered output: preprocessing of {len(self.head.shift)} voxels, model of {cfg.n_voxels}")

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, c], dim=1)
        for block in self.blocks:
            h = block(h, c) if isinstance(block, _FiLMBlock) else nn.functional.leaky_relu(block(h), 0.2)
        h = self.out(h) if self.voxels is None else torch.cat([self.out(h), self.voxels(h)], dim=1)
        if self.head is None:
            return h
        orientation = None
        if self.head.n_orientations > 1:
            # the orientation is a function of the latent (its last component, uniform through
            # the normal CDF), so G stays a deterministic function of (z, c) and samples stay seeded
            u = 0.5 * (1.0 + torch.erf(z[:, -1].float() / math.sqrt(2.0)))
            orientation = torch.clamp((u * self.head.n_orientations).long(), 0, self.head.n_orientations - 1)
        return self.head(h, orientation, c)


class ShowerSums(nn.Module):
    """Network-space voxels (B, V) -> (B, L + 1) log energies of each layer and of the whole shower.

    Undoes the preprocessing in torch (gradients flow through it): u = E_vox / E_inc from
    ``x * scale + shift`` by the voxel transform (``log``: exp(y) - epsilon; ``logit``: sigmoid),
    sums u over each layer's voxels (``member`` (V, L)) and returns
    ``weight * (log(sums + DELTA) - feat_mean)`` with the total appended. With ``knots`` > 0 the
    centring and scale depend on the conditions instead: ``weight * (log(sums + DELTA) - m(c)) /
    s(c)``, m and log s fitted per particle at ``knots`` energies (``info["sums_table"]``, a
    :class:`ResponseTemplate` of width 2 (L + 1)). Then a resolution of 1% at 1 TeV weighs as much
    as one of 10% at 1 GeV: in absolute log energy a tenfold too narrow response at high energy
    is a small distance, and the generator was seen to settle there (resolution ratios 0.6).
    Every array is a buffer, saved with the critic's weights.
    """

    DELTA = 1e-5  # floor of the log, in units of E_inc

    def __init__(self, info: dict[str, Any], weight: float, knots: int = 0) -> None:
        super().__init__()
        self.transform = str(info["transform"])
        self.epsilon = float(info["epsilon"])
        self.weight = float(weight)
        if self.transform not in ("log", "logit"):
            raise ModelError(f"critic physics: unknown voxel transform {self.transform!r}")
        for name in ("shift", "scale", "member", "feat_mean"):
            self.register_buffer(name, torch.as_tensor(np.asarray(info[name], dtype=np.float32)))
        if self.member.ndim != 2 or self.shift.shape != (self.member.shape[0],):
            raise ModelError(
                f"critic physics: member {tuple(self.member.shape)} and shift {tuple(self.shift.shape)} "
                "do not describe the same voxels"
            )
        self.equal = _equal_layers(self.member)
        if self.feat_mean.shape != (self.member.shape[1] + 1,):
            raise ModelError(
                f"critic physics: feat_mean has shape {tuple(self.feat_mean.shape)}, "
                f"expected ({self.member.shape[1] + 1},)"
            )
        self.table = None
        if knots:
            self.table = ResponseTemplate(
                knots, int(info.get("n_particles", 1)), 2 * self.n_out, info.get("sums_table")
            )

    @property
    def n_out(self) -> int:
        return int(self.member.shape[1]) + 1

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) [at conditions (B, C), needed with ``knots``] -> (B, L + 1)."""
        # float32 even under bf16 autocast: a sum of hundreds of voxels needs the mantissa
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = _shares(x, self.scale, self.shift, self.transform, self.epsilon)
            sums = _layer_sum(u, self.member, self.equal)
            sums = torch.cat([sums, sums.sum(dim=1, keepdim=True)], dim=1)
            logs = torch.log(sums + self.DELTA)
            if self.table is None:
                return (self.weight * (logs - self.feat_mean)).to(x.dtype)
            if c is None:
                raise ModelError("critic physics standardised per condition needs the conditions")
            t = self.table(c)
            n = self.n_out
            return (self.weight * (logs - t[:, :n]) * torch.exp(-t[:, n:])).to(x.dtype)


def _equal_layers(member: torch.Tensor) -> int:
    """Voxels per layer when the (V, L) membership matrix has consecutive layers of one size, else 0."""
    counts = member.sum(dim=0)
    n = int(counts[0]) if len(counts) > 1 else 0
    if n == 0 or not bool(torch.all(counts == n)):
        return 0
    return n if bool(torch.all(member.argmax(dim=1) == torch.arange(len(member)) // n)) else 0


def _layer_sum(t: torch.Tensor, member: torch.Tensor, equal: int) -> torch.Tensor:
    """(B, V) -> (B, L) sums over each layer's voxels: a reshape when the layers are ``equal`` in size
    (45 layers of 900 voxels: 40x fewer operations than the product), else the product with ``member``."""
    return t.unflatten(1, (-1, equal)).sum(dim=2) if equal else t @ member


def _shares(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, transform: str, epsilon: float) -> torch.Tensor:
    """Network-space voxels (B, V) -> u = E_vox / E_inc (B, V), float32, >= 0 (the inverse voxel transform)."""
    y = x.float() * scale + shift
    if transform == "log":
        return torch.clamp(torch.exp(torch.clamp(y, max=20.0)) - epsilon, min=0.0)
    return torch.sigmoid(y)


class ReadoutThreshold(nn.Module):
    """Network-space voxels (B, V) at conditions (B, C) -> the same showers with the readout threshold applied.

    The generate stage zeroes every voxel below the real data's readout threshold (in MeV), so
    that is what validation judges; during training the generator's output has no threshold, and
    a critic that sees the raw output judges showers that are never written. Here a voxel with
    E_vox < threshold is set to the empty-voxel value, in the forward pass only: its gradient
    passes straight through (a hard mask would stop the gradient of every voxel below threshold,
    and nothing could ever bring one above it). The incident energy comes from the first
    condition column (log E scaled to [-1, 1] over ``log_e_range``, as
    :meth:`surrogate.preprocess.Preprocessor.transform_conditions` writes it). Real showers were
    read out with the same threshold, so for them it changes nothing.
    """

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__()
        self.transform, self.epsilon = str(info["transform"]), float(info["epsilon"])
        self.log_threshold = math.log(float(info["threshold_mev"]))
        self.log_e_lo, self.log_e_hi = (float(v) for v in info["log_e_range"])
        for name in ("shift", "scale"):
            self.register_buffer(name, torch.as_tensor(np.asarray(info[name], dtype=np.float32)))
        alpha = float(info.get("logit_alpha", 1e-6))
        empty = math.log(self.epsilon) if self.transform == "log" else math.log(alpha / (1 - alpha))
        self.register_buffer("empty", (torch.full_like(self.shift, empty) - self.shift) / self.scale)

    def log_u_threshold(self, c: torch.Tensor) -> torch.Tensor:
        """(B, C) conditions -> (B, 1) log(threshold / E_inc)."""
        log_e = self.log_e_lo + 0.5 * (c[:, :1].float() + 1.0) * (self.log_e_hi - self.log_e_lo)
        return self.log_threshold - log_e

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = _shares(x, self.scale, self.shift, self.transform, self.epsilon)
            visible = torch.log(u + 1e-30) >= self.log_u_threshold(c)
            xf = x.float()
            cut = torch.where(visible, xf, self.empty.expand_as(xf))
            return (xf + (cut - xf).detach()).to(x.dtype)


class ShowerShape(nn.Module):
    """Network-space voxels (B, V) at conditions (B, C) -> (B, 5 L) per-layer shape features, standardised.

    Per active layer: the energy-weighted centroid (x, y) and width (x, y) of the voxel centres in
    mm, as :func:`surrogate.features.compute_features` defines them, and the soft fraction of the
    layer's voxels above the readout threshold (a sigmoid of log(E_vox / threshold) / ``tau``, so
    it has a gradient). Each feature is centred and scaled by its spread in the training sample
    (``feat_mean``, ``feat_std``) and multiplied by ``weight``: these are the quantities of the
    validation's per-layer tests, given to the critic directly, since in voxel space a shift of the
    centroid or a few extra hits weigh little next to hundreds of sparse voxels.
    """

    TAU = 0.5  # width of the soft hit count, in units of log energy
    VAR_FLOOR = 1.0  # mm^2 added under the width's square root (finite gradient for one-voxel layers)

    def __init__(self, info: dict[str, Any], weight: float) -> None:
        super().__init__()
        self.transform, self.epsilon = str(info["transform"]), float(info["epsilon"])
        self.weight = float(weight)
        self.threshold = ReadoutThreshold(info)
        for name in ("shift", "scale", "member", "vx", "vy", "shape_mean", "shape_std"):
            self.register_buffer(name, torch.as_tensor(np.asarray(info[name], dtype=np.float32)))
        self.register_buffer("n_per_layer", self.member.sum(dim=0))
        self.equal = _equal_layers(self.member)

    @property
    def n_out(self) -> int:
        return 5 * int(self.member.shape[1])

    def raw(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, 5 L) unstandardised features: centre_x, centre_y, width_x, width_y (mm), hit fraction, per layer."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = _shares(x, self.scale, self.shift, self.transform, self.epsilon)

            def layer_sum(t: torch.Tensor) -> torch.Tensor:
                return _layer_sum(t, self.member, self.equal)

            s = layer_sum(u)
            inv = torch.where(s > 0, 1.0 / torch.clamp(s, min=1e-30), torch.zeros_like(s))
            mx, my = layer_sum(u * self.vx) * inv, layer_sum(u * self.vy) * inv
            vx = torch.clamp(layer_sum(u * self.vx**2) * inv - mx**2, min=0.0)
            vy = torch.clamp(layer_sum(u * self.vy**2) * inv - my**2, min=0.0)
            wx, wy = torch.sqrt(vx + self.VAR_FLOOR), torch.sqrt(vy + self.VAR_FLOOR)
            soft = torch.sigmoid((torch.log(u + 1e-30) - self.threshold.log_u_threshold(c)) / self.TAU)
            hits = layer_sum(soft) / self.n_per_layer
            return torch.cat([mx, my, wx, wy, hits], dim=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.weight * (self.raw(x, c) - self.shape_mean) / self.shape_std
        return out.to(x.dtype)


class Critic(nn.Module):
    """D(x (B, V), c (B, C)) -> (B,) unbounded Wasserstein score. No BatchNorm.

    ``D(x, c) = score(embed(x, c), c)``. ``embed`` is the identity unless the physics inputs are
    on: ``critic_threshold`` applies the readout threshold first (:class:`ReadoutThreshold`);
    ``critic_physics_weight`` > 0 appends :class:`ShowerSums` (the log layer and total energies,
    times the weight) and ``critic_shape_weight`` > 0 :class:`ShowerShape` (per-layer centroids,
    widths and soft hit fractions) to the voxels. The training loop applies the gradient penalty
    in that embedded space, so the weights set how much a difference in those quantities counts
    in the Wasserstein distance the critic estimates. Without them, a 10% error in the response
    moves a shower by little in the standardised voxel space next to the many sparse outer
    voxels, and the generator fixes it last (CaloGAN showed its critic the same sums for this reason).
    """

    def __init__(self, cfg: ModelConfig, physics: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        wrap = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        self.sums: ShowerSums | None = None
        self.shape: ShowerShape | None = None
        self.threshold: ReadoutThreshold | None = None
        needs = cfg.critic_physics_weight > 0 or cfg.critic_shape_weight > 0 or cfg.critic_threshold
        if needs and physics is None:
            raise ModelError("model config: the critic's physics inputs need the preprocessing and layer map")
        if not needs and physics is not None:
            raise ModelError("model config: the critic has no physics inputs but physics information was given")
        if cfg.critic_physics_weight > 0:
            self.sums = ShowerSums(physics, cfg.critic_physics_weight, cfg.critic_physics_knots)
        if cfg.critic_shape_weight > 0:
            self.shape = ShowerShape(physics, cfg.critic_shape_weight)
        if cfg.critic_threshold:
            self.threshold = ReadoutThreshold(physics)
        n_extra = (self.sums.n_out if self.sums else 0) + (self.shape.n_out if self.shape else 0)
        self.voxels: LayerEncoder | None = None
        n_shower = cfg.n_voxels
        if cfg.d_structure == "per_layer":
            self.voxels = LayerEncoder(cfg.layer_shapes, cfg.d_layer_width)
            n_shower = self.voxels.n_out
        n_in = cfg.critic_pack * (n_shower + n_extra + cfg.cond_dim) + (1 if cfg.minibatch_std else 0)
        layers: list[nn.Module] = []
        for _ in range(cfg.d_depth):
            layers.append(wrap(nn.Linear(n_in, cfg.d_width)))
            if cfg.critic_layernorm:
                layers.append(nn.LayerNorm(cfg.d_width))
            layers.append(nn.LeakyReLU(0.2))
            n_in = cfg.d_width
        layers.append(wrap(nn.Linear(n_in, 1)))
        self.net = nn.Sequential(*layers)

    def embed(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, V) at (B, C) -> (B, V [+ L + 1] [+ 5 L]): the space the critic scores (and the penalty is taken in)."""
        if self.threshold is not None:
            x = self.threshold(x, c)
        parts = [x]
        if self.sums is not None:
            parts.append(self.sums(x, c))
        if self.shape is not None:
            parts.append(self.shape(x, c))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def score(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Score embedded showers ``a`` (B, embedded width) at conditions ``c`` (B, C) -> (B / pack,).

        With ``critic_pack`` = m > 1, each m consecutive showers (with their conditions) are one
        input, and one score (PacGAN, Lin et al. 2018): a generator that drops a mode makes packs
        whose members are too alike, which a critic that sees several at once can tell. B must be
        a multiple of m.
        """
        m = self.cfg.critic_pack
        if len(a) % m:
            raise ModelError(f"critic: a batch of {len(a)} showers is not a whole number of packs of {m}")
        e = a
        if self.voxels is not None:  # the voxels as layer codes, the physics inputs as they are
            v = self.cfg.n_voxels
            e = torch.cat([self.voxels(a[:, :v]), a[:, v:]], dim=1)
        x = torch.cat([e, c.to(e.dtype)], dim=1).reshape(len(a) // m, -1)
        if self.cfg.minibatch_std:
            # a collapsed generator has a small spread across the batch: let the critic see it
            # sqrt(var + eps): std's gradient is 0/0 = NaN where a voxel is the same in the whole
            # batch (always empty ones), which the gradient penalty's double backward hits at step 1
            var = a.float().var(dim=0, unbiased=False)
            std = torch.sqrt(var + 1e-8).mean() if len(a) > 1 else a.new_zeros(())
            x = torch.cat([x, std.to(x.dtype).expand(len(x), 1)], dim=1)
        return self.net(x).squeeze(1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, V) at (B, C) -> (B / critic_pack,) scores."""
        return self.score(self.embed(x, c), c)


def build_models(
    cfg: ModelConfig, head: dict[str, Any] | None = None, physics: dict[str, Any] | None = None
) -> tuple[Generator, Critic]:
    """A fresh (generator, critic) pair with PyTorch's default initialisation (seed torch beforehand).

    ``head``: :func:`head_info`, required by ``output="layered"``; ``physics``: the
    :class:`ShowerSums` arrays, required by ``critic_physics``.
    """
    return Generator(cfg, head), Critic(cfg, physics)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Load ``generator.pt`` (EMA weights) -> (generator in eval mode on ``device``, metadata dict).

    The metadata holds every key of the checkpoint except the weights: ``format_version``,
    ``model_config``, ``preprocessing``, ``condition_names``, ``geometry``, ``step``, ``score``, ...
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: generator checkpoint not found (run the train stage)") from exc
    except Exception as exc:  # unpickling errors come in many types
        raise ModelError(f"{path}: not a readable generator checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "ema_state_dict" not in ckpt or "model_config" not in ckpt:
        raise ModelError(f"{path}: not a generator checkpoint (needs 'model_config' and 'ema_state_dict')")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"{path}: checkpoint format_version {version!r}, this code reads {FORMAT_VERSION}")
    mcfg = ModelConfig.from_dict(ckpt["model_config"])
    head = None
    if mcfg.output != "linear":
        from surrogate.geometry import Geometry
        from surrogate.preprocess import Preprocessor

        try:
            head = head_info(
                Preprocessor.from_dict(ckpt["preprocessing"]), Geometry.from_dict(ckpt["geometry"]), mcfg.symmetry
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{path}: output {mcfg.output!r} needs the checkpoint's preprocessing and geometry ({exc})"
            ) from exc
    G = Generator(mcfg, head)
    try:
        G.load_state_dict(ckpt["ema_state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the stored model_config ({exc})") from exc
    meta = {k: v for k, v in ckpt.items() if k != "ema_state_dict"}
    return G.to(device).eval(), meta


def sample(
    G: nn.Module,
    conditions: torch.Tensor | np.ndarray,
    seed: int | torch.Generator = 0,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Draw one sample per condition row: conditions (N, C) -> (N, V) float32 on the CPU, network space.

    Latents come from ``seed`` (an int, or a CPU ``torch.Generator`` that is advanced), drawn on
    the CPU in one piece, so the result depends on neither the device nor ``batch_size``.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    c_all = torch.as_tensor(
        np.asarray(conditions, dtype=np.float32) if isinstance(conditions, np.ndarray) else conditions
    ).float()
    if c_all.ndim != 2:
        raise ModelError(f"conditions have shape {tuple(c_all.shape)}, expected (N, C)")
    device = next(G.parameters()).device
    # all latents in one draw (N x z_dim floats): torch's CPU normal sampler orders its stream
    # differently for small and large draws, so per-batch draws would depend on batch_size
    z_all = torch.randn((len(c_all), int(G.z_dim)), generator=gen)
    out = []
    with torch.no_grad():
        for start in range(0, len(c_all), batch_size):
            c, z = c_all[start : start + batch_size], z_all[start : start + batch_size]
            out.append(G(z.to(device), c.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, G.cfg.n_voxels))
