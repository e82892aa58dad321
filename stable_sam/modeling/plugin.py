"""The Stable-SAM plugin (DSP + DRP) and its attachment to SAM's mask decoder (SAM 1 or SAM 2).

Nothing of SAM is copied or replaced. A forward pre-hook on the token-to-image attention of the
decoder's second ``TwoWayAttentionBlock`` swaps that attention's keys and values for the routed mix

    v' = alpha_1 * deform(x_p) + alpha_2 * x_p,   k' = v' + (alpha_1 * pe_deformed + alpha_2 * pe)

where x_p is the image-side stream after layer 1 (the attention's ``v``), pe its positional
encoding (recovered as ``k - v``) and alpha comes from the output token after layer-2 self-attention
(recovered as ``q`` minus that token's own query positional embedding, which SAM sets to the
token's learned embedding). The image-to-token attention of the same block still sees x_p.

SAM 2's decoder (``sam2``) keeps the same two-way transformer and calls the attention the same way
(keyword ``q``, ``k``, ``v``; inside, ``scaled_dot_product_attention``, which the hook does not
touch). Its output tokens start with an object-score token, so the router's token sits one index
later there (``router_token_index``). Its high-resolution features enter only the upscaling after
the transformer: the plugin leaves them alone.

Which plugin runs is per call, in a context variable, so one frozen SAM serves plain-SAM and any
number of plugin versions from many threads at once without shared mutable state::

    with route(plugin) as routing:            # route(None): plain SAM
        masks, iou = sam.mask_decoder(...)
    routing.alpha                              # B x 2
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .drp import DynamicRoutingPlugin
from .dsp import DeformableSamplingPlugin

ROUTER_TOKENS = {"iou": 0, "mask": 1}


@dataclass(frozen=True)
class PluginConfig:
    """Every knob of the method doc; stored with each plugin checkpoint."""

    dim: int = 256
    layer: int = 1  # index of the TwoWayAttentionBlock: 1 is SAM's second decoder layer
    offset_range: float = 2.0  # tanh-bounded offsets, in feature-grid cells
    resample_pe: bool = True  # re-sample the positional encoding at the deformed locations too
    amplitude: bool = False  # third offset channel: a DCNv2-style sigmoid modulation
    use_drp: bool = True  # False: DSP alone with a constant alpha (ablation)
    router_token: str = "mask"  # "mask" (single-mask output token) or "iou"
    router_activation: str = "softmax"  # or "sigmoid"
    router_hidden: int = 32
    router_init_gap: float = 2.0  # logit gap regular - deformed at init: alpha ~ (0.12, 0.88)

    def __post_init__(self) -> None:
        if self.router_token not in ROUTER_TOKENS:
            raise ValueError(f"router_token must be one of {sorted(ROUTER_TOKENS)}, got {self.router_token!r}")
        if self.offset_range <= 0:
            raise ValueError(f"offset_range must be > 0 grid cells, got {self.offset_range}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PluginConfig":
        """A config from a checkpoint's dict (keys this version does not know are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown plugin config fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        """The config as a dict (stored with each plugin checkpoint)."""
        return asdict(self)


