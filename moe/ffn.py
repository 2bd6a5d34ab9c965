"""UniBiFFN: the original causal FFN (expert 0, frozen) beside a bidirectional copy (expert 1), with a router.

What differs from the public UBMoE code: its top-1 router renormalises the chosen weight to exactly
1, so the language-model loss gives the router no gradient. Here top-1 routing keeps a gradient,
either straight-through (forward = the chosen expert exactly, backward as the soft mixture) or
Switch-style (the chosen expert's output scaled by its router probability).

Routing modes (switchable at run time, ``ffn.routing = "soft"``):

* ``soft``    — softmax-weighted sum of both experts.
* ``top1``    — each token goes to its most probable expert; gradient per ``top1_gradient``.
* ``forced0`` — every token to expert 0 (the original FFN: reproduces the original model exactly).
* ``forced1`` — every token to expert 1 (the bidirectionally fine-tuned FFN).
* ``confident`` — stay causal unless the router is sure: a token whose expert-1 probability exceeds
  ``confidence`` gets the ``soft`` mixture, every other token exactly expert 0. ``confidence: 0`` is
  ``soft`` (a probability is never below 0) and ``confidence: 1`` is ``forced0``, token for token. A
  generation rule over trained routers: expert 1 only where the router learned that it helps.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from bidirlm_pl.core.errors import BidirLMError

ROUTING_MODES = ("soft", "top1", "forced0", "forced1", "confident")
TOP1_GRADIENTS = ("straight_through", "switch")
ROUTER_INITS = ("zeros", "normal")
NUM_EXPERTS = 2


def check_routing(mode: str) -> str:
    if mode not in ROUTING_MODES:
        raise BidirLMError(f"routing mode '{mode}' is not one of {list(ROUTING_MODES)}")
    return mode


def check_confidence(value) -> float:
    """A ``confident`` routing threshold: a number from 0 (``soft``) to 1 (``forced0``)."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise BidirLMError(f"confidence {value!r} is not a number; expected a threshold from 0 to 1") from None
    if not 0.0 <= threshold <= 1.0:
        raise BidirLMError(f"confidence {threshold} is outside [0, 1]; 0 routes as soft, 1 as forced0")
    return threshold


