"""The package contract of docs/design.md ("Floors"), checked on the source: who may
import what. Reads imports with ast (top level and inside functions alike)."""
import ast
import os

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


def imports():
    """(importing module, imported module) for every project import in the packages."""
    for pkg in PACKAGES:
        for root, _dirs, files in os.walk(os.path.join(REPO, pkg)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                mod = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                mod = mod[:-len(".__init__")] if mod.endswith(".__init__") else mod
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                        # `from shards import layout` imports the module shards.layout
                        target = next((t for t in targets[1:] if _is_module(t)), node.module)
                        yield mod, target
                    elif isinstance(node, ast.Import):
                        for a in node.names:
                            yield mod, a.name


def _is_module(dotted):
    base = os.path.join(REPO, *dotted.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def violations():
    out = []
    for mod, target in imports():
        src, dst = mod.split(".")[0], target.split(".")[0]
        if dst not in PACKAGES or src == dst:
            continue
        if mod in BOTTOM:
            out.append((mod, target, "the bottom floor imports nothing of the project"))
        elif src == "shards" and target != "common.errors":
            out.append((mod, target, "shards imports only common.errors"))
        elif src == "common" and target not in BOTTOM:
            out.append((mod, target, "common imports only the bottom floor"))
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


def test_every_import_keeps_to_its_floor():
    assert violations() == []


def test_the_check_sees_imports_inside_functions():
    found = set(imports())
    assert ("demo.__main__", "infer") in found              # imported inside a function
    assert ("shards", "shards.layout") in found             # `from shards import layout`
    assert any(m == "prep.pack" and t.startswith("shards.") for m, t in found)
