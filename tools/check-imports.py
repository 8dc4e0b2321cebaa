#!/usr/bin/env python3
"""Fails when an import in src/ points the wrong way.

rustc accepts cycles between modules, so the layout's rule is checked here:
every `crate::` path a file names is resolved to the file it lands in, and
  - the files form no cycle, nor do the top-level modules (folders);
  - each top-level module imports only modules below it in LAYERS;
  - a datapath file imports neither the registry (datapath/mod.rs) nor
    another datapath.
Prints one line per violation and exits 1 if there is any.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Each layer may import the layers after it, never one before it. Modules
# in the same layer may import each other as long as no cycle forms.
LAYERS = [
    {"main"},
    {"service", "demo"},
    {"datapath"},
    {"relay"},
    {"runtime"},
    {"bpf", "sys", "telemetry", "cli"},
]


def rank(module):
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise SystemExit(f"tools/check-imports.py: src/{module} is in no layer; add it to LAYERS")


def files():
    for root, _, names in os.walk(SRC):
        for name in names:
            if name.endswith(".rs"):
                yield os.path.relpath(os.path.join(root, name), SRC)


def module_path(rel):
    """src/a/b.rs -> [a, b]; src/a/mod.rs -> [a]; src/lib.rs -> []."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def crate_paths(text):
    """Every path after `crate::`, with `{a, b::c}` groups expanded."""
    paths = []
    for match in re.finditer(r"\bcrate::", text):
        paths.extend(parse_tree(text, match.end(), []))
    return paths


def parse_tree(text, i, prefix):
    path = list(prefix)
    while True:
        m = re.match(r"\s*(\w+)", text[i:])
        if m:
            path.append(m.group(1))
            i += m.end()
            if text.startswith("::", i):
                i += 2
                if text.startswith("{", i):
                    return parse_group(text, i + 1, path)
                continue
            return [path]
        if text.startswith("{", i):
            return parse_group(text, i + 1, path)
        return [path] if path else []


def parse_group(text, i, prefix):
    paths, depth, start = [], 0, i
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                break
            depth -= 1
        elif c == "," and depth == 0:
            paths.extend(parse_tree(text, start, prefix))
            start = i + 1
        i += 1
    paths.extend(parse_tree(text, start, prefix))
    return [p for p in paths if p[len(prefix):] not in ([], ["self"])] + [prefix]


def resolve(path, modules):
    """The longest prefix of `path` that is a module file."""
    for n in range(len(path), 0, -1):
        key = tuple(path[:n])
        if key in modules:
            return modules[key]
    return None


def main():
    modules = {tuple(module_path(f)): f for f in files()}
    edges = {}
    for rel in modules.values():
        text = strip_comments(open(os.path.join(SRC, rel)).read())
        targets = set()
        for path in crate_paths(text):
            target = resolve(path, modules)
            if target and target != rel:
                targets.add(target)
        edges[rel] = targets
    errors = []

    def top(rel):
        parts = module_path(rel)
        return parts[0] if parts else "main"

    for rel, targets in sorted(edges.items()):
        if rel == "lib.rs":
            continue
        for target in sorted(targets):
            a, b = top(rel), top(target)
            if a != b and rank(b) < rank(a):
                errors.append(f"src/{rel} imports src/{target}: {b} is above {a}")
            parts = module_path(rel)
            if parts[:1] == ["datapath"] and len(parts) == 2 and b == "datapath":
                what = "the registry" if target == os.path.join("datapath", "mod.rs") else "another datapath"
                errors.append(f"src/{rel} imports src/{target}: a datapath never imports {what}")

    def cycles(graph):
        found, state, stack = [], {}, []

        def visit(node):
            state[node] = 1
            stack.append(node)
            for nxt in sorted(graph.get(node, ())):
                if state.get(nxt) == 1:
                    found.append(stack[stack.index(nxt):] + [nxt])
                elif nxt not in state:
                    visit(nxt)
            stack.pop()
            state[node] = 2

        for node in sorted(graph):
            if node not in state:
                visit(node)
        return found

    file_graph = {k: {t for t in v if t != "lib.rs"} for k, v in edges.items() if k != "lib.rs"}
    for cycle in cycles(file_graph):
        errors.append("import cycle: " + " -> ".join(f"src/{f}" for f in cycle))
    folder_graph = {}
    for rel, targets in file_graph.items():
        for target in targets:
            if top(rel) != top(target):
                folder_graph.setdefault(top(rel), set()).add(top(target))
    for cycle in cycles(folder_graph):
        errors.append("import cycle between folders: " + " -> ".join(cycle))
    for error in errors:
        print(error)
    if errors:
        sys.exit(1)
    print(f"imports point down: {len(file_graph)} files, no cycle")


main()
