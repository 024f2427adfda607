"""neuronx-distributed (NxD) sharded checkpoints, as ``neuronx_distributed.trainer.save_checkpoint``
writes them (one file per tensor-parallel rank, plain or xser) with the metadata Optimum Neuron
writes beside them, read and written without the Neuron SDK and without running any code from the
files.

- :mod:`.files`: where the rank files are, and loading them safely (``weights_only`` with one
  allow-listed class, xser's tensor reference; paths never leave the checkpoint directory).
- :mod:`.metadata`: Optimum Neuron's ``mp_metadata_pp_rank_<pp>.json`` (how each parameter is
  partitioned, and the transformation specs), parsed strictly, or derived from a model config.
- :mod:`.consolidate`: the shards as canonical Hugging Face tensors, one weight at a time.
- :mod:`.shard`: canonical tensors as NxD shards at a given tp (the inverse).
"""

from crosschip.checkpoint.nxd.files import NxdCheckpoint, is_nxd_checkpoint

__all__ = ["NxdCheckpoint", "is_nxd_checkpoint"]
