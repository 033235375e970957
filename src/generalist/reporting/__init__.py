"""Reports of finished runs: figures, comparison tables and the report.

The submodules are imported on their own (``generalist.reporting.figures`` pulls in
matplotlib), so this package imports nothing itself.
"""
