"""The layout: the library is the wagpt package plus model.py and averaging.py; commands are
the thin scripts of wagpt.commands.COMMANDS; the registry is the one list of averaging methods,
and README's method table and file map agree with the code."""

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

import averaging
from wagpt.commands import COMMANDS

REPO = Path(__file__).resolve().parent.parent
RULE = ("commands import the library, nothing but the tests imports a command, and the "
        "library's modules import no command and form no import cycle")
LIBRARY_TOP = {"model", "averaging"}   # the design card's top-level library modules


def module_name(path, root=REPO):
    """'wagpt/kernels/__init__.py' -> 'wagpt.kernels', 'train.py' -> 'train'."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, known):
    """The modules of `known` (dotted names) a file imports anywhere in it, deferred imports
    included: `import a.b` -> a.b; `from a import b` -> a.b when that is a module, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                      else node.module for alias in node.names}
    return found & known


def import_graph(root=REPO):
    """{module: modules of the repository it imports}, for every .py outside tests/."""
    files = {module_name(p, root): p for p in root.rglob("*.py")
             if not {".venv", "tests", ".git"} & set(p.relative_to(root).parts)}
    known = set(files) | {m.rsplit(".", 1)[0] for m in files if "." in m}
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def layout_offences(graph, commands):
    """What breaks RULE in an import graph, one line each."""
    library = {m for m in graph if m.split(".")[0] == "wagpt" or m in LIBRARY_TOP}
    offences = [f"{m} imports the command {c}" for m, imports in sorted(graph.items())
                for c in sorted(imports & commands)]
    offences += [f"{m} imports {x}, which is not library" for m in sorted(library)
                 for x in sorted(graph[m] - library - {"wagpt"})]
    done, visiting = set(), []

    def visit(m):   # depth-first: a module met again while it is being visited closes a cycle
        if m in visiting:
            offences.append("import cycle: " + " -> ".join(visiting[visiting.index(m):] + [m]))
            return
        if m in done:
            return
        visiting.append(m)
        for x in sorted(graph.get(m, set()) & library):
            visit(x)
        visiting.pop()
        done.add(m)
    for m in sorted(library):
        visit(m)
    return offences


def test_the_layout_rule_holds():
    assert {c.removesuffix(".py") for c in COMMANDS} <= {p.stem for p in REPO.glob("*.py")}
    commands = {c.removesuffix(".py") for c in COMMANDS}
    assert layout_offences(import_graph(), commands) == [], RULE


def test_the_layout_check_can_fail(tmp_path):
    (tmp_path / "wagpt").mkdir()
    (tmp_path / "wagpt" / "__init__.py").write_text("")
    (tmp_path / "wagpt" / "a.py").write_text("def f():\n    from wagpt import b\n")
    (tmp_path / "wagpt" / "b.py").write_text("from wagpt.a import f\nimport train\n")
    (tmp_path / "train.py").write_text("from wagpt import a\nimport sample\n")
    (tmp_path / "sample.py").write_text("import numpy\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "x.py").write_text("from wagpt.a import f\n")
    graph = import_graph(tmp_path)
    assert graph["wagpt.a"] == {"wagpt.b"} and graph["benchmarks.x"] == {"wagpt.a"}
    assert layout_offences(graph, {"train", "sample"}) == [
        "train imports the command sample", "wagpt.b imports the command train",
        "wagpt.b imports train, which is not library",
        "import cycle: wagpt.a -> wagpt.b -> wagpt.a"]


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


def readme_file_map(text):
    """The paths README's "## Files" block names: an entry at the left margin is a path from
    the repository root; an entry indented by two spaces is inside the folder above it."""
    block = text.split("## Files", 1)[1].split("```", 2)[1]
    named, folder = set(), ""
    for line in block.splitlines():
        match = re.match(r"^( {0,2})([\w.<>/-]+\.\w+|[\w.<>-]+/)(?:\s|$)", line)
        if not match:
            continue
        indent, path = match.groups()
        if indent == "":
            folder = path if path.endswith("/") else ""
            named.add(path)
        elif folder:
            named.add(folder + path)
    return named | {p.split("/")[0] + "/" for p in named if "/" in p}


def test_readme_file_map_matches_the_tree():
    named = readme_file_map((REPO / "README.md").read_text())
    missing_on_disk = sorted(p for p in named if "<" not in p and not (REPO / p).exists())
    assert missing_on_disk == [], "README's file map names paths that do not exist"
    expected = {p.name for p in REPO.glob("*.py")}
    expected |= {f"{p.name}/" for p in REPO.iterdir() if p.is_dir() and p.name not in
                 (".git", ".venv", "__pycache__", ".pytest_cache") and "out" not in p.name
                 and (p.name == ".ci" or not p.name.startswith("."))}
    expected |= {f"wagpt/{p.name}" for p in (REPO / "wagpt").glob("*.py") if p.stem != "__init__"}
    expected |= {f"wagpt/{p.name}/" for p in (REPO / "wagpt").iterdir()
                 if p.is_dir() and not p.name.startswith((".", "__"))}
    assert sorted(expected - named) == [], "README's file map lacks these"


def test_the_file_map_reader_sees_both_levels():
    text = "## Files\n\n```\ntrain.py    the loop\nwagpt/      lib\n  trainer.py  x\n" \
           "                            continued\ndata/<name>/prepare.py  y\n```\n"
    assert readme_file_map(text) == {"train.py", "wagpt/", "wagpt/trainer.py",
                                     "data/<name>/prepare.py", "data/"}
