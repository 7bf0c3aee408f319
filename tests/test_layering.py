"""The package's layering (docs/pipeline.md, Layout): a module imports only modules of its own layer or below, lazy
imports inside functions included, and every module has a layer."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fxcompress"
LAYERS = (  # bottom to top; a folder name stands for every module in it
    ("errors", "meta", "progress", "config", "plan", "ops", "verify", "merge_math", "chains", "token_merge",
     "criteria", "frechet", "data", "models"),  # foundations: no graph surgery
    ("graph", "blocks", "layers", "capture", "report", "compressed", "tokens"),  # graphs, capture, token engine
    ("backends", "measure", "cost", "context"),  # lowering, timing, what passes see
    ("passes", "pipeline", "planner"),  # rewriting and planning
    ("compiler", "trainable", "selection"),  # captured graph -> compressed graph; plans on trainable models
    ("api", "dynamo_backend"),  # the compiler's entry points
    ("finetune",),  # the training side
    ("cli", "__init__"),  # the command line, the package's face
)


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"fxcompress.{module} has no layer: add it to LAYERS and to docs/pipeline.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported(source: str, package: tuple[str, ...]) -> set[str]:
    """The fxcompress modules that `source` (a module in the sub-package `package`) imports, relative or absolute,
    at any depth, as names under the package."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = list(package[:len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("fxcompress"):
                target = node.module.split(".")[1:]
            else:
                continue
            found.add(".".join(target) if target else node.names[0].name)
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("fxcompress.")}
    return found


def upward_imports(name: str, source: str, package: tuple[str, ...]) -> list[str]:
    return [f"fxcompress.{name} (layer {layer_of(name)}) imports fxcompress.{target} (layer {layer_of(target)})"
            for target in sorted(imported(source, package)) if layer_of(target) > layer_of(name)]


def test_no_module_imports_a_layer_above_its_own():
    upward = [line for path in sorted(PACKAGE.rglob("*.py"))
              for line in upward_imports(module_name(path), path.read_text(), path.relative_to(PACKAGE).parent.parts)]
    assert not upward, "\n".join(upward)


def test_a_lazy_import_that_runs_up_is_found():
    source = "from ..graph import stable_name\n\ndef f():\n    from ..api import compress\n"
    assert upward_imports("passes.probe", source, ("passes",)) == [
        "fxcompress.passes.probe (layer 3) imports fxcompress.api (layer 5)"]
