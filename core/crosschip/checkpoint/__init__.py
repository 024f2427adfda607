"""Hugging Face checkpoint I/O: a streaming safetensors reader, a sharded writer, atomic saves
under a lock (``transaction``) and a training-state reader that runs no code (``safe_dcp``)."""

from crosschip.checkpoint.reader import SafetensorsCheckpoint
from crosschip.checkpoint.lock import output_lock
from crosschip.checkpoint.transaction import atomic_save, committed_directory
from crosschip.checkpoint.writer import write_checkpoint

__all__ = ["SafetensorsCheckpoint", "atomic_save", "committed_directory", "output_lock", "write_checkpoint"]
