"""The ``torch`` backend: combined QKV and gate/up projections, SDPA attention; CPU and CUDA."""
