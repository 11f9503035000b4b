"""Unpack what device_run.sh brought back into benchmarks/results, then regenerate BENCHMARKS.md.

    python benchmarks/collect.py /work/.device/.../results.tar.gz [more tarballs or unpacked dirs] [--no-report]

Each tarball holds <stage>.log and r/*.json. JSON results replace the files of the same name, except
decode.json, whose rows are merged by model (the Llama-2-7B and Llama-3.1-8B rows may come from two
calls); logs land beside them as <stage>.log. Then `python -m slora_jax.bench.report` runs (CPU).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGED_BY_MODEL = ("decode.json",)


def merge_rows(old: list, new: list) -> list:
    """`new`'s rows, and the rows of `old` whose model `new` does not measure."""
    models = {r.get("model") for r in new}
    return [r for r in old if r.get("model") not in models] + new


def collect(source: str, results: str) -> list:
    """Copy one tarball's (or unpacked directory's) results into `results`; returns the files written."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isdir(source):
            root = source
        else:
            with tarfile.open(source) as tar:  # members stay inside tmp (the "data" filter where Python has it)
                tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            root = tmp
        os.makedirs(results, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(root, "r", "*"))):
            dest = os.path.join(results, os.path.basename(path))
            if os.path.basename(path) in MERGED_BY_MODEL and os.path.exists(dest):
                with open(path) as f, open(dest) as g:
                    rows = merge_rows(json.load(g), json.load(f))
                with open(dest, "w") as f:
                    json.dump(rows, f, indent=1)
            else:
                shutil.copyfile(path, dest)
            written.append(dest)
        for path in sorted(glob.glob(os.path.join(root, "*.log"))):
            dest = os.path.join(results, os.path.basename(path))
            shutil.copyfile(path, dest)
            written.append(dest)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", help="results.tar.gz files (or directories unpacked from them)")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    for src in args.sources:
        for path in collect(src, args.results):
            print(os.path.relpath(path, ROOT))
    if not args.no_report:
        sys.path.insert(0, ROOT)
        from slora_jax.bench.report import write_report

        print(json.dumps(write_report(args.results, os.path.join(ROOT, "BENCHMARKS.md"),
                                      os.path.join(ROOT, "benchmarks", "plots"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
