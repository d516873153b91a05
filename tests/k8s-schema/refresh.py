#!/usr/bin/env python3
"""Refresh the Kubernetes API schemas that tests/tests/deploy.rs validates deploy/'s manifests against.

    tests/k8s-schema/refresh.py SWAGGER_JSON 'WHERE IT CAME FROM'

SWAGGER_JSON is Kubernetes' published OpenAPI v2 document, api/openapi-spec/swagger.json of the
kubernetes/kubernetes repository at a release branch or tag (kubernetes-client/python vendors the
same file, unchanged, as kubernetes/swagger.json.unprocessed). It writes, next to this script:

- swagger.json: the document's definitions cut down to those reachable (through $ref) from the
  kinds in KINDS, descriptions dropped, no paths;
- discovery/<group-version>.json: the APIResourceList an API server serves for each group-version
  of KINDS, derived from the document's paths (the operations' x-kubernetes-action and
  x-kubernetes-group-version-kind);
- SOURCE: the second argument.

tests/tests/deploy.rs serves them to kubectl from a fake API server (tests/src/kube_api.rs; the
OpenAPI document as the protobuf that kubectl downloads). Add a kind to KINDS when deploy/ starts
using one.
"""

import json
import os
import re
import sys

# group-version (as in the API path) -> the kinds deploy/ uses.
KINDS = {
    "api/v1": ["Namespace", "ServiceAccount", "Pod"],
    "apis/apps/v1": ["DaemonSet"],
    "apis/rbac.authorization.k8s.io/v1": ["ClusterRole", "ClusterRoleBinding"],
    "apis/node.k8s.io/v1": ["RuntimeClass"],
}

ACTIONS = {"post": "create", "put": "update", "watchlist": "watch"}
REF = "#/definitions/"


def group_version(gv):
    parts = gv.split("/")
    return ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])


def refs(node, out):
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith(REF):
            out.add(r[len(REF):])
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def trim(doc):
    defs = doc["definitions"]
    todo = set()
    for gv, kinds in KINDS.items():
        group, version = group_version(gv)
        for kind in kinds:
            want = {"group": group, "version": version, "kind": kind}
            names = [n for n, s in defs.items() if want in s.get("x-kubernetes-group-version-kind", [])]
            if len(names) != 1:
                sys.exit(f"refresh.py: {gv} {kind}: {len(names)} definitions")
            todo.add(names[0])
    keep = set()
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            found = set()
            refs(defs[n], found)
            todo |= found - keep
    return {
        "swagger": doc["swagger"],
        "info": doc["info"],
        "definitions": {n: strip_descriptions(defs[n]) for n in sorted(keep)},
    }


def discovery(doc, gv):
    """The APIResourceList of gv, from the operations on its paths."""
    prefix = "/" + gv + "/"
    pat = re.compile(r"^(?:watch/)?(namespaces/\{namespace\}/)?([a-z]+)(/\{name\})?(/[a-z]+)?$")
    res = {}
    for path, item in doc["paths"].items():
        m = pat.match(path[len(prefix):]) if path.startswith(prefix) else None
        if not m:
            continue
        name = m.group(2) + (m.group(4) or "")
        for op in item.values():
            if not isinstance(op, dict) or "x-kubernetes-action" not in op:
                continue
            kind = op.get("x-kubernetes-group-version-kind", {}).get("kind")
            r = res.setdefault(name, {"name": name, "namespaced": False, "kind": kind, "verbs": set()})
            r["namespaced"] |= m.group(1) is not None
            r["verbs"].add(ACTIONS.get(op["x-kubernetes-action"], op["x-kubernetes-action"]))
    out = []
    for name in sorted(res):
        r = res[name]
        if r["kind"]:
            r["singularName"] = "" if "/" in name else r["kind"].lower()
            r["verbs"] = sorted(r["verbs"])
            out.append(r)
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv.split("/", 1)[1], "resources": out}


def write(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    here = os.path.dirname(os.path.abspath(__file__))
    write(os.path.join(here, "swagger.json"), trim(doc))
    for gv in KINDS:
        write(os.path.join(here, "discovery", gv + ".json"), discovery(doc, gv))
    with open(os.path.join(here, "SOURCE"), "w") as f:
        f.write(sys.argv[2].strip() + "\n")


if __name__ == "__main__":
    main()
