"""sdproxy: a service-discovery-aware L4/L7 load-balancing proxy."""

from proxy import compiled as _compiled

__version__ = "0.1.0"

# Decided before any other module of the package is imported (proxy/compiled.py): the
# hot modules run compiled, or every module runs from its .py file.
BUILD = _compiled.select(__path__)
