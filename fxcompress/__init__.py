"""fxcompress: make trained networks shallower by linearising activations and merging linear operators."""
from .api import CompressResult, activation_names, compress
from .measure import measure
from .capture import capture
from .config import CompressConfig
from .errors import CaptureError, FxCompressError, MissingDependencyError, OptionError, PassError, PlanError
from .plan import Decision, Plan
from .report import Metrics, Report

__all__ = ["compress", "activation_names", "measure", "capture", "CompressResult", "CompressConfig", "Plan", "Decision", "Report", "Metrics",
           "FxCompressError", "CaptureError", "OptionError", "PlanError", "PassError", "MissingDependencyError"]
