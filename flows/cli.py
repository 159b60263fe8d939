"""`qlora-pipeline` command line (run | validate | publish | approve | reject | champion | store | prepare-assets). Exit codes: 0 success, 1 the run or the data failed (or the store is damaged), 2 usage/config error."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline_config import ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_prepare_assets(args: argparse.Namespace) -> int:
    from tasks.lib.assets import prepare_assets

    for name, path in prepare_assets(args.dir).items():
        print(f"{name}: {path}")
    return EXIT_OK


def missing_embedded_assets(paths: list[str | None]) -> int | None:
    """EXIT_USAGE, saying what to run, when a path the command reads is one of the embedded default's and is not in
    the working folder (the default names .qlora/assets/... relative to it, which prepare-assets makes); else None."""
    default = load_config()
    embedded = {default.model.base, default.data.train_path, default.data.eval_path}
    missing = sorted(path for path in set(paths) & embedded if not Path(path).exists())
    if not missing:
        return None
    print(f"error: {', '.join(missing)}: not found in {Path.cwd()}; the embedded default's model and data are made "
          f"in the working folder by `qlora-pipeline prepare-assets`: run it here first", file=sys.stderr)
    return EXIT_USAGE


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0: the data passed (report on stdout); 1: it failed or cannot be read (the problem and
    where it is on stderr, never a traceback); 2: usage or config error."""
    cfg = load_config(args.config, args.set)
    data_paths = [] if args.data else [cfg.data.train_path, cfg.data.eval_path]
    if (refused := missing_embedded_assets([cfg.data.tokenizer or cfg.model.base, *data_paths])) is not None:
        return refused
    try:
        from tasks.lib.datarows import DataError
        from tasks.validate import validate_for_cli

        contract_given = any(item.split("=", 1)[0].strip() == "data.contract" for item in args.set)
        passed, report = validate_for_cli(cfg, args.data, args.format, contract_given)
    except DataError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as problem:  # noqa: BLE001 - a data check must never end in a traceback
        print(f"error: validation could not run: {type(problem).__name__}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(report)
    if not passed:
        failed, section = [], ""
        for line in report.splitlines():
            if line.startswith("## "):  # a mixture's sources have a section each: `## source-NAME: ...`
                section = line[3:].split(":")[0]
            elif line.startswith("| ") and "| FAIL" in line:
                rule = line.split("|")[1].strip()
                failed.append(f"{rule} in source {section.removeprefix('source-')}"
                              if section.startswith("source-") else rule)
        print(f"error: data contract failed: {', '.join(failed)} (rules, counts and rows above)", file=sys.stderr)
    return EXIT_OK if passed else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)  # fail fast, before Prefect starts, on a bad config
    if (refused := missing_embedded_assets([cfg.model.base, cfg.data.train_path, cfg.data.eval_path])) is not None:
        return refused
    from flows.pipeline import qlora_pipeline

    state = qlora_pipeline(config=args.config, overrides=args.set, return_state=True)
    if not state.is_completed():
        print(f"error: qlora-pipeline run {state.name}: {state.message}", file=sys.stderr)
        return EXIT_FAILED
    release = state.result().release
    print(f"release: {release.repo}/{release.version} at {release.path}"
          f"{'' if release.created else ' (already published; nothing new)'}")
    print(f"release bundle: {release.bundle}  (re-publish: qlora-pipeline publish --release {release.bundle})")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish an already built release bundle again (to publish.target), running no stage."""
    cfg = load_config(args.config, args.set)
    from tasks.lib.hub import HubError, preflight
    from tasks.publish import publish_bundle, ref_from_uri

    try:
        store, ref = ref_from_uri(args.release)
    except ValueError as problem:
        print(f"error: --release: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        preflight(cfg)
        release = publish_bundle(cfg, store, ref)
    except HubError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"release: {release.repo}/{release.version} at {release.path}"
          f"{'' if release.created else ' (already published; nothing new)'}")
    return EXIT_OK


def cmd_champion(args: argparse.Namespace) -> int:
    """What the tracker's `@champion` alias of the target's registered model points to: exit 0 and the release,
    1 when nothing was published with tracking on, 2 when the config has no `tracking:` section."""
    cfg = load_config(args.config, args.set)
    if cfg.tracking is None:
        print("error: the config has no `tracking:` section (tracking.uri names the MLflow server)", file=sys.stderr)
        return EXIT_USAGE
    from tasks.lib import tracking

    model = tracking.registered_model_name(cfg)
    found = tracking.champion(cfg.tracking.uri, model)
    if found is None:
        print(f"error: {model} has no @champion at {cfg.tracking.uri} (no tracked run has published it)",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"{model}@champion: version {found['version']}: {found['release_version']} at {found['release_uri']}\n"
          f"release hash: {found['release_hash']}\nMLflow run: {found['run_id']}")
    return EXIT_OK


def cmd_store(args: argparse.Namespace) -> int:
    """`store verify [--repair]`: exit 0 when the store is sound (or was repaired), 1 when it is not;
    `store gc`: remove leftovers and unreferenced objects older than --older-than."""
    cfg = load_config(args.config, args.set)
    from tasks.lib.artifacts import ArtifactStore
    from tasks.lib.store_check import collect_garbage, parse_age, verify_store

    store = ArtifactStore(cfg.artifacts.root)
    if args.store_command == "verify":
        return EXIT_OK if verify_store(store, repair=args.repair) == 0 else EXIT_FAILED
    try:
        older_than = parse_age(args.older_than)
    except ValueError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    collect_garbage(store, older_than, dry_run=args.dry_run)
    return EXIT_OK


def cmd_review(args: argparse.Namespace) -> int:
    """Resume a run waiting for approval with the reviewer's decision (Prefect's REST resume endpoint)."""
    from flows.approval import resume_with_decision

    approved = args.command == "approve"
    try:
        state = resume_with_decision(args.run_id, approved, args.reviewer, args.comment or "")
    except ValueError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"flow run {args.run_id} {'approved' if approved else 'rejected'} by {args.reviewer}; now {state}")
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
    validate.add_argument("--data", help="a data file (or datasets folder/id) to check instead of the config's "
                                          "train and eval data")
    validate.add_argument("--format", choices=["auto", "alpaca", "prompt-completion", "messages"],
                          help="row format (default: data.format); checked against data_contracts/<format>.json "
                               "unless --set data.contract=... names another")
    validate.set_defaults(func=cmd_validate)

    publish = commands.add_parser("publish", help="publish an already built release bundle (runs no stage)")
    with_config(publish)
    publish.add_argument("--release", required=True, metavar="ARTIFACT_URI",
                         help="the release bundle artifact, <artifacts.root>/objects/<sha256> (printed by `run`)")
    publish.set_defaults(func=cmd_publish)

    for verb, help_text in (("approve", "approve a run waiting for review: it goes on to publish"),
                            ("reject", "reject a run waiting for review: it ends Failed, unpublished")):
        review = commands.add_parser(verb, help=help_text)
        review.add_argument("run_id", metavar="RUN_ID", help="the flow run id (Prefect UI or `prefect flow-run ls`)")
        review.add_argument("--reviewer", required=True)
        review.add_argument("--comment", required=verb == "reject", help="required when rejecting")
        review.set_defaults(func=cmd_review)

    champion = commands.add_parser("champion", help="print the release the tracker's @champion alias points to "
                                                     "(tracking: set)")
    with_config(champion)
    champion.set_defaults(func=cmd_champion)

    store = commands.add_parser("store", help="check the artifact store (verify) or remove what no run needs (gc)")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    verify = store_commands.add_parser("verify", help="hash every object against its manifest, check every cache "
                                                      "entry (exit 1 when something is damaged)")
    with_config(verify)
    verify.add_argument("--repair", action="store_true", help="set damaged objects aside and drop the cache "
                                                               "entries naming them: the next run rebuilds them")
    verify.set_defaults(func=cmd_store)
    gc = store_commands.add_parser("gc", help="remove tmp/ leftovers and objects nothing references")
    with_config(gc)
    gc.add_argument("--older-than", default="7d", metavar="AGE", help="only what is older than this (30m, 12h, "
                                                                      "7d; default 7d)")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    gc.set_defaults(func=cmd_store)

    assets = commands.add_parser("prepare-assets", help="build the embedded default's model and data")
    assets.add_argument("--dir", default=".qlora/assets", help="where (default: .qlora/assets, where the embedded "
                                                              "default's paths point, relative to the working folder)")
    assets.set_defaults(func=cmd_prepare_assets)
    return parser


def configure_process() -> None:
    """What the command line sets for itself before Prefect and the libraries load (Prefect reads its settings
    once, on import). A setting the user made wins.

    - MLflow (imported when the config has a `tracking:` section) sends no usage telemetry: it would post to
      MLflow's own endpoint, and it reads DO_NOT_TRACK only as `true`.
    - The temporary Prefect server it starts when no API URL is set sends no telemetry (which fails offline
      and logs an ERROR), and is given 120 s to answer instead of Prefect's 20: on a new machine it first
      creates and migrates its database, which took over 20 s on a busy 2-core CPU (the run then failed).
    - torchao's optional CUDA extensions and torch's pytree deprecation, reported on every start of a CPU
      install, are not logged, so a successful run logs no ERROR or WARNING that is not one."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a tracked run reports to its own server only
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from tasks.lib.log import quiet_library_bars
    from tasks.lib.modeling import quiet_transformers

    quiet_transformers()
    quiet_library_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func not in (cmd_store, cmd_champion):  # these load no model library: nothing to quiet
        configure_process()
    try:
        return args.func(args)
    except ConfigError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
