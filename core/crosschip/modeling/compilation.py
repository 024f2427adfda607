"""``torch.compile`` as a runtime option (``from_pretrained(compile=...)``, ``crosschip train
--compile``): the model's forward, and with it the backward autograd derives, compiled in place
(``nn.Module.compile``), so the model stays the same object with the same methods and state dict.

Adapters are attached before compiling (their hooks are part of the traced forward). Training
steps of a fixed shape compile once. Generation has its own option, ``generate(compile=True)``
(:mod:`crosschip.modeling.decode_step`): the decode step over the static cache, whose shapes do
not change from token to token.
"""

from __future__ import annotations

from crosschip.errors import ConfigurationError

#: ``torch.compile`` options a caller may give (``compile={"mode": "max-autotune"}``).
OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")


def compile_model(model, option) -> None:
    """Compile ``model`` in place when ``option`` is True or a dict of ``torch.compile`` options;
    nothing for False or None. Records the options as ``model.compiled``."""
    if option is None or option is False:
        model.compiled = None
        return
    if option is True:
        kwargs = {}
    elif isinstance(option, dict):
        unknown = sorted(set(option) - set(OPTIONS))
        if unknown:
            raise ConfigurationError(f"compile={option!r}: unknown torch.compile option(s) {unknown}; expected "
                                     f"some of {', '.join(OPTIONS)}")
        kwargs = dict(option)
    else:
        raise ConfigurationError(f"compile={option!r}: expected True, False or a dict of torch.compile options")
    model.compile(**kwargs)
    model.compiled = kwargs