class StableSamPlugin(nn.Module):
    """DSP + DRP: about 0.08 M trainable parameters at C = 256."""

    def __init__(self, config: Optional[PluginConfig] = None) -> None:
        super().__init__()
        self.config = config or PluginConfig()
        c = self.config
        self.dsp = DeformableSamplingPlugin(c.dim, c.offset_range, c.resample_pe, c.amplitude)
        self.drp = DynamicRoutingPlugin(c.dim, c.router_hidden, c.router_activation, c.router_init_gap)
        if not c.use_drp:
            self.drp.requires_grad_(False)

    def forward(self, token: torch.Tensor, x: torch.Tensor, pe: torch.Tensor,
                grid_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token: B x C; x, pe: B x (H*W) x C. Returns routed values, routed pe (both
        B x (H*W) x C) and alpha (B x 2, deformed weight first)."""
        x_def, pe_def, _ = self.dsp(x, pe, grid_hw)
        alpha = self.drp(token if self.config.use_drp else torch.zeros_like(token))
        # Contiguous B x 1 x 1 weights: a strided view sends the mixes down a slow CPU path.
        a1, a2 = (alpha[:, i].reshape(-1, 1, 1).contiguous() for i in (0, 1))
        v, p = torch.lerp(x, x_def, a1), torch.lerp(pe, pe_def, a1)  # a1 x_def + (1 - a1) x, fused
        if self.config.router_activation == "sigmoid":  # independent gates: a1 + a2 need not be 1
            v, p = v + (a1 + a2 - 1) * x, p + (a1 + a2 - 1) * pe
        return v, p, alpha


@dataclass
class Routing:
    """What the plugin did during one decoder call: alpha per prompt (B x 2), or None (plain SAM)."""

    plugin: Optional[StableSamPlugin]
    alphas: List[torch.Tensor] = field(default_factory=list)

    @property
    def alpha(self) -> Optional[torch.Tensor]:
        """The last decoder call's alpha, B x 2 (deformed, regular); None for plain SAM."""
        return self.alphas[-1] if self.alphas else None


_ROUTING: contextvars.ContextVar[Optional[Routing]] = contextvars.ContextVar("stable_sam_routing", default=None)


@contextlib.contextmanager
def route(plugin: Optional[StableSamPlugin]) -> Iterator[Routing]:
    """Run the decoder calls inside this block through ``plugin`` (None: plain SAM)."""
    routing = Routing(plugin)
    token = _ROUTING.set(routing)
    try:
        yield routing
    finally:
        _ROUTING.reset(token)


_HOOK_ATTR = "_stable_sam_hook"


def router_token_index(decoder: nn.Module, router_token: str) -> int:
    """Index of the DRP token among the decoder's output tokens: SAM's are (IoU, mask 0..3); SAM 2
    puts its object-score token first (``pred_obj_scores``), shifting both by one."""
    return ROUTER_TOKENS[router_token] + (1 if getattr(decoder, "pred_obj_scores", False) else 0)


def attach(decoder: nn.Module, grid_hw: Tuple[int, int], layer: int = 1) -> nn.Module:
    """Install the routing hook on a SAM mask decoder (``segment_anything``'s or ``sam2``'s) whose
    image embedding is an h x w grid (idempotent). SAM's modules, weights and state dict are
    unchanged; outside ``route(plugin)`` the decoder is plain SAM."""
    target = decoder.transformer.layers[layer].cross_attn_token_to_image
    if getattr(target, _HOOK_ATTR, None) is not None:
        return decoder
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))

    def pre_hook(module: nn.Module, args: Tuple, kwargs: Dict[str, torch.Tensor]):
        routing = _ROUTING.get()
        if routing is None or routing.plugin is None:
            return None
        plugin = routing.plugin
        if plugin.config.layer != layer:
            raise RuntimeError(f"plugin is configured for decoder layer {plugin.config.layer}, "
                               f"attached at layer {layer}")
        q, k, v = kwargs["q"], kwargs["k"], kwargs["v"]
        name = plugin.config.router_token
        token_pe = decoder.iou_token.weight[0] if name == "iou" else decoder.mask_tokens.weight[0]
        token = q[:, router_token_index(decoder, name)] - token_pe
        v2, pe2, alpha = plugin(token, v, k - v, grid_hw)
        routing.alphas.append(alpha)
        return args, {"q": q, "k": v2 + pe2, "v": v2}

    handle = target.register_forward_pre_hook(pre_hook, with_kwargs=True)
    setattr(target, _HOOK_ATTR, handle)
    return decoder


def count_trainable(module: nn.Module) -> int:
    """The number of ``module``'s parameters that train (``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
