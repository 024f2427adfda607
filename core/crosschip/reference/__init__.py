"""The ``reference`` backend: plain torch, the same math as transformers' models, separate
projections. Always available; the last resort of every chain and the oracle of every test."""
