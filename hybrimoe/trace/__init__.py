"""Routing traces: the project's format, and importers of the original public formats."""

from hybrimoe.trace.format import (
    LayerRouting,
    RoutingTrace,
    TokenRouting,
    TraceHeader,
    TraceWriter,
)

__all__ = ["LayerRouting", "RoutingTrace", "TokenRouting", "TraceHeader", "TraceWriter"]
