"""Deprecated name of `cluster.tools.selfcheck`, kept as an alias."""

from cluster.tools.renamed import alias

alias(__name__, "cluster.tools.selfcheck")
