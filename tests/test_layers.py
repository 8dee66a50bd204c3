"""The package's layers, read from its import graph (scripts/import_graph.py): core and data
at the bottom, then tracking (the only mlflow importer), api, app; no circles; click only in
the CLI; no print in library code."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_point_down_the_layers_with_no_circle():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_library_code_never_prints():
    """Outside app/ the package reports through logging or return values: the program it is
    a guest in decides what its user sees."""
    offenders = []
    for path in (REPO / "clr_mlflow").rglob("*.py"):
        if "app" in path.relative_to(REPO / "clr_mlflow").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
