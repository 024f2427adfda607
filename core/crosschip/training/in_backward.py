"""The optimizer step fused into the backward pass: each parameter is updated by the run's
optimizer as soon as its gradient is complete (``register_post_accumulate_grad_hook``), and its
gradient is freed right away. The model's gradients then never all exist at once: an 8B model in
bf16 drops 16 GB of peak memory, which buys activations that would otherwise be recomputed.

Gradients of plain (not distributed) parameters wait in a bucket until :data:`BUCKET_NUMEL`
elements are ready, and step together: a fused optimizer's launch over one small tensor (a 1B
model's attention projections, its norms) occupies a fraction of the GPU, and the optimizer's
Python step costs the host a fixed time per call. The last bucket steps when the backward ends
(an autograd final callback), so no gradient outlives its backward either way. Distributed
parameters (DTensors) step one by one, as their hooks come, on the stream those run on.

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
from torch.distributed.tensor import DTensor

from crosschip.errors import ConfigurationError

#: Set on an optimizer while it steps in backward, and on each of its parameters (whose gradient
#: is then consumed before its backward ends: see :func:`grads_consumed_at_once`).
_ACTIVE = "_crosschip_steps_in_backward"
_paused = 0

#: How many gradient elements wait before they step together: 32M elements give a fused AdamW
#: launch enough blocks (64k elements each) to fill an H100. A bucket holds at most this plus one
#: parameter's gradient: 64 MB and more in bf16, against a whole model's gradients without it.
BUCKET_NUMEL = 1 << 25


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


def step_in_backward(optimizer: torch.optim.Optimizer, observe: Callable | None = None,
                     bucket_numel: int = BUCKET_NUMEL) -> "InBackward":
    """Step each of ``optimizer``'s parameters in the backward pass, once its gradient is
    accumulated (with others, up to ``bucket_numel`` elements; 0 steps each alone), and free that
    gradient. The optimizer stays what the training loop holds: its ``param_groups`` (a
    schedule's ``lr``), state and ``state_dict`` are the ones it always had, so a training state
    saved either way resumes either way; its ``step()`` and ``zero_grad()``
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
    bucket = _Bucket(optimizer, bucket_numel)  # one per optimizer: its steps may span groups
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if param.requires_grad:
                handles.append(param.register_post_accumulate_grad_hook(_stepping(bucket, index, observe)))
                params.append(param)
    if not handles:
        raise ConfigurationError("optimizer in backward: the optimizer holds no trainable parameters")
    setattr(optimizer, _ACTIVE, True)
    for param in params:
        setattr(param, _ACTIVE, True)
    return InBackward(optimizer, handles, params, bucket)


def grads_consumed_at_once(params) -> bool:
    """Whether every one of ``params`` that trains is stepped in the backward, so its gradient is
    used and dropped before that backward ends: a gradient may then alias a buffer that the next
    backward overwrites (CUDA graphs' static gradients), with nothing left to read it."""
    trainable = [p for p in params if p.requires_grad]
    return bool(trainable) and all(getattr(p, _ACTIVE, False) for p in trainable)


class InBackward:
    """What :func:`step_in_backward` returns: ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer, handles: list, params: list, bucket: "_Bucket"):
        self.optimizer, self.handles, self.params, self.bucket = optimizer, handles, params, bucket

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for param in self.params:
            setattr(param, _ACTIVE, False)
        self.handles, self.params = [], []
        setattr(self.optimizer, _ACTIVE, False)


def _stepping(bucket: "_Bucket", index: int, observe: Callable | None):
    def hook(param: torch.nn.Parameter) -> None:
        if _paused:
            return
        if observe is not None:
            observe(param)
        bucket.add(param, index)

    return hook


class _Bucket:
    """Gradients ready but not yet stepped, taken off their parameters (an accumulating backward
    must not add to them), in the order they came, from one backward and one stream; stepped
    together once ``numel`` elements wait, when another stream's gradient comes, and when their
    backward ends. A backward that raised never ends: what it left waiting is dropped at the next
    one, unstepped (stepping then would change weights that backward has saved)."""

    def __init__(self, optimizer: torch.optim.Optimizer, numel: int):
        self.optimizer, self.numel = optimizer, numel
        self.waiting: list[tuple[torch.nn.Parameter, int, torch.Tensor]] = []
        self.size, self.task, self.stream = 0, None, None

    def add(self, param: torch.nn.Parameter, index: int) -> None:
        task = torch._C._current_graph_task_id()
        stream = torch.cuda.current_stream(param.device) if param.device.type == "cuda" else None
        if self.waiting and self.task != task:
            self.waiting, self.size = [], 0
        if self.waiting and self.stream != stream:
            self.flush()
        if isinstance(param, DTensor) or task < 0:
            self._step([(param, index, param.grad)], stream)
            return
        if not self.waiting:
            self.task, self.stream = task, stream
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended(task))
        self.waiting.append((param, index, param.grad))
        self.size += param.numel()
        param.grad = None
        if self.size >= self.numel:
            self.flush()

    def _backward_ended(self, task: int) -> Callable[[], None]:
        def callback() -> None:
            if self.task == task:
                self.flush()

        return callback

    def flush(self) -> None:
        waiting, stream = self.waiting, self.stream
        self.waiting, self.size, self.task, self.stream = [], 0, None, None
        if waiting:
            self._step(waiting, stream)

    def _step(self, waiting: list, stream) -> None:
        """The optimizer's own step over ``waiting`` (parameter, group index, gradient), each with
        its group's current settings (looked up now: load_state_dict and schedules replace or
        change the groups), on the stream their gradients came on, which the caller's stream then
        waits for; the gradients are then freed."""
        groups = self.optimizer.param_groups
        by_group: dict[int, list] = {}
        for param, index, grad in waiting:
            param.grad = grad
            by_group.setdefault(index, []).append(param)
        self.optimizer.param_groups = [{**groups[i], "params": params} for i, params in by_group.items()]
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
            for param, _, _ in waiting:
                param.grad = None
        if stream is not None and torch.cuda.current_stream(stream.device) != stream:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
