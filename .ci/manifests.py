"""Helpers of .ci/deploy-check for rendered Kubernetes manifests (multi-document YAML).

  manifests.py same A B          A and B hold the same objects (a ConfigMap's *.toml compared as
                                 parsed TOML, so comments may differ; everything else exactly)
  manifests.py toml FILE OUTDIR  writes each ConfigMap's *.toml entry to OUTDIR/<file stem>.<map>.<key>
"""

import pathlib
import sys
import tomllib

import yaml


def objects(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def comparable(obj):
    if obj["kind"] == "ConfigMap":
        obj = dict(obj)
        obj["data"] = {
            key: tomllib.loads(text) if key.endswith(".toml") else text
            for key, text in obj.get("data", {}).items()
        }
    return obj


def same(a, b):
    left, right = objects(a), objects(b)
    if left.keys() != right.keys():
        print(f"{a} and {b} hold different objects: {sorted(left)} / {sorted(right)}")
        return 1
    differ = [k for k in left if comparable(left[k]) != comparable(right[k])]
    for kind, name in differ:
        print(f"{kind}/{name} differs between {a} and {b}:")
        print(yaml.safe_dump(comparable(left[(kind, name)]), sort_keys=True))
        print("---")
        print(yaml.safe_dump(comparable(right[(kind, name)]), sort_keys=True))
    return 1 if differ else 0


def toml(path, outdir):
    stem = pathlib.Path(path).stem
    written = 0
    for (kind, name), obj in objects(path).items():
        if kind != "ConfigMap":
            continue
        for key, text in obj.get("data", {}).items():
            if key.endswith(".toml"):
                out = pathlib.Path(outdir) / f"{stem}.{name}.{key}"
                out.write_text(text, encoding="utf-8")
                print(out)
                written += 1
    if not written:
        print(f"{path}: no ConfigMap holds a .toml file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "same":
        sys.exit(same(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 4 and sys.argv[1] == "toml":
        sys.exit(toml(sys.argv[2], sys.argv[3]))
    sys.exit(__doc__)
