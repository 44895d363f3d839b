"""`idlemesh` command line: provider, bootstrap, submit, match (and `devnet`, added by the devnet package)."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import trio

DEFAULT_HOME = Path.home() / ".idlemesh"
LOG_LEVELS = ("debug", "info", "warning", "error")
from .clock import SYSTEM_CLOCK
from .output import PEER_PREFIX, print_outcomes


def _provider_config(args):
    from .config import ConfigError, load_config, overrides_from_flags

    try:
        return load_config(Path(args.home), overrides_from_flags(args))
    except ConfigError as exc:
        raise SystemExit(f"idlemesh: bad provider config: {exc}") from None


def setup_logging_from_args(args, default: str = "info") -> None:
    from .logs import setup_logging

    try:
        setup_logging(args.verbose, level=args.log_level or default, file=args.log_file, json_lines=args.log_json)
    except OSError as exc:
        raise SystemExit(f"idlemesh: cannot write the log file {args.log_file}: {exc.strerror or exc}") from None


def exit_status(signum: int) -> int:
    """130 after Ctrl-C (SIGINT), as shells expect; 0 after SIGTERM (systemd's stop)."""
    return 130 if signum == signal.SIGINT else 0


def _provider_run(args) -> int:
    from .provider import Provider

    setup_logging_from_args(args)
    config = _provider_config(args)
    return exit_status(trio.run(Provider(config).run))


def _provider_calibrate(args) -> int:
    from .calibrate import (
        DEFAULT_BATCHES, DEFAULT_MODELS, REFERENCE_MODELS, calibrate, load_profile, merge_profiles,
        reference_model_path, save_profile,
    )
    from .power import probe_meter
    from .executor import best_execution_providers

    from .identity import prepare_home

    config = _provider_config(args)
    prepare_home(config.home)  # an unwritable home fails now, not after minutes of measuring
    names = REFERENCE_MODELS if args.all_reference else DEFAULT_MODELS  # run offers DEFAULT_MODELS
    paths = config.models or [reference_model_path(name) for name in names]
    meter = probe_meter(want_gpu=best_execution_providers()[0] == "CUDAExecutionProvider") \
        if config.speed_factor == 1.0 else None
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"calibrating {len(paths)} models at batch sizes {','.join(map(str, args.batch or DEFAULT_BATCHES))}; "
        f"energy meter: {meter.source if meter else 'none readable (declared or estimated power)'}")
    profile = calibrate(paths, batches=tuple(args.batch or DEFAULT_BATCHES), meter=meter,
                        declared_idle_w=config.idle_w, declared_busy_w=config.busy_w,
                        device_name=config.device_name, speed_factor=config.speed_factor,
                        seconds_per_point=args.seconds, progress=say)
    # Keep what an earlier calibration measured of other models: never a smaller profile.
    path = save_profile(config.home, merge_profiles(load_profile(config.home), profile))
    if args.json:
        print(json.dumps({"profile": str(path), **profile.to_json()}, indent=2))
    else:
        p = profile.power
        print(f"saved {path}")
        print(f"device {profile.device_name} ({profile.execution_provider})")
        print(f"power  idle {p.idle_w:.1f} W [{p.idle_source}]  busy {p.busy_w:.1f} W [{p.busy_source}]  "
              f"marginal {p.marginal_w_per_slot:.1f} W/slot [{p.marginal_source}]")
        if p.note:
            print(f"       {p.note}")
        for m in profile.models:
            best = max(m.batches, key=lambda b: b.items_per_s)
            print(f"  {m.name:<14} {m.items_per_s:9.1f} items/s per slot at batch {m.native_batch} "
                  f"[{m.throughput_source}]; best {best.items_per_s:.1f} at batch {best.batch}")
    return 0


def _provider_status(args) -> int:
    import os

    from .provider import STATUS_NAME

    path = Path(args.home) / STATUS_NAME
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        print(json.dumps({"running": False}) if args.json else f"no provider running in {args.home}")
        return 1
    try:
        os.kill(status["pid"], 0)
        alive = True
    except (OSError, KeyError):
        alive = False
    age_s = (SYSTEM_CLOCK.now_ms() - status.get("updated_at_ms", 0)) / 1000
    status["running"] = alive
    status["status_age_s"] = round(age_s, 1)
    status.update(_ledger_activity(Path(args.home)))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if alive else 1
    if not alive:
        print(f"provider in {args.home} is not running (stale status from {age_s:.0f} s ago)")
        return 1
    state = "SELLING" if status["selling"] else f"WITHDRAWN ({status['reason']})"
    uptime_s = (SYSTEM_CLOCK.now_ms() - status.get("started_at_ms", SYSTEM_CLOCK.now_ms())) / 1000
    print(f"provider {status['peer_id']} (pid {status['pid']}): {state}, up {_duration(uptime_s)}")
    print(f"  price {status.get('price_per_s', 0):g} {status.get('price_unit', '')}; listening on "
          f"{', '.join(status.get('listen', []))}; reachable at {', '.join(status['addrs']) or 'no address yet'}")
    if status.get("reachability"):
        print(f"  reached: {status['reachability']['how']}")
    for label, figures in (("today", status.get("today")), ("in total", status.get("total"))):
        if figures:
            energy = ", ".join(f"{j:.3f} J [{src}]" for src, j in sorted(figures["energy_j"].items())) or "0 J"
            jobs = figures["jobs"]
            print(f"  {label}: {jobs.get('accepted', 0)} jobs paid, earned {figures['price']:.9g} price units, "
                  f"{figures['compute_s']:.3f} s compute, energy {energy}"
                  + (f"; {jobs['unacked']} awaiting the buyer's ack" if jobs.get("unacked") else "")
                  + (f"; {jobs['rejected']} rejected" if jobs.get("rejected") else ""))
    print(f"  jobs: {status['jobs_running']} running, {status['jobs_done']} done; slots {status['slots']}")
    print(f"  owner load {status['owner_load']:.0%} (idle-only {'on' if status['idle_only'] else 'off'}); "
          f"grid {status['carbon_g_per_kwh']:.0f} g/kWh [{status['carbon_source']}], "
          f"ceiling {status['carbon_ceiling'] if status['carbon_ceiling'] is not None else 'none'}")
    power = status.get("power") or {}
    print(f"  power: marginal {power.get('marginal_w_per_slot', 0):.1f} W/slot [{power.get('marginal_source')}], "
          f"meter {status['meter'] or 'none'}; runtime {status['execution_provider']}")
    for m in status.get("models", []):
        print(f"  model {m['name']}: {m['items_per_s']:.1f} items/s [{m['source']}]")
    if status.get("counters"):
        refused = status.get("refused") or {}
        top = ", ".join(f"{peer[:16]} {n}" for peer, n in (refused.get("top_peers") or {}).items())
        print(f"  refused inputs: {status['counters']}" + (f"; most from {top}" if top else ""))
    for buyer, owed in (status.get("buyers_owing") or {}).items():
        print(f"  buyer {buyer[:16]} owes {owed['unacked']} unacked jobs ({owed['unacked_s']:.1f} s) and had "
              f"{owed['rejected']} rejected ({owed['rejected_s']:.1f} s) today; credit {status['credit_s']:g} s")
    budget = status.get("request_budget")
    if budget:
        print(f"  requests held: {budget['held_mb']} of {budget['capacity_mb']} MiB (peak {budget['peak_mb']})")
    _print_offer_view(status.get("offer") or {}, now_ms=SYSTEM_CLOCK.now_ms())
    return 0


