"""Checks that the workspace's `rust-version` is what its dependency tree really needs: the
highest `rust-version` among the packages the workspace's crates build against (normal and
build dependencies, every feature; dev-dependencies excluded, since a user never builds them).

Reads `cargo metadata` on standard input."""

import json
import sys


def parse(version):
    return tuple(int(part) for part in version.split("."))


def main():
    meta = json.load(sys.stdin)
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    members = meta["workspace_members"]
    declared = {packages[m]["rust_version"] for m in members if packages[m]["name"] != "tiercache-suite"}
    if len(declared) != 1 or None in declared:
        sys.exit(f"every crate must declare the workspace's rust-version; found {sorted(map(str, declared))}")
    declared = declared.pop()

    seen, todo = set(), list(members)
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds & {None, "build"} and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    needs = max(
        ((parse(packages[i]["rust_version"]), packages[i]["name"]) for i in seen if packages[i]["rust_version"]),
        default=((0,), "nothing"),
    )
    need = needs[0][:2]
    if parse(declared)[:2] != need:
        sys.exit(
            f"rust-version is {declared}, but the dependency tree needs {'.'.join(map(str, need))} "
            f"({needs[1]}): set [workspace.package] rust-version to that"
        )
    print(f"rust-version {declared}: what the dependency tree needs ({needs[1]})")


main()
