"""A training step's primitives, below ``methods/`` and ``engine/``: precision and loss scale (``amp``),
the keep-or-undo fault guard (``guard``), the device-scalar optimizer (``optim``) and schedules
(``schedule``), and the process group (``distributed``). Imports nothing from ``methods`` or ``engine``."""
