"""The package's import graph, drawn from the source with `ast` (every import, also those
inside functions), and the rules the layout promises:

- layers: core, data -> tracking -> api -> app; a module imports its own layer or lower ones
  (core and data are side by side and import nothing from each other);
- no circles, between modules or between layers;
- mlflow is imported only in tracking/, click only in app/cli.py.

    python scripts/import_graph.py           # the graph, one line per module, and any violation
    python scripts/import_graph.py --check   # exit 1 on a violation (tests/test_layers.py runs it)
    python scripts/import_graph.py --dot     # Graphviz, for a picture
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clr_mlflow"
RANK = {"core": 0, "data": 0, "tracking": 1, "api": 2, "app": 3}  # a module imports ranks <= its own
SIDE_BY_SIDE = {("core", "data"), ("data", "core")}                 # same rank, yet apart
ONLY_IN = {"mlflow": ("tracking",), "click": ("app.cli",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(clr_mlflow modules, top-level external packages) that `path` imports anywhere."""
    own, external = set(), set()
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}  # imports for type checkers, never run
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                (own if alias.name.startswith("clr_mlflow") else external).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("clr_mlflow"):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    own.add(candidate if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                            or (PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py").exists() else base)
            else:
                external.add(base)
    return own, {e.split(".")[0] for e in external if e}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    edges, externals = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        own, ext = imports(path)
        edges[name] = {m for m in own if m != name}
        externals[name] = ext
    return edges, externals


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def violations(edges, externals) -> list[str]:
    found = [f"circle: {' <-> '.join(c)}" for c in cycles(edges)]
    for src, targets in edges.items():
        ls = layer(src)
        for dst in targets:
            ld = layer(dst)
            if ls is None or ld is None or ls == ld:
                continue
            if RANK[ld] > RANK[ls] or (ls, ld) in SIDE_BY_SIDE:
                found.append(f"upward: {src} ({ls}) imports {dst} ({ld})")
    for package, allowed in ONLY_IN.items():
        for src, ext in externals.items():
            if package in ext and not any(src.removeprefix("clr_mlflow.").startswith(a) for a in allowed):
                found.append(f"{package} imported by {src} (only {', '.join(allowed)} may)")
    return found


def main(argv: list[str]) -> int:
    edges, externals = graph()
    if "--dot" in argv:
        print("digraph clr_mlflow {")
        for src, targets in edges.items():
            for dst in sorted(targets):
                print(f'  "{src}" -> "{dst}";')
        print("}")
        return 0
    found = violations(edges, externals)
    if "--check" not in argv:
        for src in sorted(edges):
            print(f"{src}: {', '.join(sorted(edges[src])) or '-'}")
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