def _ledger_activity(home: Path) -> dict:
    """Jobs, earnings and energy today (UTC) and in total, read from the provider's ledger."""
    import datetime as dt

    from .identity import load_key
    from .ledger import Ledger

    if not (home / "ledger.sqlite").exists():
        return {}
    midnight = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    ledger = Ledger(home / "ledger.sqlite", load_key(home)[1].public_key)
    try:
        return {"today": ledger.activity(since_ms=int(midnight.timestamp() * 1000)), "total": ledger.activity()}
    finally:
        ledger.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days}d {h}h" if days else f"{h}h {m}m" if h else f"{m}m {s}s"


def _ago(ms: float) -> str:
    return f"{ms / 1000:.0f} s ago"


def _print_offer_view(offer: dict, *, now_ms: float) -> None:
    """Whether the network sees our offer: the part an operator checks first."""
    if "issued_at_ms" not in offer:
        print("  offer: not published yet")
        return
    print(f"  offer: refreshed {_ago(now_ms - offer['issued_at_ms'])}, expires in "
          f"{(offer['expires_at_ms'] - now_ms) / 1000:.0f} s (lifetime {offer['ttl_s']:g} s, refreshed every "
          f"{offer['refresh_s']:g} s); published {offer.get('published', 0)} times")
    for b in offer.get("bootstraps", []):
        if not b.get("connected"):
            line = f"unreachable ({b.get('last_error') or 'no answer'})"
        elif "checked_at_ms" not in b:
            line = "connected; not checked yet (once per offer lifetime)"
        elif b.get("error"):
            line = f"connected; last check failed: {b['error']}"
        elif b.get("offer_age_ms") is None:
            line = f"connected; holds NO offer of ours (checked {_ago(now_ms - b['checked_at_ms'])})"
        else:
            line = (f"connected; holds our offer from {b['offer_age_ms'] / 1000:.0f} s before the check "
                    f"(checked {_ago(now_ms - b['checked_at_ms'])})")
        print(f"  bootstrap {b['peer_id']}: {line}")
    mesh = offer.get("mesh_peers", [])
    print(f"  gossip: forwarded to {len(mesh)} peer(s)" + (f": {', '.join(mesh)}" if mesh else ""))
    synced = offer.get("synced_by", [])
    if synced:
        print("  last synced by: " + ", ".join(f"{s['peer_id']} ({_ago(now_ms - s['at_ms'])})" for s in synced[:5]))
    for warning in offer.get("warnings", []):
        print(f"  WARNING: {warning}")


def _provider_install_service(args) -> int:
    from .service import install_service

    try:
        path, unit, next_steps = install_service(Path(args.home).expanduser().resolve(), system=args.system,
                                                 name=args.name, out=Path(args.out) if args.out else None)
    except OSError as exc:
        raise SystemExit(f"idlemesh: cannot write the unit: {exc.strerror or exc}; try --out FILE") from None
    if args.json:
        print(json.dumps({"unit": str(path), "next": next_steps}))
    else:
        print(f"wrote {path}\nthen: {next_steps}")
    return 0


def _bootstrap_run(args) -> int:
    from .bootstrap import run_bootstrap
    from .p2p import check_peer_addr

    setup_logging_from_args(args)
    for addr in args.bootstrap or []:
        try:
            check_peer_addr(addr)
        except ValueError as exc:
            raise SystemExit(f"idlemesh: bootstrap {exc}") from None
    if args.metrics:
        from .metrics import parse_listen
        try:
            parse_listen(args.metrics)
        except ValueError as exc:
            raise SystemExit(f"idlemesh: {exc}") from None
    from .reachability import announce_problem

    for addr in args.announce or []:
        if problem := announce_problem(addr):
            raise SystemExit(f"idlemesh: {problem}")
    return exit_status(trio.run(run_bootstrap, Path(args.home), [args.listen], args.bootstrap or [], args.metrics,
                                args.announce or []))


