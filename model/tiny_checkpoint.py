"""Deprecated name of `cluster.tools.tiny_checkpoint`, kept as an alias (imported by name, not statically)."""

import importlib

importlib.import_module("cluster.tools.renamed").alias(__name__, "cluster.tools.tiny_checkpoint")
