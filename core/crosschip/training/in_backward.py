"""The optimizer step fused into the backward pass: each parameter is updated by the run's
optimizer, over that parameter alone, as soon as its gradient is complete
(``register_post_accumulate_grad_hook``), and its gradient is freed right away. The model's
gradients then never all exist at once: an 8B model in bf16 drops 16 GB of peak memory, which
buys activations that would otherwise be recomputed.

What it gives up, by construction: clipping by the global gradient norm (the norm is known only
once every parameter has stepped; it is still measured) and gradient accumulation over
micro-batches (each backward steps). Under data parallelism FSDP2 reduce-scatters each gradient
outside autograd and then runs the sharded parameter's post-accumulate-grad hooks itself, so the
step sees the reduced shard (on FSDP2's reduce stream, which the next forward waits for).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from crosschip.errors import ConfigurationError

#: Set on an optimizer while it steps in backward, and on each of its parameters (whose gradient
#: is then consumed as soon as it is accumulated: see :func:`grads_consumed_at_once`).
_ACTIVE = "_crosschip_steps_in_backward"
_paused = 0


@contextlib.contextmanager
def paused():
    """Backward passes inside this context step nothing: they are not training steps (recording
    CUDA graphs runs warm-up backwards over sample inputs, crosschip.modeling.layer_graphs)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def step_in_backward(optimizer: torch.optim.Optimizer, observe: Callable | None = None) -> "InBackward":
    """Step each of ``optimizer``'s parameters in the backward pass, as soon as its gradient is
    accumulated, and free that gradient. The optimizer stays what the training loop holds: its
    ``param_groups`` (a schedule's ``lr``), state and ``state_dict`` are the ones it always had,
    so a training state saved either way resumes either way; its ``step()`` and ``zero_grad()``
    after the backward find no gradients and do nothing. ``observe(param)``, if given, sees each
    gradient before its step (``crosschip train`` sums the squares for the gradient norm).
    Returns a handle whose ``remove()`` makes the optimizer step after the backward again; a
    second call while one is active is refused (every parameter would step twice).

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        step_in_backward(optimizer)
        model(ids, labels=ids).loss.backward()  # every parameter updated, no gradient kept
    """
    if getattr(optimizer, _ACTIVE, False):
        raise ConfigurationError("optimizer in backward: this optimizer already steps in the backward pass "
                                 "(remove() the handle step_in_backward returned first)")
    handles, params = [], []
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if param.requires_grad:
                handles.append(param.register_post_accumulate_grad_hook(_stepping(optimizer, index, observe)))
                params.append(param)
    if not handles:
        raise ConfigurationError("optimizer in backward: the optimizer holds no trainable parameters")
    setattr(optimizer, _ACTIVE, True)
    for param in params:
        setattr(param, _ACTIVE, True)
    return InBackward(optimizer, handles, params)


def grads_consumed_at_once(params) -> bool:
    """Whether every one of ``params`` that trains is stepped in the backward, so its gradient is
    used and dropped as soon as it is accumulated: a gradient may then alias a buffer that the
    next backward overwrites (CUDA graphs' static gradients), with nothing left to read it."""
    trainable = [p for p in params if p.requires_grad]
    return bool(trainable) and all(getattr(p, _ACTIVE, False) for p in trainable)


class InBackward:
    """What :func:`step_in_backward` returns: ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer, handles: list, params: list):
        self.optimizer, self.handles, self.params = optimizer, handles, params

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for param in self.params:
            setattr(param, _ACTIVE, False)
        self.handles, self.params = [], []
        setattr(self.optimizer, _ACTIVE, False)


def _stepping(optimizer: torch.optim.Optimizer, index: int, observe: Callable | None):
    def hook(param: torch.nn.Parameter) -> None:
        if _paused:
            return
        if observe is not None:
            observe(param)
        # The optimizer's own step over this one parameter, with its group's current settings:
        # the group is looked up now, as load_state_dict and schedules replace or change it.
        groups = optimizer.param_groups
        optimizer.param_groups = [{**groups[index], "params": [param]}]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
        param.grad = None

    return hook