def _model_input_names(model_path: str) -> list[str]:
    from .modelio import InputMismatch, signature_of_model

    try:
        return [port.name for port in signature_of_model(Path(model_path)).inputs]
    except InputMismatch as exc:
        raise SystemExit(f"idlemesh: cannot read {model_path} to name its inputs ({exc}); use --input NAME=X.npy")


def _parse_inputs(values: list[str], model_path: str) -> dict[str, np.ndarray]:
    inputs = {}
    for value in values:
        name, _, path = value.rpartition("=")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"idlemesh: cannot load input {path}: {exc}") from None
    if "" in inputs:
        # An unnamed --input X.npy feeds the model's only input.
        names = _model_input_names(model_path)
        if len(names) != 1 or len(inputs) != 1:
            raise SystemExit(f"idlemesh: the model takes inputs {names}: name each with --input NAME=X.npy")
        inputs = {names[0]: inputs[""]}
    return inputs


def _split_rows(sets: list[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    """Each input set cut along its leading axis into sets of `rows` rows (the last may be
    shorter; the model's batch axis is checked later, locally)."""
    if rows < 1:
        raise SystemExit("idlemesh: --rows-per-job must be at least 1")
    out = []
    for one in sets:
        lengths = {a.shape[0] if a.ndim else 0 for a in one.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise SystemExit(f"idlemesh: cannot split inputs {sorted(one)} by rows: their leading axes differ "
                             f"({sorted(lengths)}) or one is a scalar")
        n = lengths.pop()
        out += [{name: a[start:start + rows] for name, a in one.items()} for start in range(0, n, rows)]
    return out


def _load_batch(path: Path, model_path: str, rows: int | None) -> list[dict[str, np.ndarray]]:
    """--inputs: an .npz or a directory, one input set per job (see the flag's help)."""
    names = _model_input_names(model_path)

    def load(file: Path):
        try:
            return np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"idlemesh: cannot load {file}: {exc}") from None

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise SystemExit(f"idlemesh: {path} holds no .npy or .npz files")
        if {p.suffix for p in files} == {".npy"}:
            if len(names) != 1:
                raise SystemExit(f"idlemesh: the model takes inputs {names}: give a directory of .npz files, "
                                 "each with arrays named after them")
            sets = [{names[0]: load(p)} for p in files]
        elif {p.suffix for p in files} == {".npz"}:
            sets = []
            for p in files:
                with load(p) as data:
                    sets.append({k: data[k] for k in data.files})
        else:
            raise SystemExit(f"idlemesh: {path} mixes .npy and .npz files; use one kind")
    elif path.suffix == ".npz":
        with load(path) as data:
            arrays = {k: data[k] for k in data.files}
        if not arrays:
            raise SystemExit(f"idlemesh: {path} holds no arrays")
        if set(arrays) == set(names):
            sets = [arrays]  # one named input set; --rows-per-job splits it
        elif len(names) == 1:
            sets = [{names[0]: arrays[k]} for k in sorted(arrays)]  # one job per array
        else:
            raise SystemExit(f"idlemesh: {path} holds {sorted(arrays)}; the model takes inputs {names}: name "
                             "the arrays after them, or give a directory of .npz files")
    else:
        raise SystemExit(f"idlemesh: --inputs {path}: give an .npz file or a directory")
    return _split_rows(sets, rows) if rows else sets


def _submit(args) -> int:
    from .buyer import Buyer, SubmitError, SubmitSpec, resume_spec

    setup_logging_from_args(args, default="warning")  # the table and the error line say the rest
    try:
        if args.resume:
            spec = resume_spec(Path(args.home), args.bootstrap, args.resume, spot_check=args.spot_check,
                               min_reputation=args.min_reputation, job_timeout_s=args.job_timeout_s)
        else:
            if not args.model or bool(args.input) == bool(args.inputs):
                return _fail(args, "error: give MODEL and either --input or --inputs (or --resume to finish a "
                             "journalled batch)", 2)
            model = Path(args.model)
            if not model.exists():
                return _fail(args, f"error: model file {model} not found", 2)
            if args.inputs:
                inputs, job_inputs = {}, _load_batch(Path(args.inputs), args.model, args.rows_per_job)
            else:
                inputs = _parse_inputs(args.input, args.model)
                job_inputs = _split_rows([inputs], args.rows_per_job) if args.rows_per_job else None
            spec = SubmitSpec(model_path=model, inputs=inputs, job_inputs=job_inputs, count=args.count,
                              bootstrap=args.bootstrap,
                              home=Path(args.home), out_dir=Path(args.out), max_price=args.max_price,
                              solver=args.solver, spot_check=args.spot_check, min_reputation=args.min_reputation,
                              job_timeout_s=args.job_timeout_s)
        buyer = Buyer(spec)

        tally = {"settled": 0, "failed": 0}
        total = spec.count
        tty = sys.stderr.isatty()

        def progress(outcome) -> None:
            if args.events:  # one JSON line per finished job, for scripts watching a long batch
                print(json.dumps({"event": "job", **outcome.to_json()}), flush=True)
            tally["settled" if outcome.state == "settled" else "failed"] += 1
            done = tally["settled"] + tally["failed"]
            if args.json or args.events or total < 10:
                return
            # A long batch says how far it is: in place on a terminal, every tenth otherwise.
            if tty or done % max(1, total // 10) == 0 or done == total:
                start = "\r" if tty else ""
                print(f"{start}  {done}/{total} jobs done: {tally['settled']} settled, "
                      f"{tally['failed']} failed", end="" if tty and done < total else "\n", file=sys.stderr,
                      flush=True)

        try:
            outcomes, summary = trio.run(lambda: buyer.run(on_progress=progress))
        except BaseException as exc:
            if not _interrupted(exc):
                raise
            if not buyer.batch_id:
                print("interrupted before any job was sent; nothing to resume", file=sys.stderr)
            else:
                again = ["idlemesh", "submit", "--resume", buyer.batch_id, "--home", args.home]
                for addr in args.bootstrap:
                    again += ["--bootstrap", addr]
                print(f"interrupted; jobs already paid stay paid. Finish the batch with: {shlex.join(again)}",
                      file=sys.stderr)
            return 130
    except SubmitError as exc:
        return _fail(args, f"error: {exc}")
    print_outcomes(outcomes, summary, args.json)
    if all(o.state == "settled" for o in outcomes):
        return 0
    if not args.json and summary.get("batch"):
        print(f"retry what failed with: idlemesh submit --resume {summary['batch']} --home {args.home} ... ; "
              f"or drop the batch: idlemesh batches discard {summary['batch']} --home {args.home}", file=sys.stderr)
    return 1


def _batches(args) -> int:
    from .journal import Journal

    home = Path(args.home)
    if not (home / "jobs.sqlite").exists():
        raise SystemExit(f"idlemesh: no batches in {home} (use --home to point at a buyer home)")
    journal = Journal(home)
    try:
        summaries = {b["batch"]: b for b in journal.summaries()}
        action = args.action or "list"
        if action in ("show", "discard") and args.batch not in summaries:
            raise SystemExit(f"idlemesh: no batch {args.batch} in {home}")
        if action == "discard":
            journal.discard(args.batch, SYSTEM_CLOCK.now_ms())
            result = {"discarded": args.batch}
            text = f"discarded batch {args.batch}: it will not be resumed, and its stored inputs are gone"
        elif action == "prune":
            pruned = journal.prune()
            result = {"pruned": pruned}
            text = f"dropped the stored inputs of {len(pruned)} finished or discarded batches"
        elif action == "show":
            jobs = [vars(j) for j in journal.jobs(args.batch)]
            result = {**summaries[args.batch], "job_list": jobs}
            text = "\n".join([f"batch {args.batch}: {_batch_line(summaries[args.batch])}"] +
                              [f"  {j['index']:4d} {j['job_id']} {j['state']:8} {j['provider'][:PEER_PREFIX]:16} "
                               f"attempts {j['attempts']}" for j in jobs])
        else:
            result = list(summaries.values())
            text = "\n".join(f"{b['batch']}  {_batch_line(b)}" for b in result) or "no batches"
    finally:
        journal.close()
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def _batch_line(b: dict) -> str:
    state = "discarded" if b["discarded"] else "finished" if not b["unfinished"] and not b["failed"] else \
        "resumable"
    return (f"{state:9} {b['settled']}/{b['jobs']} settled, {b['failed']} failed, {b['unfinished']} unfinished; "
            f"{Path(b['model']).name}; inputs {b['inputs_bytes'] / 1e6:.1f} MB")


def _match(args) -> int:
    from matcher import problem_from_json, solve  # ProblemError is a ValueError

    try:
        problem = problem_from_json(json.loads(Path(args.problem).read_text()))
    except (OSError, ValueError) as exc:
        return _fail(args, f"error: {args.problem}: {exc}", 2)
    result = solve(problem, solver=args.solver, time_limit_s=args.time_limit, seed=args.seed,
                   clock=time.perf_counter)
    out = result.to_json()
    if not args.explain:
        out["unassigned"] = [{"job": u["job"], "reason": u["reason"]} for u in out["unassigned"]]
    print(json.dumps(out, indent=2))
    if args.explain:
        for u in result.unassigned:
            print(u.explain, file=sys.stderr)
    return 0


def _models_make(args) -> int:
    import shutil

    from .models import ARCHITECTURES, seeded_model_path

    if args.name not in ARCHITECTURES:
        raise SystemExit(f"idlemesh: unknown architecture {args.name!r}; choose one of {', '.join(ARCHITECTURES)}")
    path = seeded_model_path(args.name, args.seed)
    if args.out:
        shutil.copyfile(path, args.out)
        path = Path(args.out)
    print(json.dumps({"model": args.name, "seed": args.seed, "path": str(path)}) if args.json else path)
    return 0


def _measure_flags(ap: argparse.ArgumentParser) -> None:
    """Flags of both `provider calibrate` and `provider run`: what is measured, and how."""
    from .config import add_flags

    ap.add_argument("--home", default=str(DEFAULT_HOME / "provider"))
    add_flags(ap, measure_only=True)


def _provider_flags(run: argparse.ArgumentParser) -> None:
    """Every provider.toml key that has a flag (node/config.py defines both)."""
    from .config import add_flags

    run.add_argument("--home", default=str(DEFAULT_HOME / "provider"))
    add_flags(run)


def _open_ledger(home: str):
    from .identity import load_key
    from .ledger import Ledger

    path = Path(home) / "ledger.sqlite"
    if not path.exists():
        raise SystemExit(f"idlemesh: no ledger in {home} (use --home to point at a buyer or provider home)")
    _, key = load_key(Path(home))
    return Ledger(path, key.public_key), key


def _ledger(args) -> int:
    if args.json and not (Path(args.home) / "ledger.sqlite").exists():
        # No job yet: an empty ledger, not an error, for scripts that poll it.
        print(json.dumps({"me": None, "balances": [], "entries_sum_pico": 0, "conserved": True}, indent=2))
        return 0
    ledger, _ = _open_ledger(args.home)
    balances = ledger.balances()
    total = ledger.total_pico()
    if args.json:
        print(json.dumps({"me": ledger.me, "balances": [vars(b) for b in balances],
                          "entries_sum_pico": total, "conserved": total == 0}, indent=2))
        return 0
    print(f"ledger of {ledger.me}")
    if not balances:
        print("  no accepted receipts yet")
    for b in balances:
        side = "owes us" if b.net_price > 0 else "we owe" if b.net_price < 0 else "even"
        print(f"  {b.counterparty}  {b.receipts:5d} receipts  net {b.net_price:+.9g} price units ({side})  "
              f"{b.energy_j:.3f} J")
    print(f"  entries sum to {total} pico-units ({'conserved' if total == 0 else 'NOT CONSERVED'})")
    return 0


def _receipts(args) -> int:
    from .ledger import LedgerError

    ledger, _ = _open_ledger(args.home)
    try:
        peer = ledger.resolve_peer(args.peer) if args.peer else None
    except LedgerError as exc:
        raise SystemExit(f"idlemesh: {exc}") from None
    rows = ledger.history(counterparty=peer, limit=args.limit)
    if args.export:
        out = Path(args.export)
        out.mkdir(parents=True, exist_ok=True)
        for row in rows:
            receipt, ack = ledger.receipt_bytes(row["receipt_id"])
            (out / f"{row['receipt_id']}.receipt").write_bytes(receipt)
            if ack:
                (out / f"{row['receipt_id']}.ack").write_bytes(ack)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'receipt':<34} {'role':<8} {'counterparty':<16} {'status':<9} {'price_units':>12} {'energy_j':>10} source")
    for r in rows:
        print(f"{r['receipt_id']:<34} {r['role']:<8} {r['counterparty'][:PEER_PREFIX]:<16} {r['status']:<9} "
              f"{r['price']:12.4g} {r['energy_j']:10.4f} {r['energy_source']}" +
              (f"  ({r['reason']})" if r["reason"] else ""))
    if args.export:
        print(f"wrote {len(rows)} receipts to {args.export}")
    return 0


def _settle(args) -> int:
    from .ledger import LedgerError

    ledger, key = _open_ledger(args.home)
    reconciled = None
    try:
        args.peer = ledger.resolve_peer(args.peer)  # a prefix as printed in the tables is enough
        if args.bootstrap:
            reconciled = trio.run(_reconcile, args, ledger, key)
        signed, statement = ledger.statement(key, args.peer, now_ms=SYSTEM_CLOCK.now_ms())
    except LedgerError as exc:
        raise SystemExit(f"idlemesh: {exc}") from None
    out = Path(args.out or f"statement-{args.peer[:PEER_PREFIX]}.idm")
    out.write_bytes(signed)
    summary = {"file": str(out), "issuer": ledger.me, "counterparty": args.peer, "receipts": statement.receipts,
               "net_price": statement.net_price, "energy_j": statement.energy_j,
               "receipts_sha256": statement.receipts_sha256, "as_of_ms": statement.as_of_ms}
    if reconciled is not None:
        summary["reconciled"] = reconciled
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if reconciled is not None:
            print(_reconcile_line(args.peer, reconciled))
        print(f"signed statement written to {out}: {statement.receipts} receipts with {args.peer}, "
              f"net {statement.net_price:+.9g} ({'they owe us' if statement.net_price > 0 else 'we owe them'})")
    return 1 if reconciled is not None and (reconciled["error"] or reconciled["disagreements"]) else 0


def _reconcile_line(peer: str, r: dict) -> str:
    if r["error"]:
        return f"could not reconcile with {peer[:PEER_PREFIX]}: {r['error']}"
    line = (f"reconciled with {peer[:PEER_PREFIX]}: {r['agreed']} jobs agree ({r['sent']} acks sent)"
            + (f"; {len(r['unpaid_work'])} receipts it holds unacked were never received here" if r["unpaid_work"] else ""))
    if r["disagreements"]:
        line += f"; {len(r['disagreements'])} jobs DISAGREE: signed list in {r['disagreements_file']}"
    return line


async def _sync_bootstraps(p2p, book, bootstraps: list[str], *, want=None) -> None:
    """Fill `book` from each bootstrap's offers (matching `want`); one that does not
    answer in 10 s is a line on stderr, not a crash."""
    from protocol.errors import DecodeError

    from .gossip import OfferGossip, bootstrap_peer_id
    from .net import StreamClosed

    gossip = OfferGossip(p2p, book)
    for addr in bootstraps:
        try:
            with trio.fail_after(10):
                await p2p.connect(bootstrap_peer_id(addr), [addr])
                await gossip.sync_with(bootstrap_peer_id(addr), want=want)
        except (ValueError, StreamClosed, DecodeError, trio.TooSlowError) as exc:
            print(f"idlemesh: bootstrap {addr}: {exc}", file=sys.stderr)


async def _reconcile(args, ledger, key) -> dict:
    """Exchange with PEER what each side holds for the other (node/settle.py): find it in
    a bootstrap's offer book, deliver every ack we hold for it, compare."""
    from protocol.settlement import Disagreement, Disagreements, sign_disagreements

    from .identity import load_key
    from .ledger import LedgerWriter
    from .offers import OfferBook
    from .p2p import open_p2p_node
    from .settle import settle_with

    seed, _ = load_key(Path(args.home))
    book = OfferBook()
    async with open_p2p_node(seed, ["/ip4/127.0.0.1/tcp/0"]) as p2p:
        await _sync_bootstraps(p2p, book, args.bootstrap)
        offer = next((e.offer for e in book.current(now_ms=SYSTEM_CLOCK.now_ms()) if e.offer.peer_id == args.peer), None)
        if offer is None:
            return {"sent": 0, "agreed": 0, "disagreements": [], "unpaid_work": [],
                    "error": "no current offer of this peer at the bootstrap (is it up?)"}
        writer = LedgerWriter(ledger.path, key.public_key)
        try:
            report = (await settle_with(p2p, ledger, writer, args.peer, offer.addrs, everything=True)).to_json()
        finally:
            writer.close()
    if report["disagreements"]:
        entries = tuple(Disagreement(d["job_id"], d["ours"], d["theirs"], d["same_receipt"])
                        for d in report["disagreements"])
        signed = sign_disagreements(key, Disagreements(key.public_key, offer.provider, entries, SYSTEM_CLOCK.now_ms()))
        path = Path(args.out or f"statement-{args.peer[:PEER_PREFIX]}.idm").with_suffix(".disagreements.idm")
        path.write_bytes(signed)
        report["disagreements_file"] = str(path)
    return report


def _gateway(args) -> int:
    """The Open Inference Protocol v2 over the market, until Ctrl-C."""
    from .client import MICRO_BATCH_MS, Client, ClientError
    from .gateway import Gateway, parse_listen

    setup_logging_from_args(args, default="warning")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        return _fail(args, f"error: --listen {exc}", 2)
    specs = []
    for item in args.model:
        name, sep, path = item.partition("=")
        specs.append((name, path) if sep else (None, item))

    async def serve() -> None:
        client = Client(Path(args.home), args.bootstrap, max_price=args.max_price, solver=args.solver,
                        job_timeout_s=args.job_timeout_s, min_reputation=args.min_reputation,
                        spot_check=args.spot_check,
                        micro_batch_ms=MICRO_BATCH_MS if args.micro_batch_ms is None else args.micro_batch_ms)
        models = {}
        try:
            for name, path in specs:
                model = client.add_model(path, name)
                if model.name in models:
                    raise ClientError(f"model {model.name}: given twice")
                models[model.name] = model
        except ClientError:
            client.close()
            raise
        async with client:
            gateway = Gateway(client, models)
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(gateway.serve, host, port)
                url = f"http://{bound[0]}:{bound[1]}"
                offers = {name: gateway.offered(m) for name, m in models.items()}
                if args.json:
                    print(json.dumps({"event": "ready", "role": "gateway", "url": url, "peer_id": client.key.peer_id,
                                      "models": sorted(models), "offered": offers}), flush=True)
                for addr, why in client.unreachable.items():
                    print(f"warning: cannot reach bootstrap {addr} ({why}); retrying, and /v2/health/ready says 503 "
                          "until one answers", file=sys.stderr, flush=True)
                if not args.json:
                    print(f"gateway: Open Inference Protocol v2 at {url}/v2 for "
                          + ", ".join(f"{n} ({'offered' if ok else 'no offer yet'})" for n, ok in offers.items())
                          + "; Ctrl-C stops", flush=True)

    try:
        trio.run(serve)
    except ClientError as exc:
        return _fail(args, f"error: {exc}", 2)
    except OSError as exc:
        return _fail(args, f"error: cannot listen on {args.listen}: {exc.strerror or exc}", 2)
    except BaseException as exc:
        if _interrupted(exc):
            return 130
        raise
    return 0


def _inspect(args) -> int:
    """A model's inputs and outputs; with --bootstrap, who offers it now, at what price
    and energy per item (each figure labelled with how the provider obtained it)."""
    from .client import ClientError, Model

    path = Path(args.model)
    try:
        model = Model.from_path(path)
    except ClientError as exc:
        return _fail(args, f"error: {exc}", 2)
    sha = model.sha256
    report = {"model": str(path), "sha256": sha, **model.signature.to_json()}
    if args.bootstrap:
        report["offers"] = trio.run(_offers_of, args.bootstrap, sha)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{path.name}  sha256 {sha}")
    for kind in ("inputs", "outputs"):
        for port in report[kind]:
            shape = "x".join(str(d) if d is not None else "?" for d in port["shape"])
            print(f"  {kind[:-1]:6} {port['name']:24} {port['dtype'] or '(not carried)':9} [{shape}]")
    if "offers" in report:
        if not report["offers"]:
            print("  no provider offers it now (providers with open models may still run it)")
        for o in report["offers"]:
            print(f"  offered by {o['peer_id'][:PEER_PREFIX]} {o['device']:20} {o['items_per_s']:9.1f} items/s "
                  f"[{o['throughput_source']}]  {o['energy_j_per_item']:.4g} J/item [{o['power_source']}]  "
                  f"{o['price_per_item']:.3g} price units/item" + ("" if o["listed"] else "  (open model)"))
    return 0


async def _offers_of(bootstraps: list[str], sha: str) -> list[dict]:
    """The current offers that run model `sha`, best energy per item first."""
    import secrets

    from protocol.stream import OfferWant

    from .offers import OfferBook
    from .p2p import open_p2p_node

    book = OfferBook()
    async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as p2p:
        await _sync_bootstraps(p2p, book, bootstraps, want=OfferWant(models=(sha,)))
    out = []
    for entry in book.current(now_ms=SYSTEM_CLOCK.now_ms()):
        offer, listed = entry.offer, entry.offer.model(sha)
        rate = offer.items_per_s(sha)
        if not rate:
            continue
        out.append({"peer_id": offer.peer_id, "device": offer.device.name, "arch": offer.device.arch,
                    "items_per_s": rate, "throughput_source": listed.throughput_source if listed else "declared",
                    "energy_j_per_item": offer.power.marginal_w_per_slot / rate,
                    "power_source": offer.power.marginal_source, "price_per_item": offer.price_per_s / rate,
                    "listed": listed is not None, "available": offer.available})
    return sorted(out, key=lambda o: o["energy_j_per_item"])


def _verify(args) -> int:
    from protocol.errors import DecodeError
    from protocol.settlement import open_any
    from protocol.signing import peer_id_from_public_key


    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise SystemExit(f"idlemesh: {exc}") from None
    try:
        kind, env, message = open_any(data, now_ms=SYSTEM_CLOCK.now_ms())
    except DecodeError as exc:
        if args.json:
            print(json.dumps({"valid": False, "error": str(exc)}))
        else:
            print(f"INVALID: {exc}")
        return 1
    fields = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in message.to_wire().items()
              if not isinstance(v, (list, dict))}
    out = {"valid": True, "type": kind, "signer": peer_id_from_public_key(env.signer), "fields": fields}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"VALID {kind} signed by {out['signer']}")
        for k, v in fields.items():
            print(f"  {k}: {v}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idlemesh")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="idlemesh", description="An open marketplace for idle AI compute.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug lines, ours and the library's")
    ap.add_argument("--log-level", choices=LOG_LEVELS, help="our log lines at this level and above (default info; "
                    "warning for submit)")
    ap.add_argument("--log-file", help="append log lines to this file instead of stderr")
    ap.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    ap.add_argument("--version", action="version", version=f"idlemesh {_version()}")
    sub = ap.add_subparsers(dest="command")
    ap.set_defaults(func=lambda args: (ap.print_help(), 0)[1])  # `idlemesh` alone: help, status 0

    prov = sub.add_parser("provider", help="run a provider daemon").add_subparsers(dest="action", required=True)
    run = prov.add_parser("run", help="advertise capacity and serve jobs (settings: HOME/provider.toml, flags win)")
    _provider_flags(run)
    run.set_defaults(func=_provider_run)
    cal = prov.add_parser("calibrate", help="measure throughput and power per model; writes HOME/profile.json")
    _measure_flags(cal)
    cal.add_argument("--all-reference", action="store_true",
                     help="measure every reference architecture (9), not only the models the provider offers")
    cal.add_argument("--batch", type=int, action="append", help="batch size to measure (repeatable; default 1,4,8)")
    cal.add_argument("--seconds", type=float, default=0.5, help="seconds per measurement")
    cal.add_argument("--json", action="store_true")
    cal.set_defaults(func=_provider_calibrate)
    svc = prov.add_parser("install-service", help="write a systemd unit that runs the provider of HOME")
    svc.add_argument("--home", default=str(DEFAULT_HOME / "provider"))
    svc.add_argument("--system", action="store_true",
                     help="a system unit in /etc/systemd/system (default: a user unit in ~/.config/systemd/user)")
    svc.add_argument("--name", default="idlemesh-provider", help="unit name (default idlemesh-provider)")
    svc.add_argument("--out", help="write the unit to this file instead")
    svc.add_argument("--json", action="store_true")
    svc.set_defaults(func=_provider_install_service)
    st = prov.add_parser("status", help="what the provider in HOME is doing")
    st.add_argument("--home", default=str(DEFAULT_HOME / "provider"))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_provider_status)

    boot = sub.add_parser("bootstrap", help="run a bootstrap node").add_subparsers(dest="action", required=True)
    brun = boot.add_parser("run")
    brun.add_argument("--home", default=str(DEFAULT_HOME / "bootstrap"))
    brun.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4000")
    brun.add_argument("--bootstrap", action="append",
                      help="another bootstrap of the same network to stay connected to (repeatable)")
    brun.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics there (default off)")
    brun.add_argument("--announce", action="append", metavar="ADDR",
                      help="the address others dial this bootstrap at, e.g. /ip4/<public ip>/tcp/4000 (repeatable; "
                           "default: the listen address, with 0.0.0.0 replaced by this machine's addresses)")
    brun.set_defaults(func=_bootstrap_run)

    sm = sub.add_parser("submit", help="submit ONNX inference jobs")
    sm.add_argument("model", nargs="?", help="ONNX model file (not needed with --resume)")
    sm.add_argument("--input", action="append", help="X.npy, or NAME=X.npy for a named input: one input set, "
                    "sent --count times")
    sm.add_argument("--count", type=int, default=1, help="with --input: how many jobs run that same input "
                    "(load tests, demos, spot-check material); default 1")
    sm.add_argument("--inputs", metavar="NPZ_OR_DIR", help="different inputs, one job each: an .npz (one array per "
                    "job for a one-input model, or arrays named after the inputs), or a directory of .npy files "
                    "(one-input model) or .npz files (named inputs)")
    sm.add_argument("--rows-per-job", type=int, metavar="R", help="split each input set along its leading "
                    "(batch) axis into jobs of R rows")
    sm.add_argument("--bootstrap", action="append", required=True)
    sm.add_argument("--home", default=str(DEFAULT_HOME / "buyer"))
    sm.add_argument("--out", default="idlemesh-out")
    sm.add_argument("--max-price", type=float, default=1.0, help="price ceiling per job")
    sm.add_argument("--solver", default="optimal")
    sm.add_argument("--json", action="store_true")
    sm.add_argument("--events", action="store_true", help="print a JSON line as each job finishes")
    sm.add_argument("--job-timeout-s", type=float, default=120.0, metavar="S",
                    help="give up on a provider that sends nothing for this long and try another (default 120)")
    sm.add_argument("--spot-check", type=float, default=0.0, metavar="FRACTION",
                    help="re-run this fraction of jobs on a second provider and compare outputs (default 0)")
    sm.add_argument("--min-reputation", type=float, default=0.25,
                    help="skip providers whose reputation score is below this (new providers score 0.5)")
    sm.add_argument("--resume", nargs="?", const="latest", metavar="BATCH",
                    help="finish the latest unfinished batch in --home (or BATCH) after a crash")
    sm.set_defaults(func=_submit)

    bt = sub.add_parser("batches", help="journalled batches: list, show, discard, prune stored inputs")
    bt.add_argument("--home", default=str(DEFAULT_HOME / "buyer"))
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=_batches, action=None)
    # --home and --json also after the action; SUPPRESS keeps a value given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--home", default=argparse.SUPPRESS)
    after.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    bta = bt.add_subparsers(dest="action")
    bta.add_parser("list", help="every batch, newest first (the default)", parents=[after])
    for name, text in (("show", "the jobs of one batch"), ("discard", "never resume it; drop its stored inputs")):
        one = bta.add_parser(name, help=text, parents=[after])
        one.add_argument("batch")
    bta.add_parser("prune", help="drop the stored inputs of finished and discarded batches", parents=[after])

    lg = sub.add_parser("ledger", help="balances per counterparty, from this node's ledger")
    lg.add_argument("--home", default=str(DEFAULT_HOME / "buyer"))
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=_ledger)
    rc = sub.add_parser("receipts", help="receipt history")
    rc.add_argument("--home", default=str(DEFAULT_HOME / "buyer"))
    rc.add_argument("--peer", help="only receipts with this peer (its id, or a unique prefix as tables print it)")
    rc.add_argument("--limit", type=int, default=100)
    rc.add_argument("--export", help="also write each signed receipt (and ack) to this directory")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=_receipts)
    se = sub.add_parser("settle", help="reconcile with PEER (--bootstrap) and write a signed statement of the "
                                       "netted balance")
    se.add_argument("peer", help="peer id, or a unique prefix as tables print it")
    se.add_argument("--home", default=str(DEFAULT_HOME / "buyer"))
    se.add_argument("--out", help="file for the signed statement (default statement-<peer>.idm)")
    se.add_argument("--bootstrap", action="append",
                    help="first reconcile with PEER, found through this bootstrap: deliver every ack, compare "
                         "what both ledgers hold, and sign the list of jobs they disagree on (repeatable)")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=_settle)
    gw = sub.add_parser("gateway", help="serve the Open Inference Protocol v2 (KServe v2) REST API over the market")
    gw.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT")
    gw.add_argument("--model", action="append", required=True, metavar="NAME=PATH.onnx",
                    help="a model to serve under NAME (default: the file's stem); repeat for more")
    gw.add_argument("--bootstrap", action="append", required=True)
    gw.add_argument("--home", default=str(DEFAULT_HOME / "gateway"), help="the gateway's buyer identity, ledger, journal")
    gw.add_argument("--max-price", type=float, default=1.0, help="price ceiling per job (a request's "
                    "parameters.idlemesh_max_price may lower it)")
    gw.add_argument("--solver", default="optimal")
    gw.add_argument("--job-timeout-s", type=float, default=120.0, metavar="S")
    gw.add_argument("--min-reputation", type=float, default=0.25)
    gw.add_argument("--spot-check", type=float, default=0.0, metavar="FRACTION",
                    help="re-run this fraction of requests on a second provider after answering, and compare")
    gw.add_argument("--micro-batch-ms", type=float, default=None, metavar="MS",
                    help="how long a request may wait for concurrent ones of its model to share one job, where "
                         "an offer batches and its deadline leaves room (default 20; 0: never)")
    gw.add_argument("--json", action="store_true", help="print the ready line as JSON")
    gw.set_defaults(func=_gateway)
    ins = sub.add_parser("inspect", help="a model's inputs and outputs, and (with --bootstrap) who offers it now")
    ins.add_argument("model")
    ins.add_argument("--bootstrap", action="append", help="ask this bootstrap which providers offer the model")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_inspect)
    vf = sub.add_parser("verify", help="check a signed receipt, ack, statement, dispute or offer offline")
    vf.add_argument("file")
    vf.add_argument("--json", action="store_true")
    vf.set_defaults(func=_verify)

    mt = sub.add_parser("match", help="solve a placement problem file and print JSON")
    mt.add_argument("problem")
    mt.add_argument("--solver", default="optimal", choices=["optimal", "greedy-price", "greedy-energy", "round-robin"])
    mt.add_argument("--time-limit", type=float, default=2.0)
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--explain", action="store_true")
    mt.set_defaults(func=_match)

    md = sub.add_parser("models", help="reference models with seeded random weights, for tests and demos")
    mdm = md.add_subparsers(dest="action", required=True).add_parser(
        "make", help="write (once, then from the cache) an architecture with seeded random weights; prints its path")
    mdm.add_argument("name", help="squeezenet, shufflenet, resnet50, bvlc_alexnet, zfnet512 or vgg19")
    mdm.add_argument("--seed", type=int, default=0)
    mdm.add_argument("--out", help="also copy it to this file")
    mdm.add_argument("--json", action="store_true")
    mdm.set_defaults(func=_models_make)
    _add_plugin_commands(sub)

    return ap


