"""A plugin implementing a hook no crosschip hook spec defines (a typo, or a hook from another
crosschip version). Its descriptor is otherwise valid."""

from crosschip import BackendDescriptor, Probe, hookimpl


@hookimpl
def crosschip_register_backends():
    return [BackendDescriptor(name="unknown_hook", priority=900, device_types=("cpu",),
                              probe=lambda: Probe(True, "always"))]


@hookimpl
def crosschip_register_kernels():
    return ["fused_softmax"]
