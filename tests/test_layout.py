"""The layout: entry points import library modules only, never each other; the registry is the
one list of averaging methods, and README's method table agrees with it."""

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

import averaging

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"train", "average", "eval_ckpt", "sample", "export_hf"}
BENCHMARKS = {"bench", "benchmarks", "experiments"}   # may import the entry points they time
                                                      # or drive


def imported_modules(path):
    """Top-level names of the modules a file imports (`import a.b` and `from a.b import c` -> a)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def python_files():
    skip = {".venv", "tests", ".git"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def test_entry_points_import_library_modules_only():
    for name in ENTRY_POINTS:
        assert (REPO / f"{name}.py").is_file(), name
    offenders = []
    for path in python_files():
        parts = path.relative_to(REPO).parts
        module = path.stem if len(parts) == 1 else parts[0]
        if module in BENCHMARKS:
            continue
        forbidden = (ENTRY_POINTS - {module}) | BENCHMARKS
        for bad in sorted(imported_modules(path) & forbidden):
            offenders.append(f"{path.relative_to(REPO)} imports {bad}")
    assert offenders == []


def test_the_import_check_can_fail(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom train import TrainConfig\nimport evaluate as e\n"
                   "from data.common import gpt2_encoding\n")
    assert imported_modules(bad) == {"os", "train", "evaluate", "data"}


def test_benchmarks_live_in_their_folder():
    top = {p.stem for p in REPO.glob("*.py")}
    assert {p for p in top if p.startswith("bench")} == {"bench"}
    assert {p.stem for p in (REPO / "benchmarks").glob("bench_*.py")} >= {
        "bench_averaging", "bench_kernels", "bench_offline", "bench_sweep"}


def readme_method_rows():
    """{method: row text} of README's method table (rows that start with | `name` |)."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        match = re.match(r"^\| `(\w+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def default_text(value):
    """How the README table writes a default: 0.999 -> .999, 2/3 -> 2/3, True -> True."""
    if value is None or isinstance(value, (bool, int)):
        return str(value)
    if abs(value - 2 / 3) < 1e-12:
        return "2/3"
    text = f"{value:g}"
    return text[1:] if text.startswith("0.") else text


def test_readme_method_table_names_every_method_with_its_keys_and_defaults():
    rows = readme_method_rows()
    assert set(rows) == set(averaging.AVERAGERS)
    for name, cls in averaging.AVERAGERS.items():
        for key, default in cls.defaults.items():
            assert re.search(rf"`{key}` [^,|]*\({re.escape(default_text(default))}[;,)]",
                             rows[name]), f"README's {name} row lacks `{key}` ({default})"


def test_defaults_are_literal_dicts_in_each_class():
    """`grep bema_lag averaging.py` finds the definition: every key is written out."""
    source = (REPO / "averaging.py").read_text()
    for cls in averaging.AVERAGERS.values():
        for key in cls.defaults:
            assert re.search(rf'^\s+"{key}": ', source, re.M), key


@pytest.mark.parametrize("spec", ["all", " all "])
def test_all_means_every_registered_method(spec):
    assert averaging.parse_method_list(spec, "averaging", allow_empty=True) == \
        list(averaging.AVERAGERS)


def top_level_import_names(root):
    """The names under which Python finds this repository's code when the repository root is on
    sys.path (as it is for `python train.py`, `python -m ...` and pytest): its top-level modules
    and its top-level folders of Python files (packages, and the namespace folders that
    `python -m benchmarks.bench_kernels` resolves)."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
              and any(p.rglob("*.py"))}
    return names


def test_no_top_level_name_hides_an_installed_package():
    """A library that imports one of these names would get ours instead (transformers 5.25
    imports Hugging Face's `kernels`, which a top-level kernels/ once hid)."""
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in top_level_import_names(REPO)
               if name in installed}
    assert clashes == {}, f"rename these: {clashes}"


def test_the_clash_check_sees_modules_and_folders(tmp_path):
    (tmp_path / "numpy.py").write_text("")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "x.py").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("")
    names = top_level_import_names(tmp_path)
    assert names == {"numpy", "yaml"}
    assert {"numpy"} <= set(importlib.metadata.packages_distributions())
