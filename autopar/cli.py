"""The ``autopar`` command: thin functions over the library.

    autopar plan MODEL --cluster NAME [--fix tp=8,pp=4] [--precision P] [--optimizer O]
                 [--json FILE] [--time-limit S] [--prefer-simpler-within F]
    autopar run SCRIPT.py --nproc 4 [script args]  |  autopar run MODEL --cluster local:4 --steps 20
    autopar show PLAN.json [--png FILE]
    autopar explain PLAN.json NODE [--top K]
    autopar profile [--out FILE] [--nproc N] [--repeat K]
    autopar validate PLAN.json [--cluster NAME]

MODEL is ``pkg.module:function`` or ``path/file.py:function``; the function returns
``(model, example_inputs)``. Every command takes ``--quiet`` (no progress on stderr),
``--json`` (machine-readable stdout; for ``plan`` it names the plan file, ``-`` = stdout)
and ``--debug`` (show the traceback of an error). Results go to stdout, progress and errors
to stderr. Exit codes: 0 ok, 1 error (one paragraph on stderr), 2 usage.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EXAMPLES = """examples:
  autopar plan autopar.models.gpt:gpt3_175b --cluster h100x1024 --precision bf16-mixed --json gpt3.plan.json
  autopar show gpt3.plan.json --png gpt3.png
  autopar explain gpt3.plan.json h.3.attn.c_proj
  autopar validate gpt3.plan.json --cluster h100x1024
  autopar profile --nproc 4                      # measure this machine for local:N
  autopar run train.py --nproc 4 -- --lr 3e-4    # a script using @autopar.parallelize
  autopar run autopar.models.gpt:tiny --cluster local:4 --steps 20

