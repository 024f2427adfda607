"""The Trainium path: what runs only on an XLA device with the Neuron SDK (torch-neuronx,
torch-xla). Written from the documented APIs of torch-xla and neuronx-distributed and kept
apart from the CPU-mode path; it has not run on Trainium hardware (none was available).

- Process group: ``torchrun`` starts one process per NeuronCore; they join XLA's process group
  (``init_method="xla://"``), on which NxD's ``initialize_model_parallel`` builds its groups.
- Step boundary: XLA records operations lazily; ``xm.mark_step()`` after each optimizer step
  cuts the graph and runs it, so every step is the same graph (compiled once, cached by the
  Neuron compiler, and what ``neuron_parallel_compile`` pre-compiles).
"""

from __future__ import annotations


def on_xla(runtime) -> bool:
    return runtime.device.type == "xla"


def init_process_group() -> None:
    import torch.distributed as dist
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

    if not dist.is_initialized():
        dist.init_process_group("xla", init_method="xla://")


def mark_step() -> None:
    import torch_xla.core.xla_model as xm

    xm.mark_step()
