"""``torch.compile`` as a runtime option (``from_pretrained(compile=...)``, ``crosschip train
--compile``): compiled in place (``nn.Module.compile``), so the model stays the same object with the
same methods and state dict, and the backward is compiled with the forward it derives from.

What is compiled is each repeated block (decoder layer) and, without tensor parallelism, the loss
(which holds the LM head when no logits are asked for), not the model as one graph, as torchtitan
does, for three reasons: the blocks are identical, so one compilation serves all of them (an 8B
model compiles one layer, not 32 unrolled); data parallelism's FSDP2 hooks sit at block
boundaries, outside the compiled code; and the vocabulary-parallel embedding and loss of tensor
parallelism (``_MaskPartial``, ``loss_parallel``) do not trace, while the blocks' DTensor
projections do. A model without blocks is compiled whole.

Adapters are attached before compiling (their hooks are part of the traced forward). Training
steps of a fixed shape compile once; ``generate`` runs such a model's steps eagerly, since their
shapes change every token. Generation has its own option, ``generate(compile=True)``
(:mod:`crosschip.modeling.decode_step`): the decode step over the static cache, whose shapes do
not change from token to token.
"""

from __future__ import annotations

from crosschip.errors import ConfigurationError

#: ``torch.compile`` options a caller may give (``compile={"mode": "max-autotune"}``).
OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")
#: ``compile=CUDA_GRAPH``: CUDA graphs without torch.compile, of the training layers
#: (:mod:`crosschip.modeling.layer_graphs`) or of ``generate``'s decode step.
CUDA_GRAPH = "cuda-graph"


def compile_model(model, option) -> None:
    """Compile ``model`` in place when ``option`` is True or a dict of ``torch.compile`` options;
    nothing for False or None. Records the options as ``model.compiled``. :data:`CUDA_GRAPH`
    records the layers' training steps as CUDA graphs instead, at the first training forward."""
    if option is None or option is False:
        model.compiled = None
        return
    if option == CUDA_GRAPH:
        from crosschip.modeling.layer_graphs import LayerGraphs, check_graphable

        check_graphable(model)
        model.compiled = None  # nothing is torch.compiled: generation's steps run as they do uncompiled
        model.layer_graphs = LayerGraphs()
        return
    if option is True:
        kwargs = {}
    elif isinstance(option, dict):
        unknown = sorted(set(option) - set(OPTIONS))
        if unknown:
            raise ConfigurationError(f"compile={option!r}: unknown torch.compile option(s) {unknown}; expected "
                                     f"some of {', '.join(OPTIONS)}")
        kwargs = dict(option)
    else:
        raise ConfigurationError(f"compile={option!r}: expected True, False, {CUDA_GRAPH!r} or a dict of "
                                 "torch.compile options")
    blocks = model.blocks() if hasattr(model, "blocks") else []
    if not blocks:
        model.compile(**kwargs)
    for block in blocks:
        block.compile(**kwargs)
    loss = getattr(model, "loss_fn", None)
    if blocks and loss is not None and model.runtime.parallel.tp == 1:
        loss.compile(**kwargs)
    model.compiled = kwargs
