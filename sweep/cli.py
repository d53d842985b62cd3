"""`bdsweep`: the command line of the engine.

  bdsweep cell --dataset digits --model smallcnn --attack badnet --ratio 0.1 --defense ft

runs one attack cell (or reuses its saved artifact) and one defense cell, and prints ACC / ASR /
RA / DER for "no defense" and for the defense, and where the artifacts went.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _parse_params(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars (0.2 -> float, true -> bool, [1,2] -> list)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"{flag} {item!r}: value is not valid YAML ({exc.problem})") from exc
    return params


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:6.2f}"


def cmd_cell(args: argparse.Namespace) -> int:
    from bdcore.cells import AttackCellSpec, DefenseCellSpec, compatibility_problem, run_attack_cell, run_defense_cell
    from bdcore.data import load_dataset
    from bdcore.models import check_weights_file, read_weight_shapes

    if not 0 < args.ratio < 1:
        raise UsageError(f"--ratio {args.ratio:g}: a poisoning ratio lies strictly between 0 and 1, e.g. 0.1 for 10% "
                         "of the training set")
    spec = AttackCellSpec(
        dataset=args.dataset, model=args.model, attack=args.attack, ratio=args.ratio, label_mode=args.label_mode,
        target=args.target, seed=args.seed, attack_params=_parse_params(args.attack_param, "--attack-param"),
        train=_parse_params(args.train, "--train"), data_root=args.data_root, pretrained=args.pretrained,
    )
    defense = DefenseCellSpec(defense=args.defense, params=_parse_params(args.defense_param, "--defense-param"))
    # Validate every name and parameter before any training starts.
    problem = compatibility_problem(spec.model, spec.attack, defense.defense)
    if problem:  # a CLIP method on a classifier, or the reverse: refused before the attack trains
        raise UsageError(problem)
    spec.key()
    defense.config(spec.seed)
    if spec.pretrained is not None and spec.is_clip:
        read_weight_shapes(spec.pretrained)  # build_clip checks the fit
    elif spec.pretrained is not None:  # a file of another architecture is refused before any training
        check_weights_file(spec.pretrained, spec.model)
    out = Path(args.out)
    data = load_dataset(spec.dataset, root=spec.data_root)

    def progress(stage: str):
        def report(epoch: int, record: dict) -> None:
            if not args.quiet:
                print(f"  [{stage}] epoch {epoch}: loss {record['train_loss']:.4f}", file=sys.stderr, flush=True)
        return report

    attack = run_attack_cell(spec, out, device=args.device, on_epoch_end=progress("attack"), data=data)
    result = run_defense_cell(attack.path, defense, out, device=args.device, on_epoch_end=progress(args.defense),
                              data=data)

    print(f"cell: {spec.dataset} / {spec.model} / {spec.attack} @ {spec.ratio:g} ({spec.label_mode}, seed {spec.seed})")
    print(f"{'defense':<12}{'ACC %':>8}{'ASR %':>8}{'RA %':>8}{'DER %':>8}{'RIR %':>8}")
    u = attack.metrics
    print(f"{'none':<12}{_fmt(u.acc):>8}{_fmt(u.asr):>8}{_fmt(u.ra):>8}{'-':>8}{'-':>8}")
    if result.status == "done":
        m = result.metrics
        print(f"{args.defense:<12}{_fmt(m.acc):>8}{_fmt(m.asr):>8}{_fmt(m.ra):>8}"
              f"{_fmt(result.scores['der']):>8}{_fmt(result.scores['rir']):>8}")
    else:
        print(f"{args.defense:<12} skipped: {result.reason}")
    print(f"attack artifact:  {attack.path}{'  (reused)' if attack.reused else ''}")
    if result.path is not None:
        print(f"defense artifact: {result.path}{'  (reused)' if result.reused else ''}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from sweep.grid import expand, format_plan, load_grid, plan_summary

    summary = plan_summary(expand(load_grid(args.grid)), args.out)
    print(json.dumps(summary, indent=2) if args.json else format_plan(summary))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sweep.grid import expand, load_grid

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; the output folder must be a folder (new or a sweep's)")
    resources = _parse_resources(args.resources)
    plan = expand(_with_resources(load_grid(args.grid), resources))  # nothing runs on an invalid grid
    # Imported only now: a bad grid is refused before Ray or MLflow is even loaded.
    from sweep.results import format_results, load_results
    from sweep.runner import ResourceError, RunOptions, run_sweep

    for warning in plan.warnings:
        print(f"bdsweep: warning: {warning}", file=sys.stderr)
    options = RunOptions(
        out=Path(args.out), address=args.address, mlflow_uri=args.mlflow_uri, max_concurrent=args.max_concurrent,
        retry_failed=args.retry_failed, device=args.device, progress=not args.quiet,
        executor_args=_parse_params(args.executor_arg, "--executor-arg"), tracking_wait=args.tracking_wait,
        keep_stale=args.keep_stale, rerun=_check_rerun(args.rerun), grid_text=Path(args.grid).read_text(),
    )
    if args.executor:
        _check_executor(args.executor)
        options.executor = args.executor
    try:
        outcome = run_sweep(plan, options)
    except ResourceError as exc:  # refused before any cell ran: a usage error, not a crash
        raise UsageError(str(exc)) from exc
    table = load_results(outcome.out)
    in_plan = {c.cell_id for c in [*plan.attacks, *plan.defenses]}
    table = table[table["cell_id"].isin(in_plan)] if len(table) else table
    print(format_results(table, "table"))
    if outcome.statuses.get("failed"):
        _print_failures(outcome.out, plan)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(outcome.statuses.items()))
    print(f"\nsweep {plan.name!r}: {plan.total_cells} cells ({counts}); ran {outcome.ran} now, "
          f"{outcome.already_finished} were already finished")
    print(f"results (Parquet): {outcome.out / 'results'}   ->  bdsweep results {outcome.out}")
    if outcome.mlflow_uri != "none":
        from sweep.tracking import default_uri

        where = f"bdsweep ui {outcome.out}" if outcome.mlflow_uri == default_uri(outcome.out) else "mlflow ui"
        print(f"tracking (MLflow): {outcome.mlflow_uri}   ->  {where}")
    return 1 if outcome.statuses.get("failed") else 0


RESOURCE_STAGES, RESOURCE_KEYS = ("attack", "defense", "analysis"), ("cpu", "gpu")


def _parse_resources(items: Sequence[str] | None) -> dict[str, dict[str, float]]:
    """--resources STAGE.KEY=VALUE items as {stage: {key: value}}."""
    accepted = (f"expected STAGE.KEY=VALUE with STAGE {', '.join(RESOURCE_STAGES)}, KEY "
                f"{' or '.join(RESOURCE_KEYS)} and VALUE a number >= 0, e.g. attack.gpu=0")
    overrides: dict[str, dict[str, float]] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        stage, _, key = name.strip().partition(".")
        if not sep or stage not in RESOURCE_STAGES or key not in RESOURCE_KEYS:
            raise UsageError(f"--resources {item!r}: {accepted}")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not number >= 0 or number == float("inf"):
            raise UsageError(f"--resources {item!r}: {value!r} is not a number >= 0; {accepted}")
        overrides.setdefault(stage, {})[key] = number
    return overrides


def _with_resources(grid, overrides: dict[str, dict[str, float]]):
    """The grid with its `resources` overridden for this run (cell ids do not depend on them)."""
    if not overrides:
        return grid
    from pydantic import ValidationError

    from sweep.grid import StageResources

    merged = grid.resources.model_dump()
    for stage, values in overrides.items():
        merged[stage].update(values)
    try:
        resources = StageResources.model_validate(merged)
    except ValidationError as exc:  # e.g. a fractional GPU above 1
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise UsageError(f"--resources: {problems}") from None
    return grid.model_copy(update={"resources": resources})


def _print_failures(out: Path, plan, limit: int = 20) -> None:
    """After the table: each failed cell of this plan with its error line, and where to look further."""
    from sweep.results import failure_lines, status_summary

    ids = {c.cell_id for c in [*plan.attacks, *plan.defenses, *plan.analyses]}
    failed = [entry for entry in status_summary(out)["failed"] if entry["cell_id"] in ids]
    if not failed:
        return
    print(f"\nfailed cells ({len(failed)}):")
    print("\n".join(failure_lines(failed, limit=limit)))
    print(f"details (markers, tracebacks): bdsweep status {out}   and   bdsweep status {out} --traceback CELL_ID")


def _check_rerun(where: str | None) -> str | None:
    """A --rerun expression, checked against the results columns before anything runs."""
    if where is None:
        return None
    import pandas as pd

    from sweep.layout import ROW_COLUMNS
    from sweep.results import select_rows

    try:
        select_rows(pd.DataFrame(columns=ROW_COLUMNS), where)
    except ValueError as exc:
        raise UsageError(f"--rerun: {exc}") from exc
    return where


def _check_executor(path: str) -> None:
    from sweep.runner import resolve_executor

    try:
        resolve_executor(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"--executor {path!r}: cannot import it ({exc}); expected MODULE:FUNCTION, "
                         "e.g. sweep.execute:simulated_cell") from exc


def _is_sweep_folder(folder: Path) -> bool:
    from sweep.layout import SweepLayout

    layout = SweepLayout(folder)
    return layout.sweep_file.is_file() or layout.cells.is_dir() or (folder / "results").is_dir()


def _check_sweep_folder(path: str) -> None:
    """`path` must be a sweep's output folder. Without this check, results / status / query / report on
    the wrong folder (often the parent, e.g. `runs` for `runs/quickstart`) print an empty table and exit 0,
    which reads as "the sweep has no results"."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{path}: no such output folder")
    if _is_sweep_folder(folder):
        return
    try:
        inner = sorted(str(folder / c.name) for c in folder.iterdir() if c.is_dir() and _is_sweep_folder(c))
    except OSError:  # unreadable: nothing to suggest
        inner = []
    shown = ", ".join(inner[:5]) + (f" (and {len(inner) - 5} more)" if len(inner) > 5 else "")
    hint = f"sweep folders under it: {shown}" if inner else "give the folder `bdsweep run --out` wrote"
    raise UsageError(f"{path}: not a sweep output folder (no sweep.json, cells/ or results/ in it); {hint}")


