"""keras-adr's benchmarks: scripts run from the repository root as `python -m benchmarks.<name>`.

`results_io` is what they share: result files, markdown tables and machine
information. Nothing here is installed with keras-adr.
"""
