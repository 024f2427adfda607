"""A plugin written against a plugin API this crosschip does not implement (version 999)."""

from crosschip import BackendDescriptor, ComponentImpl, Probe, hookimpl


def probe() -> Probe:
    return Probe(True, "always")


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(name="wrong_api", priority=900, device_types=("cpu",), probe=probe,
                              api_version=999)]


@hookimpl
def crosschip_register_components():
    # Priority 900 and an rms_norm: were it (wrongly) accepted, auto resolution would pick it.
    return [ComponentImpl("wrong_api", "rms_norm", _rms_norm)]


def _rms_norm(spec, ctx):
    from crosschip.reference.components import RMSNorm

    return RMSNorm(spec)