def cmd_results(args: argparse.Namespace) -> int:
    from sweep.results import format_results, load_results, pivot_note

    _check_sweep_folder(args.dir)
    if args.agg is not None and not args.pivot:
        raise UsageError(f"--agg {args.agg} aggregates pivot cells; give --pivot ROWS COLS VALUE too")
    pivot, agg = (tuple(args.pivot) if args.pivot else None), args.agg or "mean"
    note = None
    try:
        table = load_results(args.dir, scope="all" if args.all else "current")
        text = format_results(table, args.format, where=args.where, pivot=pivot, agg=agg)
        if pivot is not None and args.format in ("csv", "json"):  # table/markdown end with the note already
            note = pivot_note(table, pivot, agg, where=args.where)
    except ValueError as exc:  # a bad --where expression or --pivot column; the message names which
        raise UsageError(str(exc)) from exc
    print(text)
    if note is not None:  # stderr, so stdout stays machine-readable
        print(note, file=sys.stderr)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from sweep.query import QueryError, query_results
    from sweep.results import format_results

    _check_sweep_folder(args.dir)
    try:
        frame = query_results(args.dir, args.sql, scope="all" if args.all else "current")
    except (FileNotFoundError, QueryError) as exc:
        raise UsageError(str(exc)) from exc
    print(format_results(frame, args.format, columns=[str(c) for c in frame.columns]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.report import ReportFolderError, build_report

    _check_sweep_folder(args.dir)  # before the default DIR/report is written into a foreign folder
    try:
        report = build_report(args.dir, args.out, scope="all" if args.all else "current")
    except (FileNotFoundError, ReportFolderError) as exc:
        flag = "--out: " if isinstance(exc, ReportFolderError) else ""
        raise UsageError(f"{flag}{exc}") from exc
    print(f"report: {report.html}  (Markdown: {report.markdown}; {len(report.images)} figures)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from sweep.prune import format_prune, prune

    _check_sweep_folder(args.dir)
    try:
        report = prune(args.dir, dry_run=args.dry_run)
    except ValueError as exc:  # no grid run recorded: nothing says which cells are current
        raise UsageError(str(exc)) from exc
    print(format_prune(report, args.dry_run))
    return 0


def cmd_show_trigger(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from bdcore.atomic import atomic_write
    from bdcore.attacks import ATTACKS, attack_config, build_attack
    from bdcore.attacks.preview import mean_abs_change, trigger_preview
    from bdcore.attacks.resources import ResourceStore, default_surrogate_model
    from bdcore.cells import AttackCellSpec, load_attack_cell, run_attack_cell
    from bdcore.data import load_dataset

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if Path(args.out).suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    if args.artifact is None and (args.attack is None or args.dataset is None):
        raise UsageError("show-trigger needs --attack and --dataset, or --artifact DIR (a trained attack cell)")
    if args.artifact is not None:
        if not Path(args.artifact).is_dir():
            raise UsageError(f"--artifact {args.artifact!r}: no such folder (expected an attack cell folder, "
                             "e.g. runs/x/attacks/<cell>)")
        cell = load_attack_cell(args.artifact)
        for flag, given, saved in (("--attack", args.attack, cell.spec.attack), ("--dataset", args.dataset,
                                                                                   cell.spec.dataset)):
            if given is not None and given != saved:
                raise UsageError(f"{flag} {given!r} does not match the artifact's {saved!r}")
        attack, spec = cell.attack, cell.spec
        data = load_dataset(spec.dataset, root=args.data_root or spec.data_root)
    else:
        params = {"ratio": args.ratio, "target": args.target, "label_mode": args.label_mode, "seed": args.seed,
                  **_parse_params(args.attack_param, "--attack-param")}
        attack_config(args.attack, **params)  # validate before loading data or building resources
        data = load_dataset(args.dataset, root=args.data_root)
        if ATTACKS.get(args.attack).trigger_learned_in_training:
            # The trigger only exists once the victim is trained: train the attack cell once, cached.
            spec = AttackCellSpec(dataset=args.dataset, model=args.model or default_surrogate_model(args.dataset),
                                  attack=args.attack, ratio=args.ratio, target=args.target,
                                  label_mode=args.label_mode, seed=args.seed,
                                  attack_params={k: v for k, v in params.items()
                                                 if k not in ("ratio", "target", "label_mode", "seed")},
                                  train={} if args.epochs is None else {"epochs": args.epochs},
                                  data_root=args.data_root)
            out = Path(args.cache) / "show-trigger"
            print(f"{args.attack} learns its trigger while the victim trains: training its attack cell once "
                  f"({spec.model}, cached under {out})")
            attack = load_attack_cell(run_attack_cell(spec, out, device=args.device, data=data).path).attack
        else:
            attack = build_attack(args.attack, data.info, **params)
            attack.prepare(data.train, ResourceStore(Path(args.cache) / "resources", device=args.device))
    config = attack.config
    # Non-target test images, as in the backdoor test set.
    pool = torch.nonzero(data.test.labels != config.target).flatten() if config.label_mode == "all2one" \
        else torch.arange(len(data.test.labels))
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.seed))[: args.n]]
    clean, labels = data.test.images[pick], data.test.labels[pick]
    grid = trigger_preview(attack, clean, labels)
    atomic_write(args.out, lambda tmp: Image.fromarray(grid.numpy()).save(tmp, format="PNG"))
    test_change = mean_abs_change(clean, attack.apply_trigger(clean, labels))
    train_change = mean_abs_change(clean, attack.apply_train_trigger(clean, labels))
    print(f"{attack.name} on {data.info.name}: mean |change| per pixel {test_change:.2f}/255 (test trigger), "
          f"{train_change:.2f}/255 (training trigger) over {len(pick)} images")
    print(f"wrote {args.out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sweep.results import format_status, status_summary

    _check_sweep_folder(args.dir)
    if args.traceback is not None:
        print(_stored_traceback(args.dir, args.traceback), end="")
        return 0
    print(format_status(status_summary(args.dir)))
    return 0


def _stored_traceback(out: str, cell_id: str) -> str:
    """The traceback a failed cell's marker (DIR/cells/<id>.json) keeps."""
    import re

    from sweep.layout import SweepLayout

    layout = SweepLayout(out)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cell_id):  # an id, never a path
        raise UsageError(f"--traceback {cell_id!r}: not a cell id (letters, digits, - and _; "
                         f"`bdsweep status {out}` lists the failed cells)")
    marker = layout.read_marker(cell_id)
    if marker is None:
        raise UsageError(f"--traceback {cell_id}: no such cell in {out} (no marker {layout.marker(cell_id)}); "
                         f"`bdsweep status {out}` lists the failed cells")
    tb = marker.get("traceback")
    if not tb:
        row = marker["row"]
        raise UsageError(f"--traceback {cell_id}: its marker keeps no traceback (status {row.get('status')}"
                         f"{': ' + str(row['error']) if row.get('error') else ''})")
    return tb if tb.endswith("\n") else tb + "\n"


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def mlflow_ui_argv(out_dir: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The command `bdsweep ui` runs: MLflow's UI on the sweep's sqlite store, listening on `host`
    (this machine only unless told otherwise), started with this interpreter so the venv's mlflow runs."""
    from sweep.tracking import default_uri

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", default_uri(out_dir),
            "--host", host, "--port", str(port)]


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from sweep.layout import SweepLayout

    db = SweepLayout(args.dir).mlflow_db
    if not db.is_file():
        raise UsageError(f"{db}: no MLflow store (bdsweep run writes one there unless --mlflow-uri sent the runs "
                         "elsewhere)")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if not is_loopback(args.host):
        print(f"bdsweep: warning: the MLflow UI listens on {args.host}, not only on this machine: anyone who can "
              "reach that address can read and change the tracked runs", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"MLflow UI of {db} on http://{shown}:{args.port}  (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.run(mlflow_ui_argv(args.dir, args.host, args.port), check=False).returncode
    except KeyboardInterrupt:  # the UI got the same Ctrl-C; run() has stopped it
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdsweep", description="Backdoor attack x defense experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_cell_command, _add_sweep_commands, _add_reading_commands, _add_show_trigger_command):
        add(sub)
    return parser


def _add_cell_command(sub) -> None:
    cell = sub.add_parser("cell", help="run one attack cell and one defense cell")
    cell.add_argument("--dataset", required=True)
    cell.add_argument("--model", required=True)
    cell.add_argument("--attack", required=True)
    cell.add_argument("--ratio", type=float, required=True, help="poisoned samples / all training samples")
    cell.add_argument("--defense", required=True)
    cell.add_argument("--seed", type=int, default=0)
    cell.add_argument("--target", type=int, default=0)
    cell.add_argument("--label-mode", default="all2one", choices=["all2one", "all2all"])
    cell.add_argument("--out", default="runs", help="output folder (default: runs)")
    cell.add_argument("--data-root", default=None, help="dataset folder (default: $BDCORE_<NAME>_ROOT, $BDCORE_DATA_ROOT)")
    cell.add_argument("--pretrained", default=None, help="local weights file to start the model from")
    cell.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    cell.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="attack parameter (repeatable)")
    cell.add_argument("--defense-param", action="append", metavar="KEY=VALUE", help="defense parameter (repeatable)")
    cell.add_argument("--train", action="append", metavar="KEY=VALUE", help="training override, e.g. epochs=5")
    cell.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    cell.set_defaults(func=cmd_cell)


