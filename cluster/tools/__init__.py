"""Tools around the engine: benchmarks, the self-check, the GPU check and the tiny-checkpoint builder.

Each is a `python -m cluster.tools.NAME` command; none is imported by the engine's packages.
"""
