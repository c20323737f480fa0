"""Deprecated name of `cluster.tools.bench_vision`, kept as an alias."""

from cluster.tools.renamed import alias

alias(__name__, "cluster.tools.bench_vision")