def _add_sweep_commands(sub) -> None:
    plan = sub.add_parser("plan", help="count a grid's attack and defense cells and what is already done")
    plan.add_argument("grid")
    plan.add_argument("--out", default="runs/sweep", help="output folder to check for finished cells")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", help="run (or resume) every unfinished cell of a grid on Ray Tune")
    run.add_argument("grid")
    run.add_argument("--out", default="runs/sweep", help="output folder (shared storage on a cluster)")
    run.add_argument("--address", default=None, help="Ray cluster: auto, ray://host:10001 (default: local Ray)")
    run.add_argument("--mlflow-uri", default=None, help="tracking server URI, or none (default: sqlite store in the output folder)")
    run.add_argument("--max-concurrent", type=int, default=None, help="cells running at once (default: CPUs)")
    run.add_argument("--retry-failed", action="store_true", help="run failed cells (and the ones they skipped) again")
    run.add_argument("--rerun", default=None, metavar="EXPR",
                     help="recompute the finished cells this --where expression selects, and the cells that depend "
                          "on them, e.g. \"attack == 'badnet' and defense == 'ft'\"")
    run.add_argument("--keep-stale", action="store_true",
                     help="keep finished cells whose code changed since they ran (default: recompute them)")
    run.add_argument("--device", default="auto")
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.add_argument("--tracking-wait", type=float, default=60.0, metavar="SECONDS",
                     help="how long to wait for another process's lock on the MLflow store (default 60)")
    run.add_argument("--executor", default=None, metavar="MODULE:FUNCTION",
                     help="what runs each cell (default: bdcore); sweep.execute:noop_cell or "
                          "sweep.execute:simulated_cell exercise the engine without training")
    run.add_argument("--executor-arg", action="append", metavar="KEY=VALUE",
                     help="keyword argument of --executor (repeatable), e.g. epoch_seconds=0.5")
    run.add_argument("--resources", action="append", metavar="STAGE.KEY=VALUE",
                     help="override the grid's per-trial resources for this run (repeatable; STAGE attack, defense "
                          "or analysis, KEY cpu or gpu), e.g. attack.gpu=0; cell ids do not change")
    run.set_defaults(func=cmd_run)


