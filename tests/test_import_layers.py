"""The repository's import graph, parsed from the source (nothing is imported): the method sits at the bottom,
the shared plumbing above it, the five stages above that, and demo/, bench/ and tools/ on top. No file imports
one on its own floor or a higher one (a stage never imports another stage, demo/ or bench/), and nothing
imports in a circle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"prepare_data", "extract_roi", "train", "evaluate", "explain"}
TOPS = ("demo", "bench", "tools")


def modules():
    """{module name: path} of every Python file of the project (tests excluded)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and d not in ("tests", "runs", "data")]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3]
                out[rel.replace(os.sep, ".")] = os.path.join(folder, f)
    return out


def imports(path, mods, name):
    """The project modules a file imports, at the top or inside a function. A script in demo/ or bench/ puts
    the repository root and its own folder on sys.path, so `import memory` in bench/ is bench.memory."""
    pkg = name.rsplit(".", 1)[0] if "." in name else ""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            for cand in (n, f"{pkg}.{n}" if pkg else n):
                if cand in mods and cand != name:
                    found.add(cand)
    return found


def floor(name):
    if name == "model":
        return 0
    if name in STAGES:
        return 2
    if name.split(".")[0] in TOPS:
        return 3
    return 1  # the plumbing and the embedded default: pipeline/, embedded/


def graph():
    mods = modules()
    return {name: imports(path, mods, name) for name, path in mods.items()}


def test_model_imports_torch_and_transformers_only():
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    assert top <= {"torch", "transformers", "math", "dataclasses"}, top


def test_no_file_imports_its_own_floor_or_a_higher_one():
    """A stage imports model.py and the plumbing only; the plumbing imports model.py and itself only
    downwards; demo/, bench/ and tools/ may import anything below them but not each other."""
    bad = []
    for name, deps in graph().items():
        for d in deps:
            same_lower_floor = floor(name) == floor(d) == 1  # plumbing may build on plumbing (acyclic)
            same_top_folder = floor(name) == floor(d) == 3 and name.split(".")[0] == d.split(".")[0]
            if floor(d) > floor(name) or (floor(d) == floor(name) and not (same_lower_floor or same_top_folder)):
                bad.append(f"{name} imports {d}")
    assert not bad, bad


def test_no_import_circles():
    g = graph()
    state, cycles = {}, []

    def visit(n, path):
        state[n] = "open"
        for d in sorted(g[n]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d] if d in path else [n, d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_the_graph_is_read_at_all():
    """The checks above would pass on an empty graph: make sure the parser sees the known edges."""
    g = graph()
    assert "model" in g["train"] and "pipeline.io" in g["train"]
    assert "model" in g["pipeline.io"]
