"""The package contract of docs/design.md ("Floors"), checked on the source: who may
import what, and that the import graph has no circles. Reads imports with ast (top level
and inside functions alike). The checks take a root directory, so that a planted
violation in a fake tree can show that they report one."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("shards", "common", "prep", "train", "infer", "demo", "bench")
BOTTOM = {"shards.layout", "shards.atomic", "common.errors"}
# shards' surface for the floors above: shards/__init__.py's names plus the homes of
# the format and of shared facts. Loader internals stay inside shards (and bench).
SHARDS_PUBLIC = {"shards", "shards.layout", "shards.atomic", "shards.metadata",
                 "shards.manifest", "shards.dali_index", "shards.source_layout",
                 "shards.store", "shards.plate_groups"}
# Floor 2 packages may import a sibling only through its package name (its __init__).
SIBLING_OK = {("infer", "train")}   # prediction rebuilds a model as the trainer did
# Known breaks of the contract, to be removed by the package's owner (see the lead's notes).
KNOWN: set = set()  # (package, module) exceptions to the floors; none today


def modules(root):
    """{dotted module name: path} of every .py in the packages under `root`."""
    out = {}
    for pkg in PACKAGES:
        for d, _dirs, files in os.walk(os.path.join(root, pkg)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(d, name)
                    mod = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def imports(root=REPO):
    """(importing module, imported module) for every project import in the packages."""
    mods = modules(root)
    for mod, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                # `from shards import layout` imports the module shards.layout
                yield from ((mod, t if t in mods else node.module) for t in targets)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield mod, a.name


def violations(root=REPO):
    """(module, imported module, rule broken) for every import that breaks the floors."""
    out = []
    for mod, target in imports(root):
        src, dst = mod.split(".")[0], target.split(".")[0]
        if dst not in PACKAGES:
            continue
        # floor 0 before the same-package skip: shards.layout may not import shards.store
        if mod in BOTTOM:
            out.append((mod, target, "the bottom floor imports nothing of the project"))
        elif src == "common" and target not in BOTTOM:
            out.append((mod, target, "common imports only the bottom floor"))
        elif src == dst:
            continue
        elif src == "shards" and target != "common.errors":
            out.append((mod, target, "shards imports only common.errors"))
        elif src in ("prep", "train", "infer"):
            if dst == "shards" and target not in SHARDS_PUBLIC:
                out.append((mod, target, "shards' internals"))
            elif dst in ("prep", "train", "infer") and (
                    (src, dst) not in SIBLING_OK or target != dst):
                out.append((mod, target, "a sibling, other than through its public names"))
            elif dst in ("demo", "bench"):
                out.append((mod, target, "an upper floor"))
        elif src == "demo":
            if dst == "bench" or (dst in ("prep", "train", "infer") and target != dst
                                  and (src, target) not in KNOWN) or (
                    dst == "shards" and target not in SHARDS_PUBLIC):
                out.append((mod, target, "demo uses public names only"))
        elif src == "bench" and dst == "demo":
            out.append((mod, target, "bench does not import demo"))
    return out


def cycles(root=REPO):
    """Sorted module lists, one per import circle (a strongly connected component)."""
    mods = modules(root)
    graph = {m: set() for m in mods}
    for mod, target in imports(root):
        while target and target not in mods:   # `import a.b.name` -> the module a.b
            target = target.rpartition(".")[0]
        # a module's own packages are imported before it anyway: no edge, no circle
        if target and target != mod and not mod.startswith(target + "."):
            graph[mod].add(target)
    # Tarjan, iterative: the graph's depth is the project's, not Python's stack's business
    index, low, on, stack, out = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return sorted(out)


def test_every_import_keeps_to_its_floor():
    assert violations() == []


def test_the_import_graph_has_no_circles():
    assert cycles() == []


def test_the_check_sees_imports_inside_functions():
    found = set(imports())
    assert ("demo.__main__", "infer") in found              # imported inside a function
    assert ("shards", "shards.layout") in found             # `from shards import layout`
    assert any(m == "prep.pack" and t.startswith("shards.") for m, t in found)


def _plant(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_violation_and_circle_are_reported(tmp_path):
    # the two breaches that once passed this test: a floor-0 module importing its own
    # package's upper floor, and common.errors importing the rest of common
    _plant(tmp_path, {
        "shards/__init__.py": "from shards import layout\n",
        "shards/layout.py": "def f():\n    from shards.store import open_store\n",
        "shards/store.py": "from shards.layout import f\nfrom common.errors import BadInput\n",
        "common/__init__.py": "",
        "common/errors.py": "from common.well_logits import WellMeans\n",
        "common/well_logits.py": "import common.errors\n",
        "train/__init__.py": "",
        "train/fit.py": "from shards.loader import make_loader\nimport infer.score\n",
        "infer/__init__.py": "",
        "infer/score.py": "from train import fit\n",
    })
    assert sorted(violations(str(tmp_path))) == [
        ("common.errors", "common.well_logits",
         "the bottom floor imports nothing of the project"),
        ("infer.score", "train.fit", "a sibling, other than through its public names"),
        ("shards.layout", "shards.store", "the bottom floor imports nothing of the project"),
        ("train.fit", "infer.score", "a sibling, other than through its public names"),
        ("train.fit", "shards.loader", "shards' internals"),
    ]
    assert cycles(str(tmp_path)) == [["common.errors", "common.well_logits"],
                                     ["infer.score", "train.fit"],
                                     ["shards.layout", "shards.store"]]
