"""crosschip-liger: a crosschip backend plugin built on Liger-Kernel's Triton kernels.

Importing this package imports neither torch nor liger_kernel; crosschip loads
:mod:`crosschip_liger.plugin` through the ``crosschip.backends`` entry point, and the component
modules (which import liger_kernel) only when a runtime builds one.
"""

__version__ = "0.1.0"