MODEL: pkg.module:function or path/file.py:function returning (model, example_inputs),
or a zoo name (gpt, gpt:tiny, llama:tiny ...). Exit codes: 0 ok, 1 error, 2 usage."""


class CliError(Exception):
    """An error the user can fix; printed as one paragraph, exit code 1."""


# ---------------------------------------------------------------------------------------
# shared helpers


class Progress:
    """One-line progress messages on stderr (silent with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"autopar: {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, msg: str):
        t0 = time.perf_counter()
        if not self.quiet:
            print(f"autopar: {msg} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


def load_model(spec: str) -> tuple[Any, tuple]:
    """``pkg.mod:fn`` or ``file.py:fn`` -> ``fn()`` = (model, example_inputs); a zoo name
    (``gpt``, ``gpt:tiny``, see ``autopar.models.ZOO``) builds that zoo model and size on the
    meta device (this is for planning: shapes, never weights)."""
    zoo_name, _, size = spec.partition(":")
    if zoo_name and "." not in zoo_name and os.sep not in zoo_name:
        from autopar.models import ZOO

        if zoo_name in ZOO:
            entry = ZOO[zoo_name]
            if size and size not in entry.presets:
                raise CliError(f"zoo model {zoo_name!r} has no size {size!r}; sizes: {', '.join(entry.presets)}")
            return entry.build(size or "tiny", device="meta")  # planning needs shapes, not weights
    if ":" not in spec:
        raise CliError(f"model {spec!r} is not of the form 'pkg.module:function' or 'file.py:function' "
                       f"(the function returns (model, example_inputs)), e.g. autopar.models.gpt:tiny")
    where, _, fn_name = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise CliError(f"model file {where} does not exist (from model {spec!r})")
        mod_name = f"_autopar_model_{abs(hash(str(path.resolve())))}"
        s = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(s)
        sys.path.insert(0, str(path.resolve().parent))
        try:
            s.loader.exec_module(module)
        except Exception as e:
            raise CliError(f"running model file {where} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise CliError(f"cannot import module {where!r} for model {spec!r}: {e}. Check the spelling, "
                           f"or use 'path/to/file.py:function' for a file") from None
        except Exception as e:
            raise CliError(f"importing module {where!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise CliError(f"{where} has no function {fn_name!r} (model {spec!r}); functions there: "
                       f"{', '.join(names[:20]) or 'none'}")
    try:
        out = fn()
    except Exception as e:
        raise CliError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise CliError(f"{spec}() must return (model, example_inputs); it returned {type(out).__name__}")
    model, inputs = out
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return model, inputs


def parse_cluster(name: str):
    """A cluster name (h100x8, local:4, ...) or a cluster/profile JSON file (the cluster it holds)."""
    from autopar.cost_model.cluster import Cluster

    try:
        if name.endswith(".json") or os.sep in name:
            if not os.path.isfile(name):
                raise CliError(f"cluster file {name} does not exist")
            return Cluster.from_file(name)
        return Cluster.parse(name)
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"unknown cluster {name!r}: {e}. Names look like h100x8, a100x64, h100x1024, "
                       f"graviton4x4, h100x64+graviton4x16, local:4, or a cluster JSON file") from None


def parse_fix(text: str | None) -> dict:
    """``"tp=8,pp=4,recompute=full"`` -> {"tp": 8, "pp": 4, "recompute": "full"}."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise CliError(f"--fix item {item!r} is not key=value (e.g. --fix tp=8,pp=4,microbatch_size=2)")
        v = v.strip()
        if v.lstrip("-").isdigit():
            val: Any = int(v)
        elif v.lower() in ("true", "false"):
            val = v.lower() == "true"
        else:
            try:
                val = float(v)
            except ValueError:
                val = v
        out[k.strip()] = val
    return out


def read_plan(path: str):
    from autopar.plan import Plan, PlanError

    if not os.path.exists(path):
        raise CliError(f"plan file {path} does not exist")
    try:
        return Plan.load(path)
    except PlanError as e:
        raise CliError(f"{path} is not a valid autopar plan: {e}") from None


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def default_plan_path(model_spec: str, cluster_name: str) -> str:
    fn = model_spec.rpartition(":")[2] or "model"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cluster_name)
    return f"{fn}-{safe}.plan.json"


# ---------------------------------------------------------------------------------------
# commands


def cmd_plan(args: argparse.Namespace, say: Progress) -> int:
    from autopar.show import summary

    cluster = parse_cluster(args.cluster)
    constraints = parse_fix(args.fix)
    with say.step(f"building {args.model}"):
        model, inputs = load_model(args.model)
    from autopar.graph import capture  # imports torch: after the cheap checks above

    with say.step("capturing the graph"):
        graph = capture(model, inputs)
    say(graph.summary())
    options = _solver_options(args)
    try:
        from autopar.solvers.api import solve
    except ImportError as e:
        raise CliError(f"the solver (autopar.solvers.api) cannot be imported: {e}") from None
    with say.step(f"solving for {cluster.name} ({cluster.world_size} devices)"):
        plan = solve(graph, cluster, precision=args.precision, optimizer=args.optimizer,
                     constraints=constraints, options=options, model_name=args.model)
    if args.json == "-":
        print(plan.to_json())
        return EXIT_OK
    out = args.json or default_plan_path(args.model, cluster.name)
    plan.save(out)
    print(summary(plan, graph))
    say(f"wrote {out}")
    return EXIT_OK


def _solver_options(args: argparse.Namespace):
    kw = {}
    if args.time_limit is not None:
        kw["time_limit_s"] = float(args.time_limit)
    if args.prefer_simpler_within is not None:
        kw["prefer_simpler_within"] = float(args.prefer_simpler_within)
    if not kw:
        return None
    try:
        from autopar.solvers.options import SolverOptions
    except ImportError as e:
        raise CliError(f"solver options need autopar.solvers.options: {e}") from None
    try:
        return SolverOptions(**kw)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_run(args: argparse.Namespace, say: Progress) -> int:
    target = args.target
    is_script = target.endswith(".py") and ":" not in target
    if is_script:
        if not os.path.isfile(target):
            raise CliError(f"script {target} does not exist")
        try:
            from autopar.runtime.launch import launch_script
        except ImportError as e:
            raise CliError(f"running a script needs autopar.runtime.launch, which cannot be imported: {e}") from None
        nproc = args.nproc or 1
        say(f"launching {target} on {nproc} process{'es' if nproc != 1 else ''}")
        rc = launch_script(target, nproc, list(args.script_args))
        return int(rc or 0)
    if args.script_args:
        raise CliError(f"extra arguments {args.script_args} are only passed on to a SCRIPT.py target, not "
                       f"to model {target!r}")
    cluster_name = args.cluster or f"local:{args.nproc or 1}"
    cluster = parse_cluster(cluster_name)
    if not cluster.name.startswith("local:"):
        raise CliError(f"`autopar run MODEL` starts processes on this machine, so the cluster must be "
                       f"'local:N', not {cluster.name!r}; plan for {cluster.name!r} with `autopar plan` and run a "
                       f"script with torchrun on that cluster")
    if args.nproc and args.nproc != cluster.world_size:
        raise CliError(f"--nproc {args.nproc} disagrees with cluster {cluster.name!r} of "
                       f"{cluster.world_size} devices")
    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    try:
        from autopar.runtime.launch import run_model
    except ImportError as e:
        raise CliError(f"running a model needs autopar.runtime.launch, which cannot be imported: {e}") from None
    plan = _plan_for_run(args, cluster, say)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="autopar-run-") as tmp:
        plan_path = os.path.join(tmp, "plan.json")
        report_path = os.path.join(tmp, "report.json")
        plan.save(plan_path)
        say(f"training {target} on {cluster.name} for {args.steps} steps (mesh pp={plan.mesh['pp']} "
            f"dp={plan.mesh['dp']} tp={plan.mesh['tp']})")
        with _stdout_to_stderr(args.json):  # --json: stdout carries only the JSON report
            rc = run_model(target, cluster.name, args.steps, plan=plan_path, out_json=report_path)
        if rc:
            raise CliError(f"the training job for {target} on {cluster.name} failed (exit code {rc}); the "
                           f"failing rank's error is printed above")
        if args.json:
            with open(report_path) as f:
                emit_json(json.load(f))
    return EXIT_OK


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """Point file descriptor 1 at stderr while active, so child processes' prints go there."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _plan_for_run(args: argparse.Namespace, cluster: Any, say: Progress):
    """The plan `run MODEL` trains: --plan FILE, else the plan cache, else the solver (solved
    once here, then loaded by every rank)."""
    from autopar.cache import PlanCache, plan_key
    from autopar.graph import capture

    if args.plan:
        plan = read_plan(args.plan)
        if plan.world_size != cluster.world_size:
            raise CliError(f"plan {args.plan} is for {plan.world_size} devices but cluster {cluster.name!r} has "
                           f"{cluster.world_size}")
        return plan
    with say.step(f"building {args.target}"):
        model, inputs = load_model(args.target)
    with say.step("capturing the graph"):
        graph = capture(model, inputs)
    constraints = parse_fix(args.fix)
    settings = {"precision": "fp32", "optimizer": "adam", "constraints": constraints, "options": None}
    cache = PlanCache()
    key = plan_key(graph.fingerprint(), cluster.to_json(), settings)
    plan = cache.get(key)
    if plan is not None:
        say(f"plan from cache {cache.path(key)}")
        return plan
    try:
        from autopar.solvers.api import solve
    except ImportError as e:
        raise CliError(f"the solver (autopar.solvers.api) cannot be imported: {e}; pass --plan FILE") from None
    with say.step(f"solving for {cluster.name}"):
        plan = solve(graph, cluster, precision="fp32", optimizer="adam", constraints=constraints,
                     model_name=args.target)
    try:
        cache.put(key, plan)
    except OSError:
        pass
    return plan


def cmd_show(args: argparse.Namespace, say: Progress) -> int:
    from autopar.show import PlotUnavailable, render_png, summary, summary_dict

    plan = read_plan(args.plan)
    if args.png:
        try:
            render_png(plan, args.png)
        except PlotUnavailable as e:
            raise CliError(str(e)) from None
        say(f"wrote {args.png}")
    if args.json:
        emit_json(summary_dict(plan))
    else:
        print(summary(plan))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace, say: Progress) -> int:
    from autopar.explain import ExplainError, explain, format_explanation

    plan = read_plan(args.plan)
    try:
        ex = explain(plan, args.node, top=args.top, progress=say, recapture=not args.no_recapture)
    except ExplainError as e:
        raise CliError(str(e)) from None
    if args.json:
        emit_json(ex.to_dict())
    else:
        print(format_explanation(ex))
    return EXIT_OK


