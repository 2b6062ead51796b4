"""The layers of ../shared/DESIGN.md (docs/architecture.md): every import in chatforge points down,
function-level imports included, and no training stage imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import chatforge

ROOT = Path(chatforge.__file__).parent
# lowest first; a module may import its own layer and those below it
LAYERS = {
    "core": {"model", "tokenizer", "chat", "checkpoint", "hf", "config", "errors", "files", "tools", "lora"},
    "data": {"data"},
    "acceleration": {"accel"},
    "inference": {"generate"},
    "stages": {"train", "evaluate", "knowledge", "prune"},
    "detection": {"detect"},
    "serving": {"serve"},
    "entry": {"cli", "demo", "terminal", "report", "gguf_export", "lora_cli", "__main__", "__init__"},
}
ORDER = list(LAYERS)
STAGES = {"pretrain", "sft", "reward", "ppo", "dpo"}  # train/config, loop, supervised, ppo_math, distributed: shared


def layer_of(parts: tuple[str, ...]) -> str:
    head = parts[0] if parts else "__init__"
    return next(name for name, tops in LAYERS.items() if head in tops)


def chatforge_imports(path: Path) -> set[tuple[str, ...]]:
    """The chatforge modules a file imports, as name parts below chatforge ("train", "ppo")."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "chatforge"
                                     else [])
        else:
            continue
        out |= {tuple(n.split(".")[1:]) for n in names if n.split(".")[0] == "chatforge" and n != "chatforge"}
    return out


def modules() -> list[tuple[tuple[str, ...], Path]]:
    return [(path.relative_to(ROOT).with_suffix("").parts, path) for path in sorted(ROOT.rglob("*.py"))]


def test_every_import_points_down_a_layer_or_stays_in_its_own():
    upward = []
    for parts, path in modules():
        mine = ORDER.index(layer_of(parts))
        for target in chatforge_imports(path):
            if ORDER.index(layer_of(target)) > mine:
                upward.append(f"{'/'.join(parts)} ({layer_of(parts)}) imports {'.'.join(target)} ({layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_serving_uses_no_stage_and_no_stage_imports_another():
    crossing = []
    for parts, path in modules():
        targets = chatforge_imports(path)
        if parts[0] == "serve":
            crossing += [f"{'/'.join(parts)} imports {'.'.join(t)}" for t in targets if layer_of(t) == "stages"]
        if parts[0] == "train" and parts[-1] in STAGES:
            crossing += [f"{'/'.join(parts)} imports {'.'.join(t)}" for t in targets
                         if t[0] == "train" and len(t) > 1 and t[1] in STAGES and t[1] != parts[-1]]
    assert not crossing, "\n".join(crossing)


def test_the_model_knows_no_kernel_and_the_engine_no_http():
    assert not any(t[0] == "accel" for t in chatforge_imports(ROOT / "model.py"))
    assert not any(t[0] in ("serve", "train") for parts, path in modules() if parts[0] == "generate"
                   for t in chatforge_imports(path))
