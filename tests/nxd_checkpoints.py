"""Saving and loading a rank's state through neuronx-distributed's own trainer checkpointing
(``neuronx_distributed.trainer.save_checkpoint`` / ``load_checkpoint``), plain or xser.

Call these inside a rank process of a gloo group in which NxD's CPU mode is on
(``NXD_CPU_MODE=1``) and ``parallel_state.initialize_model_parallel`` has run; every rank calls
them together (NxD synchronises with barriers). NxD names each rank's file after its dp / tp / pp
ranks: ``<directory>/<tag>/model/dp_rank_00_tp_rank_0R_pp_rank_00.pt`` (and ``optim/...``)."""

from __future__ import annotations

from pathlib import Path


def _checkpoint():
    from crosschip_neuron.nxd_trainer import trainer

    return trainer()


def save_with_nxd(directory: str | Path, tag: str, model_state: dict, optimizer_state: dict | None,
                  use_xser: bool) -> None:
    """NxD's ``save_checkpoint`` of this rank's ``model_state`` (a dict of tensors) and
    ``optimizer_state`` (a torch optimizer's ``state_dict()``, or None)."""
    _checkpoint().save_checkpoint(str(directory), tag, model=model_state, optimizer=optimizer_state,
                                  use_xser=use_xser)


def load_with_nxd(directory: str | Path, tag: str | None, model_template: dict, use_xser: bool,
                  optimizer_template: dict | None = None) -> tuple[dict, dict | None]:
    """NxD's ``load_checkpoint`` of this rank's model state (and optimizer state, given a template
    dict): ``(model, optimizer)``, new dicts holding the template's entries overwritten by what was
    saved (NxD fills a dict key by key). NxD tells the format from the files; ``use_xser`` is the
    format the caller expects, checked against it. ``tag=None``: NxD's newest completed tag."""
    checkpoint = _checkpoint()
    storage = checkpoint.create_checkpoint_storage(str(directory))
    if tag is not None and storage.is_checkpoint_xser(tag) != use_xser:
        raise AssertionError(f"{directory}/{tag} is {'' if not use_xser else 'not '}in the xser format")
    model = dict(model_template)
    optimizer = None if optimizer_template is None else dict(optimizer_template)
    checkpoint.load_checkpoint(str(directory), tag, model=model, optimizer=optimizer)
    return model, optimizer
