#!/usr/bin/env python3
"""Fail when the modules of one level import each other in a cycle.

Two levels are checked: the top-level modules of src/ (`config/`, `proxy/`, ...), and the
submodules of each module listed in LAYERED (`proxy/listen`, `proxy/request`, `proxy/upstream`,
...), whose arrows must point one way (listen -> request -> upstream; the leaves below).

A node is a folder or file directly under the level's directory (`lib.rs`, `main.rs` and the
level's own `mod.rs` are not nodes: they are where the nodes are put together). An edge A -> B
is any path written in a file of A that resolves to B: `crate::B` at the top level,
`crate::proxy::B` or `super::B` (from a file directly under `proxy/`) or `super::super::B`
(one folder deeper) below it, in `use` lines, `{...}` groups and inline paths alike. Comments
and top-level `#[cfg(test)]` modules are skipped: a unit test may build a graph through
`config` without that making `routes` depend on it. Prints every strongly connected component
of more than one node, with one file and line per edge so the cycle can be found, and every
edge FORBIDDEN names (a layer importing one above it), and exits 1; prints each level's order
and exits 0 when there is none.

Usage: scripts/check-module-cycles.py [SRC_DIR]
"""
import os
import re
import sys

# Modules whose submodules must not import each other in a cycle.
LAYERED = ["proxy"]

# Beyond "no cycle": the layers of `proxy` import one way (listen -> request -> upstream), and
# the leaves import no layer. Node -> the nodes it must not import.
_LAYERS = ["listen", "request", "upstream", "prepare"]
FORBIDDEN = {
    "proxy": {
        "upstream": ["listen", "request", "prepare"],
        "request": ["listen", "prepare"],
        **{
            leaf: _LAYERS
            for leaf in ["body", "conn", "headers", "observe", "respond", "tunnel", "echo"]
        },
    },
}

IDENT = r"[a-z_][a-z0-9_]*"
# `crate::a::b`, `super::super::a`, `self::a`, and `crate::a::{b, c::d}` (group: the braces).
PATH = re.compile(
    r"\b(crate|self|super)((?:::super)*)((?:::" + IDENT + r")*)(?:::\{([^}]*)\})?", re.S
)


def strip_comments(text):
    """The file's lines with comments and top-level `#[cfg(test)]` items blanked out."""
    out = []
    in_test = False
    for line in text.splitlines():
        s = line.lstrip()
        if line.startswith("#[cfg(test)]"):
            in_test = True
        if in_test:
            out.append("")
            if line == "}" or (line.startswith("mod ") and line.endswith(";")):
                in_test = False
            continue
        if s.startswith("//"):
            out.append("")
            continue
        # drop trailing `// ...` outside strings (good enough for import paths)
        i = line.find(" //")
        out.append(line if i < 0 else line[:i])
    return out


def module_path(src, f):
    """`src/proxy/request/cors.rs` -> ["proxy", "request", "cors"]; `mod.rs` names its folder."""
    parts = os.path.relpath(f, src)[: -len(".rs")].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def resolve(modpath, m):
    """The absolute module paths one match names (several for a `{...}` group)."""
    kind, supers, chain, group = m.group(1), m.group(2), m.group(3), m.group(4)
    if kind == "crate":
        base = []
    else:
        base = list(modpath)
        if kind == "super":
            base = base[:-1]
        base = base[: len(base) - supers.count("super")] if supers else base
    base = base + [c for c in chain.split("::") if c]
    if group is None:
        return [base]
    out = []
    for part in group.split(","):
        first = part.strip().split("::")[0].strip()
        if re.fullmatch(IDENT, first) and first != "self":
            out.append(base + [first])
    return out


def nodes(level_dir, is_root):
    found = {}
    for name in sorted(os.listdir(level_dir)):
        p = os.path.join(level_dir, name)
        if name in ("lib.rs", "main.rs") or (not is_root and name == "mod.rs"):
            continue
        if os.path.isdir(p):
            found.setdefault(name, []).extend(
                os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".rs")
            )
        elif name.endswith(".rs"):
            found.setdefault(name[:-3], []).append(p)
    return found


def edges(src, level):
    """The import graph between the nodes of `level` (a module path; [] is src/ itself)."""
    mods = nodes(os.path.join(src, *level), not level)
    graph = {m: {} for m in mods}
    depth = len(level)
    for m, files in mods.items():
        for f in sorted(files):
            with open(f, encoding="utf-8") as fh:
                lines = strip_comments(fh.read())
            text = "\n".join(lines)
            modpath = module_path(src, f)
            for match in PATH.finditer(text):
                lineno = text.count("\n", 0, match.start()) + 1
                for target in resolve(modpath, match):
                    if len(target) <= depth or target[:depth] != level:
                        continue
                    t = target[depth]
                    if t in mods and t != m:
                        graph[m].setdefault(t, f"{os.path.relpath(f)}:{lineno}")
    return graph


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(src, level):
    name = "src/" + "/".join(level) + ("/" if level else "")
    graph = edges(src, level)
    bad = [c for c in sccs(graph) if len(c) > 1]
    ok = not bad
    for a, banned in FORBIDDEN.get("/".join(level), {}).items():
        for b in banned:
            if b in graph.get(a, {}):
                print(f"{name}{a} must not import {b} (layers point down only): {graph[a][b]}")
                ok = False
    if not bad:
        # Tarjan emits components in reverse topological order: dependencies first.
        order = [c[0] for c in sccs(graph)]
        print(f"no import cycle between the modules of {name} (dependencies first):")
        print("  " + " <- ".join(order))
        return ok
    for comp in bad:
        print(f"import cycle between the modules of {name}: {', '.join(comp)}")
        members = set(comp)
        for a in comp:
            for b, where in sorted(graph[a].items()):
                if b in members:
                    print(f"  {a} -> {b}  ({where})")
    return False


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "src")
    src = os.path.normpath(src)
    ok = check(src, [])
    for m in LAYERED:
        ok = check(src, m.split("/")) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
