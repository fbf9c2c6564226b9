"""`modelprobe validate | schema | compare | new | discover`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ModelprobeError

SCHEMA_PATH = Path(__file__).parent / "schema" / "modelprobe.schema.json"


def json_schema() -> dict:
    """One JSON Schema for every probe file: a union over the kinds, chosen by `kind`."""
    from typing import Annotated, Union

    from pydantic import Field, TypeAdapter

    from .kinds import KINDS

    specs = tuple(k.Spec for k in KINDS.values())
    union = Annotated[Union[specs], Field(discriminator="kind")] if len(specs) > 1 else specs[0]  # noqa: UP007
    schema = TypeAdapter(union).json_schema(by_alias=True)
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["$id"] = "https://modelprobe.dev/schema/modelprobe.schema.json"
    schema["title"] = "modelprobe probe file"
    return schema


def _probe_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths or ["probes"]:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(path.rglob("*.probe.yaml")))
        else:
            out.append(path)
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    from .kinds import check_data_files, instantiate, load

    subject = None
    if args.model:
        from .subject import load_subject
        try:
            subject = load_subject(args.model, progress=False)
        except ModelprobeError as e:
            print(f"modelprobe: {e}", file=sys.stderr)
            return 2
    files = _probe_files(args.paths)
    bad = 0
    for f in files:
        try:
            probe = load(f)
            check_data_files(probe)
            if subject is not None:
                instantiate(probe, subject)
        except ModelprobeError as e:
            bad += 1
            print(str(e))
            continue
        print(f"{f}: ok ({probe.spec.kind}, {len(probe.spec.claims)} claims)")
    if not files:
        print("no *.probe.yaml files found", file=sys.stderr)
        return 2
    return 1 if bad else 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from .skeletons import SKELETONS
    if args.kind not in SKELETONS:
        print(f"modelprobe: unknown kind '{args.kind}' (known: {', '.join(sorted(SKELETONS))})", file=sys.stderr)
        return 2
    target = Path(args.directory) / f"{args.name}.probe.yaml"
    if target.exists() and not args.force:
        print(f"modelprobe: {target} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(SKELETONS[args.kind])
    print(f"wrote {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .report.baseline import cli_compare
        return cli_compare(argv[1:])
    if argv[:1] == ["discover"]:
        try:
            from .discover import cli_discover
        except ImportError:
            print("modelprobe: discovery is not available in this build", file=sys.stderr)
            return 2
        return cli_discover(argv[1:])
    parser = argparse.ArgumentParser(prog="modelprobe", description="claims about model internals, as tests")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check probe files (and, with --model, against a model)")
    v.add_argument("paths", nargs="*", help="probe files or directories (default: probes)")
    v.add_argument("--model", default=None, help="also check layers, heads and tokens against this model")
    v.set_defaults(func=cmd_validate)
    s = sub.add_parser("schema", help="write the JSON Schema probe files reference")
    s.add_argument("-o", "--output", default=str(SCHEMA_PATH), help="file to write, or - for stdout")
    s.set_defaults(func=cmd_schema)
    n = sub.add_parser("new", help="write a commented probe-file skeleton")
    n.add_argument("kind")
    n.add_argument("name")
    n.add_argument("--directory", default="probes")
    n.add_argument("--force", action="store_true")
    n.set_defaults(func=cmd_new)
    sub.add_parser("compare", help="diff two reports: modelprobe compare A.json B.json")
    sub.add_parser("discover", help="propose a circuit and write its probe file")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
