"""The public API documents itself in one structured style (Google: Args / Returns / Raises /
Examples, as mkdocstrings renders it with `docstring_style: google`), and its examples run
as written: every doctest of the public names' modules passes, run with no globals but what
the example imports, and every public name keeps at least one example, so none can silently
disappear.

The public names: `clr_mlflow.__all__`, each public method and property of its classes and
of the classes its functions return (clr_scheduler's ScheduleLR)."""
from __future__ import annotations

import doctest
import inspect
import io
import os
import re
import sys
import tempfile
from dataclasses import fields, is_dataclass

import pytest

import clr_mlflow

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
SECTIONS = ("Args", "Attributes", "Returns", "Raises", "Examples")


def _classes() -> list[type]:
    """The public classes: those in __all__ and those a public function returns."""
    out = []
    for name in clr_mlflow.__all__:
        obj = getattr(clr_mlflow, name)
        if inspect.isclass(obj):
            out.append(obj)
        else:
            returned = inspect.signature(obj).return_annotation  # a name: annotations are strings here
            returned = obj.__globals__.get(returned) if isinstance(returned, str) else returned
            if inspect.isclass(returned) and returned.__module__.startswith("clr_mlflow."):
                out.append(returned)
    return list(dict.fromkeys(out))


def _members(cls: type) -> dict[str, object]:
    """The public methods and properties a class defines itself (not those it inherits)."""
    return {name: value for name, value in vars(cls).items()
            if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))}


def public_names() -> dict[str, object]:
    """Every public name, by the name doctest gives its docstring (module.qualname)."""
    names = {}
    for name in clr_mlflow.__all__:
        obj = getattr(clr_mlflow, name)
        names[f"{obj.__module__}.{obj.__qualname__}"] = obj
    for cls in _classes():
        names[f"{cls.__module__}.{cls.__qualname__}"] = cls
        for name, member in _members(cls).items():
            names[f"{cls.__module__}.{cls.__qualname__}.{name}"] = member
    return names


def modules() -> list[str]:
    return sorted({name.rsplit(".", 1)[0] for name, obj in public_names().items() if inspect.isclass(obj)
                   or inspect.isfunction(obj) and "." not in obj.__qualname__})


def doctests(module_name: str) -> list[doctest.DocTest]:
    """The module's doctests, each to run on empty globals: an example imports what it uses."""
    __import__(module_name)
    return doctest.DocTestFinder().find(sys.modules[module_name], globs={})


def sections(doc: str) -> dict[str, list[str]]:
    """Google-style sections of a docstring: section title -> the names of its items
    (`name:` or `name (type):` at the section's item indent; for Raises the exception types)."""
    out: dict[str, list[str]] = {}
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"( *)(\w+):", line)
        if not m or m.group(2) not in SECTIONS:
            continue
        items, indent = [], len(m.group(1)) + 4
        for item in lines[i + 1:]:
            if item.strip() and len(item) - len(item.lstrip()) < indent:
                break
            named = re.match(rf" {{{indent}}}(\*{{0,2}}\w+)(?: \([^)]*\))?:(?: |$)", item)
            if named:
                items.append(named.group(1))
        out[m.group(2)] = items
    return out


def test_the_public_names_are_the_ones_meant():
    names = public_names()
    for expected in ("clr_mlflow.api.finder.lr_find", "clr_mlflow.core.schedules.clr_scheduler",
                     "clr_mlflow.core.schedules.ScheduleLR.state_dict",
                     "clr_mlflow.tracking.iteration_logger.IterationLogger.close",
                     "clr_mlflow.core.range_result.RangeTestResult.plot"):
        assert expected in names, sorted(names)
    assert {"clr_mlflow.api.finder", "clr_mlflow.core.range_result", "clr_mlflow.core.schedules",
            "clr_mlflow.tracking.iteration_logger"} <= set(modules())


def test_every_public_name_has_an_example():
    found = {test.name: len(test.examples) for module in modules() for test in doctests(module)}
    missing = [name for name in public_names() if not found.get(name)]
    assert not missing, f"public names without a runnable example (>>>) in their docstring: {missing}"


@pytest.mark.parametrize("name", sorted(public_names()))
def test_docstring_is_google_style(name):
    obj = public_names()[name]
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
    assert doc, f"{name} has no docstring"
    found = sections(doc)
    assert "Examples" in found, f"{name}: no Examples: section (griffe reads 'Examples:', not 'Example:')"
    if isinstance(obj, property):
        return
    if inspect.isclass(obj):
        if is_dataclass(obj):  # its fields are what a user reads off it
            assert found.get("Attributes") == [f.name for f in fields(obj)], f"{name}: Attributes != fields"
            return
        signature = inspect.signature(obj.__init__)
    else:
        signature = inspect.signature(obj)
    params = [("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + p.name
              for p in signature.parameters.values() if p.name != "self"]
    if params:
        assert found.get("Args") == params, f"{name}: Args should name {params} in order, not {found.get('Args')}"
    if signature.return_annotation not in (inspect.Signature.empty, "None", None) and not inspect.isclass(obj):
        assert "Returns" in found, f"{name}: returns {signature.return_annotation} but has no Returns: section"


@pytest.fixture
def examples_sandbox(tracking, tmp_path, monkeypatch):
    """What the examples write (tempfile.mkdtemp() stores, spools) goes to a folder of this
    test's, in memory where the machine has /dev/shm (a SQLite store is made ~5x faster);
    the tracking URI an example sets is reset by `tracking`."""
    monkeypatch.setenv("CLR_MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm or tmp_path) as scratch:
        monkeypatch.setattr(tempfile, "tempdir", scratch)
        yield


@pytest.mark.parametrize("module", modules())
def test_examples_run_as_written(module, examples_sandbox):
    tests = [t for t in doctests(module) if t.examples]
    assert tests, f"{module} has no examples"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, report.getvalue()
    assert result.attempted >= len(tests)