class UniBiFFN(nn.Module):
    """Two-expert FFN for one decoder layer: ``experts[0]`` original (frozen), ``experts[1]`` a copy.

    Args:
        ffn: the layer's original FFN module; it becomes expert 0 (the same object, frozen).
        hidden_size: width of the FFN input (the router reads it).
        routing: one of ``ROUTING_MODES``.
        top1_gradient: ``straight_through`` or ``switch`` (how top-1 routing passes a gradient).
        router_init: ``zeros`` (both experts equally likely) or ``normal`` (std ``router_std``).
        prior_expert0: initial router probability of expert 0 (through the router bias).
        confidence: ``confident`` routing's threshold on the expert-1 probability (0: soft, 1: forced0).

    >>> mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    >>> ffn = UniBiFFN(mlp, hidden_size=8, routing="forced0")
    >>> x = torch.randn(2, 3, 8)
    >>> torch.equal(ffn(x), mlp(x))
    True
    >>> ffn.routing = "soft"; ffn(x).shape
    torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        ffn: nn.Module,
        hidden_size: int,
        *,
        routing: str = "soft",
        top1_gradient: str = "straight_through",
        router_init: str = "zeros",
        router_std: float = 0.02,
        prior_expert0: float = 0.5,
        confidence: float = 0.9,
    ):
        super().__init__()
        if top1_gradient not in TOP1_GRADIENTS:
            raise BidirLMError(f"top1_gradient '{top1_gradient}' is not one of {list(TOP1_GRADIENTS)}")
        if router_init not in ROUTER_INITS:
            raise BidirLMError(f"router_init '{router_init}' is not one of {list(ROUTER_INITS)}")
        if not 0.0 < prior_expert0 < 1.0:
            raise BidirLMError(f"prior_expert0 {prior_expert0} is not strictly between 0 and 1")
        # share the (read-only) config object instead of copying it
        memo = {id(ffn.config): ffn.config} if hasattr(ffn, "config") else {}
        expert1 = copy.deepcopy(ffn, memo)
        for p in ffn.parameters():
            p.requires_grad_(False)
        self.experts = nn.ModuleList([ffn, expert1])
        weight = next(ffn.parameters())
        self.router = nn.Linear(hidden_size, NUM_EXPERTS, bias=True, device=weight.device, dtype=weight.dtype)
        self.top1_gradient = top1_gradient
        self.reset_router(router_init, router_std, prior_expert0)
        self.routing = routing
        self.confidence = check_confidence(confidence)
        # the last forward's router probabilities (B, T, E) and chosen experts (B, T); read by the
        # load-balancing loss and by RouterStats, cleared with clear_routing_record()
        self.last_probs_BTE: torch.Tensor | None = None
        self.last_choice_BT: torch.Tensor | None = None

    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, mode: str) -> None:
        self._routing = check_routing(mode)

    @torch.no_grad()
    def reset_router(self, init: str = "zeros", std: float = 0.02, prior_expert0: float = 0.5) -> None:
        if init == "zeros":
            self.router.weight.zero_()
        else:
            self.router.weight.normal_(0.0, std)
        # softmax([b0, b1]) = [prior, 1 - prior]
        logit = math.log(prior_expert0 / (1.0 - prior_expert0))
        self.router.bias.copy_(torch.tensor([logit / 2, -logit / 2], dtype=self.router.bias.dtype))

    def router_probs(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Router probabilities (B, T, E), computed in float32 for a stable softmax."""
        logits_BTE = self.router(x_BTD)
        return torch.softmax(logits_BTE.float(), dim=-1)

    def clear_routing_record(self) -> None:
        self.last_probs_BTE = None
        self.last_choice_BT = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        mode = self._routing
        if mode == "forced0":
            self.last_choice_BT = torch.zeros(x_BTD.shape[:-1], dtype=torch.long, device=x_BTD.device)
            self.last_probs_BTE = None
            return self.experts[0](x_BTD)
        if mode == "forced1":
            self.last_choice_BT = torch.ones(x_BTD.shape[:-1], dtype=torch.long, device=x_BTD.device)
            self.last_probs_BTE = None
            return self.experts[1](x_BTD)
        probs_BTE = self.router_probs(x_BTD)
        choice_BT = probs_BTE.argmax(dim=-1)
        self.last_probs_BTE, self.last_choice_BT = probs_BTE, choice_BT.detach()
        dtype = x_BTD.dtype
        if mode == "soft":
            out0, out1 = self.experts[0](x_BTD), self.experts[1](x_BTD)
            return probs_BTE[..., :1].to(dtype) * out0 + probs_BTE[..., 1:].to(dtype) * out1
        if mode == "confident":
            return self._confident(x_BTD, probs_BTE)
        # top1
        if not (torch.is_grad_enabled() and self.router.weight.requires_grad):
            return self._dispatch(x_BTD, choice_BT, probs_BTE)
        hard_BTE = nn.functional.one_hot(choice_BT, NUM_EXPERTS).to(probs_BTE.dtype)
        if self.top1_gradient == "straight_through":
            # forward: exactly the chosen expert; backward: d/dp of the soft mixture
            weights_BTE = hard_BTE + probs_BTE - probs_BTE.detach()
        else:  # switch: the chosen expert scaled by its probability
            weights_BTE = hard_BTE * probs_BTE
        out0, out1 = self.experts[0](x_BTD), self.experts[1](x_BTD)
        return weights_BTE[..., :1].to(dtype) * out0 + weights_BTE[..., 1:].to(dtype) * out1

    def _confident(self, x_BTD: torch.Tensor, probs_BTE: torch.Tensor) -> torch.Tensor:
        """The soft mixture where p1 > confidence, exactly expert 0 elsewhere (expert 1 runs on sure tokens only)."""
        sure_BT = probs_BTE[..., 1] > self.confidence
        self.last_choice_BT = sure_BT.long()
        out_BTD = self.experts[0](x_BTD)
        if not bool(sure_BT.any()):
            return out_BTD
        if bool(sure_BT.all()):  # every token sure: the soft mixture, computed as soft computes it
            p_BTE = probs_BTE.to(x_BTD.dtype)
            return p_BTE[..., :1] * out_BTD + p_BTE[..., 1:] * self.experts[1](x_BTD)
        x_ND, p_NE = x_BTD[sure_BT], probs_BTE[sure_BT].to(x_BTD.dtype)
        mixed_ND = p_NE[:, :1] * out_BTD[sure_BT] + p_NE[:, 1:] * self.experts[1](x_ND)
        return out_BTD.index_put((sure_BT,), mixed_ND)

    def _dispatch(self, x_BTD: torch.Tensor, choice_BT: torch.Tensor, probs_BTE: torch.Tensor) -> torch.Tensor:
        """Top-1 without a router gradient: run each expert only on its own tokens."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        choice_N = choice_BT.reshape(-1)
        out_ND = torch.empty_like(x_ND)
        for e in range(NUM_EXPERTS):
            idx = (choice_N == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                y = self.experts[e](x_ND[idx])
                if self.top1_gradient == "switch":
                    y = y * probs_BTE.reshape(-1, NUM_EXPERTS)[idx, e, None].to(y.dtype)
                out_ND[idx] = y
        return out_ND.reshape(x_BTD.shape)


def load_balancing_loss(probs_BTE: torch.Tensor, choice_BT: torch.Tensor, mask_BT: torch.Tensor | None = None):
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e`` (1.0 when balanced), padding excluded.

    ``f_e`` is the share of tokens whose top expert is ``e``, ``P_e`` the mean router probability.

    >>> p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]); load_balancing_loss(p, p.argmax(-1)).item()
    1.0
    """
    E = probs_BTE.shape[-1]
    if mask_BT is None:
        mask_BT = torch.ones(choice_BT.shape, dtype=torch.bool, device=choice_BT.device)
    mask_N = mask_BT.reshape(-1).bool()
    probs_NE = probs_BTE.reshape(-1, E)[mask_N]
    share_E = nn.functional.one_hot(choice_BT.reshape(-1)[mask_N], E).float().mean(0)
    return E * (share_E * probs_NE.mean(0)).sum()