def _add_reading_commands(sub) -> None:
    results = sub.add_parser("results", help="print the results table of an output folder")
    results.add_argument("dir")
    results.add_argument("--format", default="table", choices=["table", "csv", "json", "markdown"])
    results.add_argument("--where", default=None, help="pandas query, e.g. \"attack == 'badnet' and ratio >= 0.05\"; "
                         "metrics are fractions: asr < 0.5 for 50%%")
    results.add_argument("--pivot", nargs=3, metavar=("ROWS", "COLS", "VALUE"), default=None,
                         help="matrix of VALUE, e.g. attack defense asr; a note names what several rows per cell "
                         "were aggregated over")
    results.add_argument("--agg", default=None, choices=["mean", "median", "min", "max", "count"],
                         help="how --pivot combines the rows of one cell (default: mean)")
    results.add_argument("--all", action="store_true", help="also the rows of cells no longer current (edited away, stale code), with a `current` column")
    results.set_defaults(func=cmd_results)

    query = sub.add_parser("query", help="run SQL (DuckDB) over the results of an output folder",
                           description="Tables: results (latest row per cell, analysis columns merged onto "
                                       "defense rows), cells (analysis cells as their own rows), attempts "
                                       "(every row written). No file access from the SQL.")
    query.add_argument("dir")
    query.add_argument("sql", help="e.g. \"SELECT defense, avg(asr) AS asr FROM results GROUP BY ALL\"")
    query.add_argument("--format", default="table", choices=["table", "csv", "json", "markdown"])
    query.add_argument("--all", action="store_true", help="also the rows of cells no longer current (edited away, stale code), with a `current` column")
    query.set_defaults(func=cmd_query)

    report = sub.add_parser("report", help="write an HTML report (and its Markdown twin) of an output folder")
    report.add_argument("dir")
    report.add_argument("--out", default=None, help="report folder (default DIR/report)")
    report.add_argument("--all", action="store_true", help="also the cells no longer current")
    report.set_defaults(func=cmd_report)

    prune = sub.add_parser("prune", help="move the rows, markers and artifacts of cells no longer current aside",
                           description="Cells that no recorded grid run holds current (edited params, removed "
                                       "axes, superseded code) move under DIR/pruned/<time>/; nothing is deleted.")
    prune.add_argument("dir")
    prune.add_argument("--dry-run", action="store_true", help="only list what would move")
    prune.set_defaults(func=cmd_prune)

    status = sub.add_parser("status", help="counts of finished / failed / skipped cells, with failures")
    status.add_argument("dir")
    status.add_argument("--traceback", default=None, metavar="CELL_ID",
                        help="print the traceback stored with that cell's failure (DIR/cells/CELL_ID.json)")
    status.set_defaults(func=cmd_status)

    ui = sub.add_parser("ui", help="open the MLflow UI of an output folder (listens on 127.0.0.1 by default)")
    ui.add_argument("dir")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine "
                    "only; 0.0.0.0 exposes the runs to the network)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)


