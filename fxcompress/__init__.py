"""fxcompress: make trained networks shallower by linearising activations and merging linear operators."""
from .api import CompressResult, activation_names, compress
from .measure import measure
from .capture import capture
from .config import CompressConfig
from .errors import CaptureError, FxCompressError, MissingDependencyError, OptionError, PassError, PlanError
from .criteria import block_distance
from .frechet import frechet_distance
from .plan import Decision, Plan
from .planner import PlanResult, find_plan
from .report import Metrics, Report
from .tokens import TokenConfig, reduce_tokens
from .trainable import apply_plan, plan_of
from .data import Task
from .finetune.loop import LoopConfig, PruneResult, prune
from .finetune.trainer import TrainConfig

__all__ = ["compress", "activation_names", "measure", "capture", "CompressResult", "CompressConfig", "Plan", "Decision",
           "Report", "Metrics", "TokenConfig", "reduce_tokens", "find_plan", "PlanResult", "block_distance", "frechet_distance",
           "apply_plan", "plan_of", "prune", "PruneResult", "TrainConfig", "LoopConfig", "Task",
           "FxCompressError", "CaptureError", "OptionError", "PlanError", "PassError", "MissingDependencyError"]
