"""Deprecated name of `cluster.tools.gpu_check`, kept as an alias (imported by name, not statically)."""

import importlib

importlib.import_module("cluster.tools.renamed").alias(__name__, "cluster.tools.gpu_check")
