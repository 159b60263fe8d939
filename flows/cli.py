"""`qlora-pipeline` command line. Exit codes: 0 success, 1 the run or the data failed, 2 usage/config error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_config import ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_prepare_assets(args: argparse.Namespace) -> int:
    from pipeline_config.embedded import prepare_assets

    for name, path in prepare_assets(args.dir).items():
        print(f"{name}: {path}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.contracts import DataError
    from tasks.validate import validate_file

    cfg = load_config(args.config, args.set)
    paths = [Path(args.data)] if args.data else [Path(cfg.data.train_path), Path(cfg.data.eval_path)]
    passed = True
    for path in paths:
        try:
            report, _ = validate_file(path, Path(cfg.data.contract), cfg.data.format)
        except DataError as problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_FAILED
        print(f"## `{path}`\n\n{report.to_markdown()}")
        passed &= report.passed
    return EXIT_OK if passed else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    load_config(args.config, args.set)  # fail fast, before Prefect starts, on a bad config
    from flows.pipeline import qlora_pipeline

    state = qlora_pipeline(config=args.config, overrides=args.set, return_state=True)
    if not state.is_completed():
        print(f"error: qlora-pipeline run {state.name}: {state.message}", file=sys.stderr)
        return EXIT_FAILED
    release = state.result().release
    print(f"release: {release.repo}/{release.version} at {release.path}"
          f"{'' if release.created else ' (already published; nothing new)'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", help="pipeline YAML (default: the embedded default)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. train.max_steps=20 (repeatable)")

    run = commands.add_parser("run", help="run the whole pipeline")
    with_config(run)
    run.set_defaults(func=cmd_run)

    validate = commands.add_parser("validate", help="check data against its contract (no training)")
    with_config(validate)
    validate.add_argument("--data", help="a data file to check instead of the config's train and eval files")
    validate.set_defaults(func=cmd_validate)

    assets = commands.add_parser("prepare-assets", help="build the embedded default's model and data")
    assets.add_argument("--dir", default=".qlora/assets")
    assets.set_defaults(func=cmd_prepare_assets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
