"""Architecture truth: the residual connections, dead modules and diagram of any PyTorch model, read from the
traced computation of one forward pass (`reslab audit`, `reslab diagram`; see docs/audit.md)."""

from reslab.graph.audit import Audit, audit
from reslab.graph.design import Design, DesignCheck, check_design, design_from_audit, load_design
from reslab.graph.diagram import Diagram, diagram
from reslab.graph.residuals import KINDS, Residual
from reslab.graph.trace import Trace, TraceError, trace_model

__all__ = ["KINDS", "Audit", "Design", "DesignCheck", "Diagram", "Residual", "Trace", "TraceError", "audit",
           "check_design", "design_from_audit", "diagram", "load_design", "trace_model"]