def _add_show_trigger_command(sub) -> None:
    show = sub.add_parser("show-trigger", help="picture of clean / poisoned images and the amplified difference")
    show.add_argument("--attack", help="attack name (not needed with --artifact)")
    show.add_argument("--dataset", help="dataset name (not needed with --artifact)")
    show.add_argument("--artifact", default=None, help="a trained attack cell folder: show its trigger")
    show.add_argument("--out", required=True, help="PNG file to write")
    show.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    show.add_argument("--ratio", type=float, default=0.1)
    show.add_argument("--target", type=int, default=0)
    show.add_argument("--label-mode", default="all2one", choices=["all2one", "all2all"])
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="attack parameter (repeatable)")
    show.add_argument("--data-root", default=None)
    show.add_argument("--cache", default="runs", help="folder whose resources/ caches generated attack resources "
                      "(default: runs, shared with bdsweep cell)")
    show.add_argument("--device", default="auto")
    show.add_argument("--model", default=None, help="victim for attacks that learn their trigger while it trains "
                      "(default: smallcnn on digits, else preactresnet18)")
    show.add_argument("--epochs", type=int, default=None, help="training epochs for such attacks (default: the "
                      "dataset's)")
    show.set_defaults(func=cmd_show_trigger)


def _one_line(message: str) -> str:
    """An error is one line (a dataset's expected layout, for one, is written over several)."""
    return " ".join(message.split())


def _after_broken_pipe() -> int:
    """End quietly once stdout's reader has gone: stdout is pointed at /dev/null so the interpreter's
    final flush of what is still buffered cannot raise (and print a traceback) again. The exit code is
    141 = 128 + SIGPIPE, what a shell reports for `cat` in the same pipe, so `set -o pipefail` scripts
    see the output was cut, as with any other tool."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file descriptor (captured in-process): nothing to flush later
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    from bdcore.artifacts import ArtifactError
    from bdcore.data import DatasetError
    from bdcore.models import WeightsError
    from bdcore.registry import UnknownNameError
    from sweep.grid import GridError
    from sweep.tracking import TrackingStoreError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # output smaller than the pipe buffer meets a closed reader here, not at exit
        return code
    except BrokenPipeError:  # `bdsweep results DIR --format csv | head -1`: the reader has all it wants
        return _after_broken_pipe()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()
        )
        print(f"bdsweep: error: {_one_line(f'invalid {exc.title}: {problems}')}", file=sys.stderr)
    except (UsageError, GridError, UnknownNameError, DatasetError, WeightsError, ArtifactError,
            TrackingStoreError) as exc:
        print(f"bdsweep: error: {_one_line(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bdsweep: interrupted; finished cells are saved and will be reused", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
