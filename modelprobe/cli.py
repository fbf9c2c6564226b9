"""`modelprobe validate | schema | compare | history | merge | new | discover | find`."""

from __future__ import annotations

import argparse
import json
import re
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
    from .spec.load import set_data_roots

    set_data_roots([Path.cwd()] + ([Path(args.data_root)] if args.data_root else []))
    try:
        return _validate(args)
    finally:
        set_data_roots([])


def _validate(args: argparse.Namespace) -> int:
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


def _write(path: Path, text: str) -> None:
    """Write a file the user asked for; an OS error becomes one ModelprobeError line naming the path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise ModelprobeError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        _write(Path(args.output), text)
        print(f"wrote {args.output}")
    return 0


_PROBE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def cmd_new(args: argparse.Namespace) -> int:
    from .kinds import KINDS
    try:
        kind = KINDS[args.kind]
    except KeyError:
        raise ModelprobeError(f"unknown kind '{args.kind}' (known: {', '.join(KINDS)})") from None
    if kind.skeleton is None:
        raise ModelprobeError(f"kind '{args.kind}' ships no skeleton (its class sets no `skeleton`)")
    if not _PROBE_NAME.match(args.name):
        raise ModelprobeError(f"probe name '{args.name}': use letters, digits, '_', '.' or '-' (no path)")
    directory = Path(args.directory)
    if directory.exists() and not directory.is_dir():
        raise ModelprobeError(f"--directory {directory} is not a directory")
    target = directory / f"{args.name}.probe.yaml"
    if target.exists() and not args.force:
        raise ModelprobeError(f"{target} exists (use --force to overwrite)")
    _write(target, kind.skeleton)
    print(f"wrote {target}")
    for rel, rows in kind.skeleton_data.items():
        data = directory / rel
        if not data.exists():
            _write(data, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"wrote {data} ({len(rows)} example rows: replace them with your data)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .report.baseline import cli_compare
        return cli_compare(argv[1:])
    if argv[:1] == ["discover"]:
        try:
            from .kinds.circuit.discover import cli_discover
        except ImportError:
            print("modelprobe: discovery is not available in this build", file=sys.stderr)
            return 2
        return cli_discover(argv[1:])
    if argv[:1] == ["history"]:
        from .report.history import cli_history
        return cli_history(argv[1:])
    if argv[:1] == ["merge"]:
        from .shard import cli_merge
        return cli_merge(argv[1:])
    if argv[:1] == ["find"]:
        from .kinds.feature.find import cli_find
        return cli_find(argv[1:])
    parser = argparse.ArgumentParser(prog="modelprobe", description="claims about model internals, as tests")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check probe files (and, with --model, against a model)")
    v.add_argument("paths", nargs="*", help="probe files or directories (default: probes)")
    v.add_argument("--model", default=None, help="also check layers, heads and tokens against this model")
    v.add_argument("--data-root", default=None,
                   help="also allow data files under this folder (default: the probe's folder and the working "
                        "directory)")
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
    sub.add_parser("history", help="each claim's effect across releases: modelprobe history A.json B.json ... -o h.html")
    sub.add_parser("merge", help="join --probe-shard reports: modelprobe merge A.json B.json ... -o report.json")
    sub.add_parser("find", help="rank neurons / SAE latents by AUROC and write a feature probe for the best")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ModelprobeError as e:
        print(f"modelprobe: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
