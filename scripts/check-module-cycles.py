#!/usr/bin/env python3
"""Fail when the top-level modules of src/ import each other in a cycle.

A top-level module is a folder or file directly under src/ (`config/`, `proxy.rs`, ...). An edge
A -> B is any `crate::B` path written in a file of A (in `use` lines and inline paths alike;
comments and top-level `#[cfg(test)]` modules are skipped: a unit test may build a graph
through `config` without that making `routes` depend on it). Prints every strongly connected component of more than one module, with one
file and line per edge so the cycle can be found, and exits 1; prints the module order and exits
0 when there is none.

Usage: scripts/check-module-cycles.py [SRC_DIR]
"""
import os
import re
import sys

PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `use crate::{a, b::c}` groups
GROUP = re.compile(r"\bcrate::\{([^}]*)\}", re.S)


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


def modules(src):
    mods = {}
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        if name in ("lib.rs", "main.rs"):
            continue
        if os.path.isdir(p):
            mods.setdefault(name, []).extend(
                os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".rs")
            )
        elif name.endswith(".rs"):
            mods.setdefault(name[:-3], []).append(p)
    return mods


def edges(src):
    mods = modules(src)
    graph = {m: {} for m in mods}
    for m, files in mods.items():
        for f in sorted(files):
            with open(f, encoding="utf-8") as fh:
                lines = strip_comments(fh.read())
            text = "\n".join(lines)
            for lineno, line in enumerate(lines, 1):
                for t in PATH.findall(line):
                    if t in mods and t != m:
                        graph[m].setdefault(t, f"{os.path.relpath(f)}:{lineno}")
            for g in GROUP.finditer(text):
                lineno = text.count("\n", 0, g.start()) + 1
                for part in g.group(1).split(","):
                    t = part.strip().split("::")[0].strip()
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


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "src")
    src = os.path.normpath(src)
    graph = edges(src)
    bad = [c for c in sccs(graph) if len(c) > 1]
    if not bad:
        # Tarjan emits components in reverse topological order: dependencies first.
        order = [c[0] for c in sccs(graph)]
        print("no import cycle between top-level modules of src/ (dependencies first):")
        print("  " + " <- ".join(order))
        return 0
    for comp in bad:
        print(f"import cycle between top-level modules: {', '.join(comp)}")
        members = set(comp)
        for a in comp:
            for b, where in sorted(graph[a].items()):
                if b in members:
                    print(f"  {a} -> {b}  ({where})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
