"""Sub-commands of the ``psmamba`` CLI, one module each (discovered automatically).

See :mod:`psmamba.cli` for the protocol every module follows.
"""
