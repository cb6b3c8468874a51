"""sdproxy: a service-discovery-aware L4/L7 load-balancing proxy."""

__version__ = "0.1.0"
