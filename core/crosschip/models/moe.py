"""Mixture-of-experts decoders: what a family states about its experts (:class:`MoEOptions`),
the feed-forward block each layer gets (a ``moe`` component on sparse layers, the dense gated
MLP elsewhere), the checkpoint names of the experts, and the routers' auxiliary loss."""

from __future__ import annotations

from dataclasses import dataclass

from crosschip.components.moe import load_balancing_loss
from crosschip.specs import GatedMLPSpec, MoESpec
from crosschip.weights.layouts import Rename


@dataclass(frozen=True)
class MoEOptions:
    """The experts of a decoder read from its Hugging Face config.

    ``sparse_layers``: per layer, whether its MLP is the mixture (Qwen3-MoE's
    ``decoder_sparse_step`` and ``mlp_only_layers``); ``block``: the checkpoint name of the MLP
    block (``mlp``, Mixtral's ``block_sparse_moe``); ``expert_roles``: the checkpoint names of
    each expert's gate, up and down projections (``gate_proj``... or Mixtral's ``w1, w3, w2``);
    ``aux_loss_coef`` and ``output_router_logits``: the router loss is added to the loss, scaled,
    when the config asks for it, as transformers does."""

    num_experts: int
    top_k: int
    intermediate_size: int
    sparse_layers: tuple[bool, ...]
    norm_topk_prob: bool = False
    block: str = "mlp"
    expert_roles: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    aux_loss_coef: float = 0.0
    output_router_logits: bool = False

    def spec(self, o) -> MoESpec:
        return MoESpec(o.hidden_size, self.intermediate_size, self.num_experts, self.top_k,
                       activation=o.activation, norm_topk_prob=self.norm_topk_prob)


def feed_forward(o, rt, layer: int, norm):
    """The layer's MLP: the mixture on a sparse layer (its norm stays a separate component), the
    dense gated MLP (which a backend may fuse with ``norm``) elsewhere."""
    if o.moe is not None and o.moe.sparse_layers[layer]:
        return rt.moe(o.moe.spec(o))
    return rt.gated_mlp(GatedMLPSpec(o.hidden_size, o.intermediate_size, activation=o.activation,
                                     bias=o.mlp_bias, input_norm=norm))


def checkpoint_transform(moe: MoEOptions):
    """Roles of a ``moe`` component -> the family's checkpoint names under its block."""
    gate, up, down = moe.expert_roles
    names = {"router.weight": "gate.weight"}
    for e in range(moe.num_experts):
        names.update({f"experts.{e}.gate.weight": f"experts.{e}.{gate}.weight",
                      f"experts.{e}.up.weight": f"experts.{e}.{up}.weight",
                      f"experts.{e}.down.weight": f"experts.{e}.{down}.weight"})
    return Rename.of(**names)


def auxiliary_loss(model, router_logits, attention_mask):
    """The routers' load-balancing loss over every sparse layer, as transformers computes it."""
    moe = model.opts.moe
    return load_balancing_loss(router_logits, moe.num_experts, moe.top_k, attention_mask)


def sparse_layers(config, num_layers: int) -> tuple[bool, ...]:
    """Qwen-MoE's rule: layer i is sparse unless listed in ``mlp_only_layers``, every
    ``decoder_sparse_step``-th layer (1: all)."""
    step = getattr(config, "decoder_sparse_step", None) or 1
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
