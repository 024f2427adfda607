"""The optimizer step fused into the backward pass: each parameter is updated by the run's
optimizer as soon as its gradient is complete (``register_post_accumulate_grad_hook``), and its
gradient is freed right away. The model's gradients then never all exist at once: an 8B model in
bf16 drops 16 GB of peak memory, which buys activations that would otherwise be recomputed.

Gradients wait in a bucket until :data:`BUCKET_NUMEL` elements are ready, and step together: a
fused optimizer's launch over one small tensor (a 1B model's attention projections, its norms)
occupies a fraction of the GPU, and the optimizer's Python step costs the host a fixed time per
call. The last bucket steps when the backward ends (an autograd final callback), so no gradient
outlives its backward either way. A bucket holds gradients of one stream: FSDP2 runs its shards'
hooks on its reduce stream, and a bucket of them steps there (tested on gloo, not yet on NCCL;
DTensor shards of two meshes, expert parallelism's, step together). On a 1B model's CUDA-graph step
on an H100 buckets halved the optimizer's launches and cut its kernel time from 11.9 to 9.4 ms a
step; the step's throughput moved within its spread (docs/benchmarks.md, round five). Stepping the
buckets on a side stream, to overlap the backward, gained nothing measurable and was taken out
(round six).

What it gives up, by construction: clipping by the global gradient norm (the norm is known only
once every parameter has stepped; it is still measured) and gradient accumulation over
micro-batches (each backward steps). Under data parallelism FSDP2 reduce-scatters each gradient
outside autograd and then runs the sharded parameter's post-accumulate-grad hooks itself, so the
step sees the reduced shard (on FSDP2's reduce stream, which the next forward waits for).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

from crosschip.errors import ConfigurationError

#: Set on an optimizer while it steps in backward, and on each of its parameters (whose gradient
#: is then consumed before its backward ends: see :func:`grads_consumed_at_once`).
_ACTIVE = "_crosschip_steps_in_backward"
_paused = 0

#: How many gradient elements wait before they step together: 32M elements give a fused AdamW
#: launch enough blocks (64k elements each) to fill an H100. A bucket holds less than this (64 MB
#: in bf16) plus one parameter's gradient, where stepping after the backward holds them all.
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
    buckets = _Buckets(optimizer, bucket_numel)  # one per optimizer: its steps may span groups
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if param.requires_grad:
                handles.append(param.register_post_accumulate_grad_hook(_stepping(buckets, index, observe)))
                params.append(param)
    if not handles:
        raise ConfigurationError("optimizer in backward: the optimizer holds no trainable parameters")
    setattr(optimizer, _ACTIVE, True)
    for param in params:
        setattr(param, _ACTIVE, True)
    return InBackward(optimizer, handles, params, buckets)


def grads_consumed_at_once(params) -> bool:
    """Whether every one of ``params`` that trains is stepped in the backward, so its gradient is
    used and dropped before that backward ends: a gradient may then alias a buffer that the next
    backward overwrites (CUDA graphs' static gradients), with nothing left to read it."""
    trainable = [p for p in params if p.requires_grad]
    return bool(trainable) and all(getattr(p, _ACTIVE, False) for p in trainable)


class InBackward:
    """What :func:`step_in_backward` returns: ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer, handles: list, params: list, buckets: "_Buckets"):
        self.optimizer, self.handles, self.params, self.buckets = optimizer, handles, params, buckets

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for param in self.params:
            setattr(param, _ACTIVE, False)
        self.handles, self.params = [], []
        setattr(self.optimizer, _ACTIVE, False)


def _stepping(buckets: "_Buckets", index: int, observe: Callable | None):
    def hook(param: torch.nn.Parameter) -> None:
        if _paused:
            return
        if observe is not None:
            observe(param)
        buckets.add(param, index)

    return hook


class _Buckets:
    """One optimizer's gradients ready but not yet stepped, a bucket for each backward running
    (a reentrant backward runs inside another, with its own end). Each bucket steps when its
    backward ends (an autograd final callback); a backward that raised never ends, and its
    callback is freed uncalled: its bucket is then dropped, unstepped (stepping later would
    change weights that the next backward has saved)."""

    def __init__(self, optimizer: torch.optim.Optimizer, numel: int):
        self.optimizer, self.numel = optimizer, numel
        self.open: dict[int, _Bucket] = {}

    @property
    def size(self) -> int:
        """Gradient elements waiting, over every open bucket."""
        return sum(bucket.size for bucket in self.open.values())

    def add(self, param: torch.nn.Parameter, index: int) -> None:
        task = torch._C._current_graph_task_id()
        if task < 0:
            _step(self.optimizer, [(param, index, param.grad)], _stream_of(param))
            return
        bucket = self.open.get(task)
        if bucket is None:
            bucket = self.open[task] = _Bucket(self.optimizer, self.numel)
            ended = _Ended(self, task)
            weakref.finalize(ended, self.open.pop, task, None)
            torch.autograd.Variable._execution_engine.queue_callback(ended)
        bucket.add(param, index)


class _Ended:
    """The final callback of one backward: steps what its bucket holds."""

    def __init__(self, buckets: _Buckets, task: int):
        self.buckets, self.task = buckets, task

    def __call__(self) -> None:
        bucket = self.buckets.open.pop(self.task, None)
        if bucket is not None:
            bucket.flush()


class _Bucket:
    """Gradients of one backward, taken off their parameters (a backward that raised must leave
    none for the next to add to), in the order they came, from one stream; stepped together once
    ``numel`` elements wait, when another stream's gradient comes, and when the backward ends."""

    def __init__(self, optimizer: torch.optim.Optimizer, numel: int):
        self.optimizer, self.numel = optimizer, numel
        self.waiting: list[tuple[torch.nn.Parameter, int, torch.Tensor]] = []
        self.size, self.stream = 0, None

    def add(self, param: torch.nn.Parameter, index: int) -> None:
        stream = _stream_of(param)
        if self.waiting and self.stream != stream:
            self.flush()
        self.stream = stream
        self.waiting.append((param, index, param.grad))
        self.size += param.numel()
        param.grad = None
        if self.size >= self.numel:
            self.flush()

    def flush(self) -> None:
        waiting, self.waiting, self.size = self.waiting, [], 0
        if waiting:
            _step(self.optimizer, waiting, self.stream)


def _stream_of(param: torch.Tensor):
    return torch.cuda.current_stream(param.device) if param.device.type == "cuda" else None


def _step(optimizer: torch.optim.Optimizer, waiting: list, stream) -> None:
    """The optimizer's own step over ``waiting`` (parameter, group index, gradient), each with its
    group's current settings (looked up now: load_state_dict and schedules replace or change the
    groups), on the stream the gradients came on, which the caller's stream then waits for; the
    gradients are then freed."""
    groups = optimizer.param_groups
    by_group: dict[int, list] = {}
    for param, index, grad in waiting:
        param.grad = grad
        by_group.setdefault(index, []).append(param)
    optimizer.param_groups = [{**groups[i], "params": params} for i, params in by_group.items()]
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            optimizer.step()
    finally:
        optimizer.param_groups = groups
        for param, _, _ in waiting:
            param.grad = None
    if stream is not None and torch.cuda.current_stream(stream.device) != stream:
        torch.cuda.current_stream(stream.device).wait_stream(stream)
