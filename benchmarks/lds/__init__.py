"""Linear datamodeling score (LDS) benchmark of harmtrace against peer attribution libraries.

Run ``python benchmarks/lds/run.py --help``; see ``benchmarks/lds/README.md``.
"""
