"""Reports of finished runs: figures, comparison tables and optional TensorBoard logging.

The submodules are imported on their own (``generalist.reporting.figures`` pulls in
matplotlib, ``generalist.tensorboard`` is imported while training), so this package
imports nothing itself.
"""
