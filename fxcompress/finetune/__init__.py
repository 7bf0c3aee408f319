"""The training side: plans on trainable models, the built-in trainer and the methods' fine-tuning loop."""
from .planned import apply_plan, base_of, is_planned, plan_of
