"""The ``te`` backend: NVIDIA Transformer Engine modules and FP8 on CUDA GPUs."""
