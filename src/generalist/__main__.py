"""Allows ``python -m generalist`` (and therefore ``torchrun -m generalist``)."""

from generalist.cli import main

raise SystemExit(main())
