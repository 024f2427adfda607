"""crosschip-template: a small out-of-tree crosschip backend to copy for new hardware.

Importing this package imports neither torch nor any device library; crosschip loads
:mod:`crosschip_template.plugin` through the ``crosschip.backends`` entry point.
"""

__version__ = "0.1.0"
