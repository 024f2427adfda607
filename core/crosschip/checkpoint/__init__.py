"""Hugging Face checkpoint I/O: a streaming safetensors reader and an atomic sharded writer."""

from crosschip.checkpoint.reader import SafetensorsCheckpoint
from crosschip.checkpoint.writer import write_checkpoint

__all__ = ["SafetensorsCheckpoint", "write_checkpoint"]
