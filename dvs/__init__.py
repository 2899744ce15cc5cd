"""dvs -- dependable virtualised systems.

Attach tools to slim containers (``dvs.container``) and to running VMs (``dvs.vm``),
serve a directory through a fast FUSE proxy (``dvs.fs``), and keep storage I/O exitless
and authenticated (``dvs.shield``). ``dvs.probe`` tells what this kernel offers.
"""

__version__ = "0.1.0"
