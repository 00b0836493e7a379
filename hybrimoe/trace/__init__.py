"""Routing traces: the project's format, and importers of the original public formats."""

from hybrimoe.trace.format import (
    LayerRouting,
    RoutingTrace,
    TokenRouting,
    TraceHeader,
    TraceWriter,
)
from hybrimoe.trace.importers import load_any_trace

__all__ = ["LayerRouting", "RoutingTrace", "TokenRouting", "TraceHeader", "TraceWriter", "load_any_trace"]
