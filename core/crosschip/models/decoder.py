"""A pre-norm decoder-only transformer built only from runtime components. Each model file
describes its architecture as a :class:`DecoderOptions` (and, if its checkpoint stores fused
tensors, a checkpoint transform); nothing here knows about any backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from crosschip.modeling.masks import AttentionMask
from crosschip.modeling import CausalLM, CausalLMOutput
from crosschip.runtime import Runtime
from crosschip.specs import (
    AttentionSpec,
    EmbeddingSpec,
    LinearSpec,
    LMHeadSpec,
    LossSpec,
    NormSpec,
    QKVSpec,
    RopeSpec,
)
from crosschip.weights import whole

if TYPE_CHECKING:  # the mixture's options import this module's runtime pieces in turn
    from crosschip.models.moe import MoEOptions


@dataclass(frozen=True)
class DecoderOptions:
    """Everything that distinguishes one pre-norm decoder architecture from another, read from
    its Hugging Face config by the model file."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope: RopeSpec
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    #: What the q/k norms normalise: each head ("head", Qwen3) or the whole projection
    #: ("projection": OLMo-2, OLMoE, over num_heads * head_dim and num_kv_heads * head_dim).
    qk_norm_scope: str = "head"
    tie_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] | None = None  # per layer; None: full attention
    attention_dropout: float = 0.0
    padding_idx: int | None = None
    # Granite's multipliers (1.0 elsewhere); attention_scale None means head_dim ** -0.5.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float | None = None
    logits_divisor: float = 1.0
    #: Mixture-of-experts MLPs (Qwen3-MoE, Mixtral): see crosschip.models.moe.
    moe: MoEOptions | None = None
    #: Where the norms sit: "pre" (before attention and MLP, Llama), "post" (after each, on its
    #: output, OLMo-2) or "sandwich" (both, Gemma 2 and 3).
    norm_placement: str = "pre"
    #: Gemma's norms scale by (1 + weight): 1.0; every norm of the model (final and q/k included).
    norm_offset: float = 0.0
    #: Gemma 2's soft-capping of the attention logits and of the final logits (None: none).
    attn_softcap: float | None = None
    final_softcap: float | None = None
    #: One RopeSpec per layer where layers differ (Gemma 3: local and global); None: ``rope``.
    layer_ropes: tuple[RopeSpec, ...] | None = None
    #: Per layer, whether RoPE applies (SmolLM3's NoPE layers: False); None: every layer.
    rope_layers: tuple[bool, ...] | None = None
    #: Gemma rounds its embedding multiplier (sqrt(hidden)) to the activations' dtype first.
    round_embedding_multiplier: bool = False

    def __post_init__(self):
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"DecoderOptions.norm_placement must be one of {', '.join(NORM_PLACEMENTS)}, "
                             f"found {self.norm_placement!r}")
        for name in ("layer_ropes", "rope_layers", "sliding_windows"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_layers:
                raise ValueError(f"DecoderOptions.{name} has {len(value)} entries for {self.num_layers} layers")

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def norm(self, size: int | None = None, scope: str = "hidden") -> NormSpec:
        return NormSpec(size or self.hidden_size, self.norm_eps, scope=scope, offset=self.norm_offset)

    def layer_rope(self, layer: int) -> RopeSpec:
        return self.layer_ropes[layer] if self.layer_ropes else self.rope

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers is None or self.rope_layers[layer]


NORM_PLACEMENTS = ("pre", "post", "sandwich")


class SelfAttention(nn.Module):
    def __init__(self, o: DecoderOptions, rt: Runtime, layer: int, input_norm: NormSpec | None):
        super().__init__()
        self.qkv_proj = rt.qkv_projection(QKVSpec(
            o.hidden_size, o.num_heads, o.num_kv_heads, o.head_dim, bias=o.qkv_bias,
            input_norm=input_norm))
        if o.qk_norm:
            whole = o.qk_norm_scope == "projection"
            q, k = (o.num_heads * o.head_dim, o.num_kv_heads * o.head_dim) if whole else (o.head_dim, o.head_dim)
            self.q_norm = rt.rms_norm(o.norm(q, o.qk_norm_scope))
            self.k_norm = rt.rms_norm(o.norm(k, o.qk_norm_scope))
        self.attn = rt.attention(AttentionSpec(
            o.num_heads, o.num_kv_heads, o.head_dim, causal=True, sliding_window=o.window(layer),
            scale=o.attention_scale, dropout=o.attention_dropout, softcap=o.attn_softcap))
        self.rope = o.uses_rope(layer)
        self.o_proj = rt.out_projection(LinearSpec(
            o.num_heads * o.head_dim, o.hidden_size, bias=o.o_bias, parallel="row",
            input_heads=(o.num_heads, o.num_kv_heads)))
        self.qk_norm = o.qk_norm
        self.layer = layer

    def forward(self, hidden, rotary, tables, mask, cache=None):
        q, k, v = self.qkv_proj(hidden)
        if self.qk_norm:
            q, k = self._normed(self.q_norm, q), self._normed(self.k_norm, k)
        if self.rope:
            q, k = rotary.apply(q, k, tables)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(self.attn(q, k, v, mask))

    @staticmethod
    def _normed(norm, x):
        """A q or k norm on ``[batch, seq, heads, head_dim]``: per head, or over the projection
        (this rank's heads flattened; the norm's backend reduces over the others)."""
        if norm.crosschip_component.spec.scope == "projection":
            return norm(x.flatten(-2)).unflatten(-1, x.shape[-2:])
        return norm(x)


class DecoderLayer(nn.Module):
    """One block. Its norms keep their Hugging Face names: ``pre`` has ``input_layernorm`` and
    ``post_attention_layernorm`` (before the MLP); ``post`` has ``post_attention_layernorm`` and
    ``post_feedforward_layernorm`` on the outputs; ``sandwich`` has all four, the MLP's input
    norm being ``pre_feedforward_layernorm``. A pre-norm is a projection's ``input_norm``, which its
    backend may fuse (the module here is then an identity)."""

    def __init__(self, o: DecoderOptions, rt: Runtime, layer: int):
        super().__init__()
        before = o.norm_placement in ("pre", "sandwich")
        attn_norm = o.norm() if before else None
        mlp_norm = o.norm() if before else None
        self.self_attn = SelfAttention(o, rt, layer, attn_norm)
        from crosschip.models.moe import feed_forward

        self.mlp = feed_forward(o, rt, layer, mlp_norm)
        #: A mixture's router logits of the last forward (for the auxiliary loss).
        self.router_logits = None
        self.norm_names = _NORM_NAMES[o.norm_placement]
        attn_in, mlp_in, attn_out, mlp_out = self.norm_names
        # Identity when the projection's backend fused the norm in.
        if attn_in:
            setattr(self, attn_in, rt.input_norm(attn_norm, self.self_attn.qkv_proj))
        if mlp_in:
            setattr(self, mlp_in, rt.input_norm(mlp_norm, self.mlp))
        for name in (attn_out, mlp_out):
            if name:
                setattr(self, name, rt.rms_norm(o.norm()))
        self.residual_multiplier = o.residual_multiplier

    def _norm(self, index: int, x):
        name = self.norm_names[index]
        return getattr(self, name)(x) if name else x

    def forward(self, hidden, rotary, tables, mask, cache=None):
        attn = self._norm(2, self.self_attn(self._norm(0, hidden), rotary, tables, mask, cache))
        hidden = hidden + attn * self.residual_multiplier if self.residual_multiplier != 1.0 else hidden + attn
        mlp = self.mlp(self._norm(1, hidden))
        if isinstance(mlp, tuple):  # a mixture of experts: (output, router logits)
            mlp, self.router_logits = mlp
        mlp = self._norm(3, mlp)
        return hidden + mlp * self.residual_multiplier if self.residual_multiplier != 1.0 else hidden + mlp


#: Per placement, the Hugging Face names of (attention input, MLP input, attention output, MLP
#: output) norms; None where there is none.
_NORM_NAMES = {
    "pre": ("input_layernorm", "post_attention_layernorm", None, None),
    "post": (None, None, "post_attention_layernorm", "post_feedforward_layernorm"),
    "sandwich": ("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"),
}


class DecoderModel(nn.Module):
    def __init__(self, o: DecoderOptions, rt: Runtime):
        super().__init__()
        self.embed_tokens = rt.embedding(EmbeddingSpec(o.vocab_size, o.hidden_size, o.padding_idx))
        self.layers = nn.ModuleList(DecoderLayer(o, rt, i) for i in range(o.num_layers))
        self.norm = rt.rms_norm(o.norm())
        self.rotary_emb = rt.rotary(o.rope)
        # Layers whose RoPE differs (Gemma 3's local layers) share one more rotary per spec.
        specs = [o.layer_rope(i) for i in range(o.num_layers)]
        others = list(dict.fromkeys(spec for spec in specs if spec != o.rope))
        self.layer_rotary = nn.ModuleList(rt.rotary(spec) for spec in others)
        self.rotary_of = [0 if spec == o.rope else 1 + others.index(spec) for spec in specs]
        self.embedding_multiplier = o.embedding_multiplier
        self.round_multiplier = o.round_embedding_multiplier
        self.runtime = rt

    def forward(self, input_ids, mask: AttentionMask, position_ids, cache=None, graphs=None):
        """``graphs``: the model's recorded layer graphs (:mod:`crosschip.modeling.layer_graphs`),
        when this forward replays them."""
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            multiplier = self.embedding_multiplier
            if self.round_multiplier:  # as Gemma: the multiplier itself in the activations' dtype
                multiplier = torch.tensor(multiplier, dtype=hidden.dtype, device=hidden.device)
            hidden = hidden * multiplier
        rotaries = [self.rotary_emb, *self.layer_rotary]
        tables = [rotary(position_ids, hidden.dtype) for rotary in rotaries]
        if graphs is not None:
            return self.norm(graphs.run(hidden, [tables[which] for which in self.rotary_of]))
        for index, layer in enumerate(self.layers):
            which = self.rotary_of[index]
            args = (hidden, rotaries[which], tables[which], mask)
            if self.training and cache is None and self.runtime.checkpoint_layer(index):
                hidden = self.runtime.checkpoint(layer, *args)
            else:
                hidden = layer(*args, cache)
        return self.norm(hidden)


class DecoderForCausalLM(CausalLM):
    """Decoder + LM head + loss. Subclasses turn a Hugging Face config into DecoderOptions."""

    @classmethod
    def options(cls, config) -> DecoderOptions:
        raise NotImplementedError(f"{cls.__name__} must describe its architecture")

    def __init__(self, config, runtime: Runtime):
        super().__init__(config, runtime)
        o = self.options(config)
        self.opts = o
        if not o.tie_embeddings:
            self.ignored_checkpoint_keys = frozenset()
        self.model = DecoderModel(o, runtime)
        self.lm_head = runtime.lm_head(LMHeadSpec(o.hidden_size, o.vocab_size, tied=o.tie_embeddings,
                                                  logits_divisor=o.logits_divisor, softcap=o.final_softcap))
        if o.tie_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.loss_fn = runtime.loss(LossSpec(o.vocab_size))

    def blocks(self) -> list[nn.Module]:
        return list(self.model.layers)

    #: compile="cuda-graph": the recorded layer graphs (crosschip.modeling.layer_graphs), else None.
    layer_graphs = None

    #: A tied checkpoint may still carry its lm_head copy; it is not loaded.
    ignored_checkpoint_keys = frozenset({"lm_head.weight"})

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                cache=None, return_logits: bool = True, last_logits_only: bool = False,
                document_ids=None) -> CausalLMOutput:
        """``attention_mask``: ``[batch, past + seq]``, 1 for real tokens; ``document_ids``:
        ``[batch, seq]``, the document of each position of a packed row (attention stays within
        a document; give ``position_ids`` restarting at each document too, and labels of -100 at
        each document's first token, so that no document predicts the next one's start);
        ``cache``: from :meth:`new_cache`, holding the past keys and values (the caller moves it on
        with ``cache.advance(seq)`` after the forward, as ``generate`` does);
        ``last_logits_only``: logits of the last position only (``[batch, 1, vocab]``: a
        generation's prompt step needs no others, and they are the largest tensor of a forward)."""
        if last_logits_only and labels is not None:
            raise ValueError("last_logits_only=True keeps one position's logits; the loss needs them all")
        past = cache.seq_len if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(input_ids.shape[1], device=input_ids.device)).unsqueeze(0)
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids (packed sequences) apply to training forwards, not to cached generation")
        mask = AttentionMask(padding=attention_mask, q_offset=past, documents=document_ids)
        # compile="cuda-graph": recorded (at the first such forward) outside the autocast below.
        graphs = self.layer_graphs
        replay = graphs is not None and graphs.prepare(self, input_ids, position_ids, mask, cache)
        with self.runtime.autocast():
            hidden = self.model(input_ids, mask, position_ids, cache, graphs if replay else None)
            # A sequence-parallel stream is sharded (and laid out) as its backend keeps it, and its
            # last position lives on one rank: the LM head takes it whole, and its logits are cut.
            sharded = self.runtime.parallel.sequence_parallel
            head_input = hidden[:, -1:] if last_logits_only and not sharded else hidden
            logits = self.lm_head(head_input) if return_logits else None
            if last_logits_only and sharded and logits is not None:
                logits = logits[:, -1:]
            loss = self.loss_fn(hidden, labels, self.lm_head, logits) if labels is not None else None
        aux_loss = self._auxiliary_loss(attention_mask) if self.opts.moe is not None and cache is None else None
        if loss is not None and aux_loss is not None and self.opts.moe.output_router_logits:
            loss = loss + self.opts.moe.aux_loss_coef * aux_loss
        return CausalLMOutput(logits=whole(logits), loss=loss, aux_loss=aux_loss)  # logits gathered if sharded

    def _auxiliary_loss(self, attention_mask):
        from crosschip.models.moe import auxiliary_loss

        logits = tuple(layer.router_logits for layer in self.model.layers if layer.router_logits is not None)
        return auxiliary_loss(self, logits, attention_mask) if logits else None

    def new_cache(self, max_length: int | None = None, device=None):
        from crosschip.modeling.generation import kv_cache

        return kv_cache(self.opts.num_layers, max_length, device)

    @property
    def max_positions(self) -> int:
        return self.opts.rope.max_position_embeddings

    def checkpoint_transform(self, path, info):
        if info.component == "moe":
            from crosschip.models.moe import checkpoint_transform

            return checkpoint_transform(self.opts.moe)
        return super().checkpoint_transform(path, info)

    def checkpoint_names(self) -> dict[str, dict[str, str]]:
        names = {}
        for i in range(self.opts.num_layers):
            p = f"model.layers.{i}"
            names[f"{p}.self_attn.qkv_proj"] = {
                "q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj",
                "v": f"{p}.self_attn.v_proj", "qkv_proj": f"{p}.self_attn.qkv_proj",
                "norm": f"{p}.input_layernorm"}
            mlp_norm = _NORM_NAMES[self.opts.norm_placement][1] or "post_attention_layernorm"
            names[f"{p}.mlp"] = {
                "gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj",
                "down": f"{p}.mlp.down_proj", "gate_up_proj": f"{p}.mlp.gate_up_proj",
                "norm": f"{p}.{mlp_norm}"}
            if self.opts.moe is not None and self.opts.moe.sparse_layers[i]:
                names[f"{p}.mlp"] = {"": f"{p}.{self.opts.moe.block}"}
        return names
