"""neuronx-distributed's own trainer checkpointing (``save_checkpoint`` / ``load_checkpoint``), on
Trainium or in NxD's CPU mode, without the caller knowing what must be in place to import it."""

from __future__ import annotations

from types import ModuleType


def trainer() -> ModuleType:
    """``neuronx_distributed.trainer.checkpoint`` (``save_checkpoint``, ``load_checkpoint``,
    ``has_checkpoint``, ...), imported after :func:`crosschip_neuron.cpu_mode.nxd` (the stand-ins
    for the Neuron SDK where it is absent) and the ``transformers.utils.fx`` stand-in its pipeline
    import needs with transformers >= 5."""
    from crosschip_neuron import cpu_mode

    cpu_mode.nxd()
    cpu_mode.install_transformers_fx()
    import neuronx_distributed.trainer.checkpoint as checkpoint

    return checkpoint
