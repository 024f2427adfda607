"""crosschip plugin adding the ``layer_scale`` component kind."""
