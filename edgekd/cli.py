"""The `edgekd` command line (click). Heavy modules are imported inside commands, so `edgekd bench` and
`edgekd check` never import torch.

Exit codes: 0 ok · 1 budgets breached / regression · 2 bad input · 3 a stage failed at run time ·
4 `compare` inconclusive (measurement noise larger than the threshold) · 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgekd.version import __version__
from edgekd.errors import EdgekdError
from edgekd.runner.contract import STAGES


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn edgekd's exceptions into one clear line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EdgekdError as exc:
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except ValueError as exc:  # the torch-free runtime's RuntimeInputError (a ValueError): bad input, exit 2
            from edgekd.runtime.errors import RuntimeInputError

            if not isinstance(exc, RuntimeInputError):
                raise
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as exc:  # a path the checks could not foresee (a disk filling up, a folder vanishing)
            click.echo(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"{exc}", err=True)
            sys.exit(2)

    return wrapper


# What each pipeline command imports first; `pip install edgekd` (the runtime) has none of them.
_PIPELINE_MODULES = {
    "run": ("torch", "torchvision", "onnx", "torch_pruning", "yaml"),
    "models": ("torch",),
    "report": ("yaml",),
}


def _require_pipeline(command: str) -> None:
    """One line naming the extra to install, instead of a ModuleNotFoundError traceback."""
    from importlib.util import find_spec

    from edgekd.errors import InputError

    missing = [name for name in _PIPELINE_MODULES[command] if find_spec(name) is None]
    if missing:
        raise InputError(f"edgekd {command} needs the pipeline extra ({', '.join(missing)} not installed): "
                         f'pip install "edgekd[pipeline]"')


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """-v / -q, on the group (`edgekd -q run ...`) or on `run` itself: logs go to stderr at that level."""
    if value:
        from edgekd.console import configure_console_logging

        root = ctx.find_root()
        root.meta["edgekd.verbosity"] = verbosity = root.meta.get("edgekd.verbosity", 0) + (
            value if param.name == "verbose" else -value)
        configure_console_logging(verbosity, _main_rank())
    return value


def _main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks at INFO


def _verbosity_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("-q", "--quiet", count=True, expose_value=False, callback=_set_verbosity,
                           help="Less output: warnings and errors only.")(command)
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity,
                        help="More output: debug messages too.")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekd")
@_verbosity_options
def main() -> None:
    """edgekd: teacher -> distilled student -> pruned -> int8 ONNX, benchmarked and budget-checked.

    Logs go to stderr (-v more, -q less); results (tables, verdicts) to stdout.
    """
    from edgekd.console import configure_console_logging

    ctx = click.get_current_context()
    configure_console_logging(ctx.meta.get("edgekd.verbosity", 0), _main_rank())


@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "from_stage", type=click.Choice(STAGES), help="Rerun this stage and every stage after it.")
@click.option("--force", multiple=True, type=click.Choice(STAGES), help="Rerun this stage even if it is up to date (repeatable).")
@click.option("--only", multiple=True, type=click.Choice(STAGES), help="Run only these stages (repeatable); earlier ones must be up to date.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: output_dir from the config).")
@click.option("--device", help="Override the config's device: auto, cpu, cuda, cuda:N.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the budget verdicts as JUnit XML (one error case when a stage fails).")
@click.option("--set", "set_items", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a config key (repeatable), e.g. --set distill.epochs=2; validated like the file and "
                   "recorded in the run's resolved-config.yaml.")
@_verbosity_options
@reports_errors
def run(config: Path, from_stage: str | None, force: tuple[str, ...], only: tuple[str, ...], output_dir: Path | None,
        device: str | None, junit: Path | None, set_items: tuple[str, ...]) -> None:
    """Run the pipeline in CONFIG (a pipeline.yaml); stages that are up to date are skipped.

    Exits 0 when every budget is met, 1 when a budget is breached, 2 on bad input, 3 when a stage fails.
    Everything that can be checked without training (the config, the models it names, the output paths) is
    checked before anything is written.
    """
    _require_pipeline("run")
    from edgekd.config import load_config, parse_set_options
    from edgekd.paths import check_output_file
    from edgekd.runner.launch import launch
    from edgekd.runner.preflight import check_run
    from edgekd.train import distributed

    distributed.check_environment()
    overrides = parse_set_options(set_items)
    if device is not None:
        overrides["device"] = device
    cfg = load_config(config, overrides)  # --set and --device go through the same validation as the file
    if junit is not None:
        check_output_file(junit, "--junit")
    if output_dir is not None:
        cfg.output_dir = output_dir.resolve()
    # Everything that can be checked without training, before anything is written.
    check_run(cfg, config.name, output_key="--output-dir" if output_dir is not None else "output_dir",
              rerun=bool(from_stage or force))
    try:
        outcome = launch(cfg, only=list(only), from_stage=from_stage, force=list(force), output_dir=output_dir,
                         device=device)
    except EdgekdError as exc:
        if junit is not None and distributed.is_main():  # CI reads the failure from the JUnit file too
            from edgekd.gate.junit import write_junit_for_failure
            from edgekd.runner.preflight import failed_stage

            write_junit_for_failure(junit, failed_stage(cfg), str(exc))
        raise
    if outcome is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    if junit is not None:
        from edgekd.gate.junit import write_junit_for_report

        write_junit_for_report(outcome.run_dir / "report.json", junit)
    if not outcome.budgets_passed:
        for budget in outcome.manifest.metrics("report").get("budgets", []):
            if not budget.get("passed"):
                click.echo(f"budget breached: {budget.get('message')}", err=True)
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default="pipeline.yaml")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@reports_errors
def init(path: Path, force: bool) -> None:
    """Write a commented starter pipeline.yaml (bundled MNIST sample; runs as is, offline), and beside it
    pipeline.schema.json, which its `# yaml-language-server: $schema=` comment points editors to."""
    from importlib.resources import files

    from edgekd import atomic
    from edgekd.errors import InputError
    from edgekd.paths import check_output_file
    from edgekd.schema import FILES, render

    if path.exists() and not force:
        raise InputError(f"{path}: already exists (use --force to overwrite)")
    check_output_file(path, "PATH")
    atomic.write_text(path, files("edgekd").joinpath("templates/pipeline.yaml").read_text(encoding="utf-8"))
    schema = path.parent / FILES["config"]
    atomic.write_text(schema, render("config"))  # the one this edgekd validates with: refreshed on every init
    click.echo(f"wrote {path} (and {schema} for editors); run it with: edgekd run {path}")


@main.command()
@click.argument("name", type=click.Choice(["config", "report", "device", "arm-check", "bench"]))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file instead of stdout.")
@reports_errors
def schema(name: str, output: Path | None) -> None:
    """Print the JSON Schema of pipeline.yaml (config), report.json, device.json, arm_check.json or
    `edgekd bench --json` output: the contract other tools can rely on."""
    from edgekd.schema import render

    text = render(name)
    if output is None:
        click.echo(text, nl=False)
        return
    from edgekd import atomic

    atomic.write_text(output, text)
    click.echo(f"wrote {output}", err=True)


@main.command()
@reports_errors
def models() -> None:
    """List the model names that teacher.model / student.model accept."""
    _require_pipeline("models")
    import inspect

    from edgekd.models import available_models
    from edgekd.models.cnn import CNN_PRESETS, EdgeCNN

    supplied = {"self", "num_classes", "in_channels", "input_size"}  # edgekd passes these from the data
    options = [f"{p.name}={p.default!r}" for p in inspect.signature(EdgeCNN.__init__).parameters.values()
               if p.name not in supplied]
    for name in available_models():
        preset = CNN_PRESETS.get(name)
        detail = preset if preset else ("model_kwargs: " + ", ".join(options) if name == "cnn" else "")
        click.echo(f"{name:24s} {detail}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="Eval .npz (inputs, labels[, teacher_predictions]): real inputs, plus accuracy and agreement.")
@click.option("--threads", multiple=True, type=click.IntRange(min=1), help="Intra-op thread count (repeatable; default 1).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), help="Batch size (repeatable; default 1).")
@click.option("--providers", multiple=True,
              help="Execution providers in priority order: cpu, xnnpack, ... or full ORT names (repeatable or comma-separated).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the full result as JSON.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True, help="Warm-up runs per setting.")
@click.option("--iterations", type=click.IntRange(min=1), default=200, show_default=True, help="Timed runs per setting.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory probe (a fresh process per model).")
@click.option("--no-mobile", is_flag=True, help="Skip the mobile-readiness checks (operator list, ORT mobile usability).")
@click.option("--profile", "profile_runs", type=click.IntRange(min=1), default=None, is_flag=False, flag_value=50,
              help="Also profile per node and op type with ONNX Runtime's profiler (first thread count, smallest "
                   "batch; N timed runs after the warm-up, default 50).")
@reports_errors
def bench(model: Path, data: Path | None, threads: tuple[int, ...], batches: tuple[int, ...], providers: tuple[str, ...],
          json_out: Path | None, warmup: int, iterations: int, no_memory: bool, no_mobile: bool,
          profile_runs: int | None) -> None:
    """Benchmark one ONNX MODEL with ONNX Runtime: latency per threads x batch, accuracy, memory, mobile readiness.

    A .tflite MODEL runs on LiteRT instead (needs ai-edge-litert: pip install "edgekd[litert]"; int8 input and
    output are quantized and dequantized with the model's own parameters; no mobile-readiness checks).
    Needs only numpy + onnxruntime (torch is never imported). Exits 0 on success, 2 on bad input
    (not an ONNX model, --data that does not fit the model, an unknown provider).
    """
    from edgekd.runtime.bench import bench_model, format_table

    if json_out is not None:
        from edgekd.paths import check_output_file

        check_output_file(json_out, "--json")
    chosen = [name.strip() for item in providers for name in item.split(",") if name.strip()]
    result = bench_model(model, data, threads=threads or (1,), batches=batches or (1,), providers=chosen or None,
                         warmup=warmup, iterations=iterations, mobile=not no_mobile, memory=not no_memory,
                         profile_runs=profile_runs, progress=lambda message: click.echo(message, err=True))  # stdout stays the table
    click.echo(format_table(result))
    if json_out is not None:
        from edgekd import atomic

        atomic.write_json(json_out, result)
        click.echo(f"wrote {json_out}", err=True)


# --------------------------------------------------------------------------------------------------
# Reports, budgets and comparisons (torch-free: check and compare run on a bare CI runner)

_BUDGET_FLAGS = ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "size_kb", "min_accuracy", "max_accuracy_drop",
                 "min_speedup")


def _budget_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(_BUDGET_FLAGS):
        command = click.option(f"--{name.replace('_', '-')}", name, type=float, default=None,
                               help=f"Budget {name} (overrides the report's / the file's).")(command)
    return command


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merge", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A device.json written by run_on_device.py, merged into the report (repeatable; kept in RUN_DIR/devices/).")
@reports_errors
def report(run_dir: Path, merge: tuple[Path, ...]) -> None:
    """Re-render RUN_DIR's report (report.json/.md/.html, plots, deploy/) from its manifest; nothing is rerun.

    Exits 0 when every budget is met, 1 when one is breached, 2 on bad input.
    """
    _require_pipeline("report")
    from edgekd.gate.budgets import verdict_lines
    from edgekd.report.render import render_run_dir

    result = render_run_dir(run_dir, list(merge))
    for line in verdict_lines(result["budgets"]):
        click.echo(line)
    deployed = result["deployed"]
    click.echo(f"deployed: {deployed['artifact']} -> {run_dir / deployed['path']} ({deployed.get('rule') or deployed['reason']})")
    click.echo(f"wrote {run_dir / 'report.md'}" + (f" and {run_dir / 'report.html'}" if (run_dir / "report.html").exists() else ""))
    if not result["budgets_passed"]:
        sys.exit(1)


@main.command()
@click.argument("report_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--budgets", "budgets_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Budgets file (JSON/YAML mapping, or a pipeline.yaml): replaces the budgets stored in the report.")
@_budget_options
@click.option("--threads", "latency_threads", type=int, help="Thread count at which latency budgets apply.")
@click.option("--batch", "latency_batch", type=int, help="Batch size at which latency budgets apply.")
@click.option("--artifact", help="Check this artifact instead of the deployed one.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Also write the verdicts as JUnit XML.")
@reports_errors
def check(report_json: Path, budgets_file: Path | None, artifact: str | None, junit: Path | None, **flags: Any) -> None:
    """Re-evaluate budgets on an existing REPORT_JSON (nothing is measured again).

    Budgets: the report's own, replaced by --budgets FILE, then overridden by the flags.
    Exits 0 when every budget is met, 1 when one is breached, 2 on bad input.
    """
    from edgekd.gate.budgets import (budgets_of_report, evaluate_report, load_budgets_file, load_report,
                                     normalize_budgets, verdict_lines)

    if junit is not None:
        from edgekd.paths import check_output_file

        check_output_file(junit, "--junit")
    data = load_report(report_json)
    budgets = load_budgets_file(budgets_file) if budgets_file else budgets_of_report(data)
    overrides = {k: v for k, v in flags.items() if v is not None}
    budgets = normalize_budgets({**budgets, **overrides}, "budgets")
    verdicts = evaluate_report(data, budgets, artifact)
    if junit is not None:
        from edgekd.gate.junit import budget_cases, write_junit

        write_junit(junit, "edgekd.check", budget_cases(verdicts, "edgekd.check"))
    if not verdicts:
        click.echo("no budgets set: nothing to check")
    for line in verdict_lines(verdicts):
        click.echo(line)
    if not all(v["passed"] for v in verdicts):
        sys.exit(1)


@main.command()
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-latency-regression", default="10%", show_default=True, help="Largest accepted slowdown (10% or 0.1).")
@click.option("--max-accuracy-drop", default=None, help="Largest accepted accuracy drop (0.005 or 0.5%).")
@click.option("--max-size-increase", default=None, help="Largest accepted file-size growth (5% or 0.05).")
@click.option("--latency-mode", type=click.Choice(["auto", "absolute", "relative"]), default="auto", show_default=True,
              help="absolute ms, or relative to the teacher of the same run (robust to slower/noisier runners); "
                   "auto = absolute on the same environment, relative otherwise.")
@click.option("--percentile", type=click.Choice(["p50", "p90", "p99"]), default="p50", show_default=True)
@click.option("--allow-env-mismatch", is_flag=True, help="Gate absolute latency even when the environments differ.")
@click.option("--all-artifacts", is_flag=True, help="Gate every artifact, not only the deployed one.")
@click.option("--noise-floor", default="0%", show_default=True,
              help="Assume at least this much run-to-run noise (e.g. 5% on shared CI runners).")
@click.option("--threads", type=int, help="Thread count compared (default: the budget's).")
@click.option("--batch", type=int, help="Batch size compared (default: the budget's).")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Also write the verdicts as JUnit XML.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the comparison as JSON.")
@reports_errors
def compare(base: Path, new: Path, max_latency_regression: str, max_accuracy_drop: str | None,
            max_size_increase: str | None, latency_mode: str, percentile: str, allow_env_mismatch: bool,
            all_artifacts: bool, noise_floor: str, threads: int | None, batch: int | None, junit: Path | None,
            json_out: Path | None) -> None:
    """Compare NEW report.json with BASE: latency, accuracy and size of the deployed artifact.

    Exits 0 when nothing regressed, 1 on a regression, 4 when inconclusive (the measurements' noise is
    larger than the threshold: rerun on a quieter machine or with more iterations), 2 on bad input.
    """
    from edgekd.gate.budgets import load_report
    from edgekd.gate.compare import compare_reports, format_comparison, parse_fraction
    from edgekd.paths import check_output_file

    for option, path in (("--junit", junit), ("--json", json_out)):
        if path is not None:
            check_output_file(path, option)
    result = compare_reports(
        load_report(base), load_report(new), max_latency_regression=parse_fraction(max_latency_regression, "--max-latency-regression"),
        max_accuracy_drop=parse_fraction(max_accuracy_drop, "--max-accuracy-drop"),
        max_size_increase=parse_fraction(max_size_increase, "--max-size-increase"), latency_mode=latency_mode,
        percentile=percentile, allow_env_mismatch=allow_env_mismatch, threads=threads, batch=batch,
        all_artifacts=all_artifacts, noise_floor=parse_fraction(noise_floor, "--noise-floor") or 0.0)
    for warning in result["warnings"]:
        click.echo(("!" * 78 + "\n" if warning.startswith("WARNING") else "") + warning, err=True)
    click.echo(format_comparison(result))
    if junit is not None:
        from edgekd.gate.junit import write_junit

        status = {"ok": "passed", "regression": "failed", "inconclusive": "skipped"}
        cases = [{"name": f"{r['artifact']} {r['metric']}", "classname": "edgekd.compare", "status": status[r["verdict"]],
                  "message": f"base {r['base']} new {r['new']} change {r['change']} limit {r['threshold']} noise {r['noise']}"
                  + (f" ({r['note']})" if r.get("note") else "")} for r in result["rows"] if r["gated"]]
        write_junit(junit, "edgekd.compare", cases)
    if json_out is not None:
        from edgekd import atomic

        atomic.write_json(json_out, result)
    sys.exit(result["exit_code"])


@main.command("arm-check")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--samples", type=click.IntRange(min=1), help="Check only the first N evaluation samples (default: all).")
@click.option("--cpu", help="qemu CPU model to emulate, e.g. cortex-a72 (Raspberry Pi 4), cortex-a76 (default: qemu's max).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Cache for qemu, the arm64 sysroot and wheels (default: $EDGEKD_ARM_CACHE or ~/.cache/edgekd/arm64).")
@click.option("--skip-unavailable", is_flag=True, help="Exit 0 with a message when emulation cannot be set up here.")
@reports_errors
def arm_check_command(run_dir: Path, samples: int | None, cpu: str | None, cache_dir: Path | None,
                      skip_unavailable: bool) -> None:
    """Run RUN_DIR's deploy bundle on aarch64 ONNX Runtime under qemu user-mode emulation and compare its
    logits with x86 onnxruntime; writes RUN_DIR/arm_check.json (shown by `edgekd report`).

    Correctness only: nothing timed under emulation is device speed. The first run downloads ~100 MB
    (qemu, a Debian arm64 Python, aarch64 numpy/onnxruntime wheels) into the cache; no root needed.
    Exits 0 when aarch64 agrees with x86, 1 when it does not (or the bundle's run_on_device.py fails under
    emulation), 2 on bad input, 3 when emulation cannot be set up here (0 with --skip-unavailable).
    """
    from edgekd.gate.armcheck import ArmUnavailable, arm_check, summary

    try:
        result = arm_check(run_dir, cache_dir=cache_dir, samples=samples, cpu=cpu)
    except ArmUnavailable as exc:
        if not skip_unavailable:
            raise
        click.echo(f"arm-check skipped: {exc.reason}", err=True)
        return
    click.echo(summary(result))
    if result["status"] != "passed":
        sys.exit(1)


if __name__ == "__main__":
    main()