def _add_plugin_commands(sub) -> None:
    """Commands other packages add (`devnet`): found by entry point, so node/ never
    imports the packages built on it."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="idlemesh.commands"), key=lambda e: e.name):
        entry.load()(sub)


def main(argv: list[str] | None = None) -> int:
    from .identity import HomeError
    from .p2p import ListenError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (HomeError, ListenError) as exc:
        return _fail(args, f"idlemesh: {exc}")
    except SystemExit as exc:
        if isinstance(exc.code, str):  # our one-line errors
            return _fail(args, exc.code)
        raise
    except BaseException as exc:
        if _interrupted(exc):
            print("idlemesh: interrupted", file=sys.stderr)
            return 130
        if args.verbose or not isinstance(exc, Exception):
            raise
        # A bug of ours, not the user's: one line, and the traceback with -v. A nursery's
        # group of one says nothing itself: name what is inside.
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        return _fail(args, f"idlemesh: unexpected error: {type(exc).__name__}: {exc} "
                           f"(run again with -v for the traceback, and report it)")


def _fail(args, message: str, status: int = 1) -> int:
    """One line on stderr; with --json also {"error": ...} on stdout, for scripts."""
    print(message, file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message.removeprefix("idlemesh: ").removeprefix("error: ")}))
    return status


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, also when trio delivers it inside an exception group from a nursery."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda e: isinstance(e, KeyboardInterrupt)) is not None
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    sys.exit(main())
