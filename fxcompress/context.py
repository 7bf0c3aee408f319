"""The small context every pass receives: settings, what it may touch, and where it reports."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import CompressConfig
from .plan import Plan
from .report import Rewrite, Skip


@dataclass
class PassContext:
    config: CompressConfig
    pass_name: str = ""
    plan: Plan = field(default_factory=Plan)
    excluded: set[str] = field(default_factory=set)  # sites whose rewrite was rolled back
    limit: int | None = None  # apply at most this many rewrites (used to find a faulty one)
    rewrites: list[Rewrite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def allows(self, site: str) -> bool:
        """Whether the pass may rewrite at `site` (a stable node name)."""
        if site in self.excluded:
            return False
        return self.limit is None or len(self.rewrites) < self.limit

    def record(self, sources, exact: bool = True, detail: str = "", macs_before: int = 0,
               macs_after: int = 0) -> None:
        self.rewrites.append(Rewrite(self.pass_name, tuple(sources), exact, detail, macs_before, macs_after))

    def skip(self, node: str, reason: str) -> None:
        self.skips.append(Skip(self.pass_name, node, reason))