def cmd_profile(args: argparse.Namespace, say: Progress) -> int:
    try:
        from autopar.cost_model.profiler import profile
    except ImportError as e:
        raise CliError(f"profiling needs autopar.cost_model.profiler: {e}") from None
    from autopar.cost_model.cluster import default_profile_path

    out = args.out or str(default_profile_path())
    if args.nproc < 1:
        raise CliError(f"--nproc must be at least 1, got {args.nproc}")
    if args.repeat < 1:
        raise CliError(f"--repeat must be at least 1, got {args.repeat}")
    cluster = profile(args.nproc, out, say, repeat=args.repeat)
    dev = cluster.groups[0].device
    link = cluster.groups[0].intra_node_link
    info = {"out": out, "cluster": cluster.name, "world_size": cluster.world_size, "device": dev.name,
            "peak_flops": dict(dev.peak_flops), "memory_bandwidth": dev.memory_bandwidth,
            "link": {"name": link.name, "bandwidth": link.bandwidth, "latency": link.latency}}
    if args.json:
        emit_json(info)
    else:
        flops = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in dev.peak_flops.items())
        print(f"profile of this machine written to {out}\n"
              f"  {cluster.name}: {cluster.world_size} x {dev.name}: {flops}; "
              f"memory bandwidth {dev.memory_bandwidth / 1e9:.1f} GB/s\n"
              f"  link {link.name}: {link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.1f} us latency")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace, say: Progress) -> int:
    from autopar.validate import validate_file

    cluster = parse_cluster(args.cluster) if args.cluster else None
    report = validate_file(args.plan, cluster)
    for w in report.warnings:
        say(f"warning: {w}")
    if args.json:
        emit_json(report.to_dict())
    elif report.ok:
        print(f"{args.plan}: valid {report.description}")
    if not report.ok:
        print(f"autopar validate: error: {args.plan} is not valid"
              + (f" for cluster {args.cluster!r}" if args.cluster else "") + ": " + "; ".join(report.errors),
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# parser and entry point


class _Parser(argparse.ArgumentParser):
    """argparse, exit code 2 on usage errors (its default), one line of help pointing further."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        print(f"{self.prog}: usage error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from autopar.plan import OPTIMIZERS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")

    p = _Parser(prog="autopar", description="Automatic parallelism for PyTorch training: plan, show, run.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"autopar {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("plan", parents=[common], help="solve a plan for a model on a cluster",
                       description="Capture MODEL, solve the fastest plan for CLUSTER, print a summary and "
                                   "write the plan JSON.")
    s.add_argument("model", metavar="MODEL", help="pkg.module:function or file.py:function returning "
                                                  "(model, example_inputs)")
    s.add_argument("--cluster", required=True, help="h100x8, a100x64, h100x1024, local:4, FILE.json, ...")
    s.add_argument("--fix", metavar="K=V,...", help="pin parts of the plan: tp=8,pp=4,microbatch_size=2,"
                                                    "recompute=full")
    s.add_argument("--precision", default="fp32", choices=("fp32", "bf16-mixed", "fp16-mixed"))
    s.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help="torch.optim.Adam / SGD(momentum=...) as built by default, or with fused=True (*_fused); "
                   "the step is priced for that implementation")
    s.add_argument("--json", metavar="FILE", help="write the plan here ('-' = stdout, no summary); "
                                                  "default MODELFN-CLUSTER.plan.json")
    s.add_argument("--time-limit", type=float, metavar="S", help="solver time limit in seconds")
    s.add_argument("--prefer-simpler-within", type=float, metavar="F",
                   help="keep a simpler plan (fewer stages, less tensor parallelism) predicted at most this "
                        "fraction slower than the fastest (default 0: always the fastest)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run", parents=[common, json_flag], help="run a script or a model on local processes",
                       description="`autopar run SCRIPT.py --nproc N [args]` starts SCRIPT on N processes "
                                   "(torchrun); `autopar run MODEL --cluster local:N --steps S` plans and "
                                   "trains MODEL for S steps. Unknown options after SCRIPT go to the script; "
                                   "so does everything after `--`.")
    s.add_argument("target", metavar="SCRIPT.py|MODEL")
    s.add_argument("--nproc", type=int, help="number of processes")
    s.add_argument("--cluster", help="cluster for a MODEL run (default local:NPROC)")
    s.add_argument("--steps", type=int, default=20, help="training steps for a MODEL run (default 20)")
    s.add_argument("--plan", metavar="PLAN.json", help="train this plan instead of solving (MODEL runs)")
    s.add_argument("--fix", metavar="K=V,...", help="pin parts of the plan (MODEL runs), as for `plan`")
    s.set_defaults(func=cmd_run, script_args=[])

    s = sub.add_parser("show", parents=[common, json_flag], help="print a plan (and draw it)")
    s.add_argument("plan", metavar="PLAN.json")
    s.add_argument("--png", metavar="FILE", help="also draw the pipeline schedule and memory per device")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("explain", parents=[common, json_flag],
                       help="why a node got its strategy: the alternatives and their predicted costs")
    s.add_argument("plan", metavar="PLAN.json")
    s.add_argument("node", metavar="NODE", help="fx node name (h_3_attn_c_proj) or module path (h.3.attn.c_proj)")
    s.add_argument("--top", type=int, default=5, help="alternatives to show (default 5)")
    s.add_argument("--no-recapture", action="store_true",
                   help="do not rebuild the model named in the plan; explain from the plan alone")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("profile", parents=[common, json_flag], help="measure this machine (local:N clusters)")
    s.add_argument("--out", metavar="FILE", help="profile JSON (default $AUTOPAR_PROFILE or "
                                                 "~/.cache/autopar/profile.json)")
    s.add_argument("--nproc", type=int, default=2, help="largest process count to measure (default 2)")
    s.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="measure K times back to back and keep each figure's median (default 1; "
                        "on a shared or noisy host 3 makes predictions far steadier, at K times the time)")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("validate", parents=[common, json_flag],
                       help="check a plan file: schema, values, and that it fits a cluster")
    s.add_argument("plan", metavar="PLAN.json")
    s.add_argument("--cluster", help="also check that the plan was made for this cluster")
    s.set_defaults(func=cmd_validate)
    return p


def _version() -> str:
    from autopar import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    script_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, script_args = argv[:i], argv[i + 1:]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command == "run" and args.target.endswith(".py"):
            script_args = unknown + script_args
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        args.script_args = script_args
    elif script_args:
        parser.error(f"arguments after '--' are only for `autopar run SCRIPT.py`: {' '.join(script_args)}")
    say = Progress(getattr(args, "quiet", False))
    try:
        return int(args.func(args, say) or 0)
    except KeyboardInterrupt:
        print("autopar: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error: one paragraph, exit 1; --debug adds the traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"autopar {args.command}: error: {_message(e)}", file=sys.stderr)
        if getattr(args, "json", None) is True:
            emit_json({"ok": False, "error": _message(e)})
        return EXIT_ERROR


def _message(e: BaseException) -> str:
    """The user-facing text of an error.

    Validation errors (ours, and ValueError, which the library raises for bad names, values
    and constraints, naming the culprit) print as their message; anything else is likely a
    bug and prints its type and a pointer to --debug.
    """
    known: tuple[type, ...] = (CliError, ValueError)
    for mod, name in (("autopar.decorator", "ParallelizeError"), ("autopar.graph", "CaptureError"),
                      ("autopar.runtime.steps", "RuntimeRefusal"), ("autopar.cache", "PlanShareError")):
        cls = getattr(sys.modules.get(mod), name, None)  # only modules this run imported
        if isinstance(cls, type):
            known += (cls,)
    text = "\n".join(line for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
    if not isinstance(e, known):
        text = f"{type(e).__name__}: {text} (run with --debug for the traceback)"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
