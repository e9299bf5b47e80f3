"""The ``jinterp`` command: run experiments, generate (with intervention recipes), list models and sites,
rebuild reports."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _experiments() -> dict:
    from experiments import registry

    return registry()


def _describe_experiments() -> str:
    lines = ["experiments and their config keys (defaults):"]
    for name, experiment in sorted(_experiments().items()):
        lines.append(f"  {name}: {experiment.description}")
        for field in dataclasses.fields(experiment.config):
            help = f"  {field.metadata['help']}" if "help" in field.metadata else ""
            lines.append(f"      {field.name}={field.default!r}{help}")
    return "\n".join(lines)


def run(args) -> None:
    from jinterp import runs, sharding

    # Before anything touches a device: every process then sees every process's devices.
    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    experiment = runs.by_name(_experiments(), args.experiment)
    values = runs.read_config_file(args.config) if args.config else {}
    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    config = runs.make_config(experiment.config, values, overrides)
    out = Path(args.out or Path("runs") / experiment.name)
    runs.execute(experiment, config, out, fresh=args.fresh, quiet=args.quiet)
    if not args.quiet and sharding.is_main_process():
        print(f"Report: {out / 'report.html'}\nMetrics: {out / 'metrics.json'}")


def models(args) -> None:
    import jinterp

    for m in jinterp.named_models():
        state = "installed" if m["installed"] else "not installed"
        default = " (default)" if m["default"] else ""
        print(f"{m['name']}{default}: {m['description']} [{m['license']}; {m['package']}, {state}]")


def sites(args) -> None:
    import jinterp

    model, _ = jinterp.load(args.model, progress=True)
    for name, shape in jinterp.sites(model).items():
        print(f"{name:<40} [{', '.join(map(str, shape))}]")


def generate(args) -> None:
    import jinterp

    model, tokenizer = jinterp.load(args.model, progress=not args.quiet)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json), so a text prompt cannot be encoded")
    edits = [jinterp.load_edits(path, model, allow_other_model=args.allow_other_model) for path in args.edits]
    out = jinterp.generate(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, edits=edits)
    for prompt, text in zip(args.prompt, out.texts):
        print(prompt + text)


def report(args) -> None:
    from jinterp import runs

    info = runs.read_info(args.directory)
    runs.rebuild_report(runs.by_name(_experiments(), info.get("experiment")), args.directory)
    print(f"Report: {Path(args.directory) / 'report.html'}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="jinterp", description="JAX-native mechanistic interpretability.")
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_parser = commands.add_parser(
        "run", help="run an experiment (resumes from its checkpoints)", epilog=_describe_experiments(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run EXPERIMENT in --out (default runs/EXPERIMENT). Completed steps are checkpointed: "
                    "rerunning the same config resumes; a different config in the same directory is refused.")
    run_parser.add_argument("experiment", metavar="EXPERIMENT")
    run_parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (values read as YAML)")
    run_parser.add_argument("--model", help="registered model name, .gguf file or HF-format directory")
    run_parser.add_argument("--out", help="output directory (default runs/EXPERIMENT)")
    run_parser.add_argument("--config", help="a JSON or YAML config file (overrides apply on top)")
    run_parser.add_argument("--fresh", action="store_true", help="discard saved checkpoints and recompute")
    run_parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    several = run_parser.add_argument_group(
        "several processes (hosts)", "Run one experiment on the devices of several processes: start the same "
        "command in each, with the same coordinator and its own process id. Each option defaults to an environment "
        "variable; --coordinator auto lets jax.distributed find them on a TPU pod slice, SLURM or Open MPI.")
    several.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address ($JINTERP_COORDINATOR)")
    several.add_argument("--num-processes", type=int, metavar="N", help="how many processes ($JINTERP_NUM_PROCESSES)")
    several.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 ($JINTERP_PROCESS_ID)")
    run_parser.set_defaults(handler=run)

    models_parser = commands.add_parser("models", help="list registered models and whether they are installed")
    models_parser.set_defaults(handler=models)

    sites_parser = commands.add_parser("sites", help="list a model's sites and their shapes")
    sites_parser.add_argument("model", metavar="MODEL", help="registered model name, .gguf file or HF directory")
    sites_parser.set_defaults(handler=sites)

    generate_parser = commands.add_parser(
        "generate", help="continue prompts, optionally with a saved intervention recipe applied",
        description="Continue each PROMPT with MODEL; --edits applies recipes saved by jinterp.save_edits (a "
                    "steering vector, an ablation set) at the prompt and every new token.")
    generate_parser.add_argument("model", metavar="MODEL", help="registered model name, .gguf file or HF directory")
    generate_parser.add_argument("prompt", nargs="+", metavar="PROMPT")
    generate_parser.add_argument("--edits", action="append", default=[], metavar="RECIPE.json",
                                 help="a recipe file (repeat for several; applied in order)")
    generate_parser.add_argument("--allow-other-model", action="store_true",
                                 help="load recipes made for other weights (their fingerprint differs)")
    generate_parser.add_argument("--max-new-tokens", type=int, default=20)
    generate_parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate_parser.add_argument("--top-k", type=int)
    generate_parser.add_argument("--top-p", type=float)
    generate_parser.add_argument("--seed", type=int, default=0)
    generate_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    generate_parser.set_defaults(handler=generate)

    report_parser = commands.add_parser("report", help="rebuild a run's report from its saved results")
    report_parser.add_argument("directory", metavar="DIR")
    report_parser.set_defaults(handler=report)
    return main


def main(argv: list[str] | None = None) -> int:
    from jinterp.loading import LoadError
    from jinterp.runs import ConfigMismatch, DiskError

    cli = parser()
    # key=value overrides may come before or after options, which argparse's positionals cannot express.
    args, extra = cli.parse_known_args(argv)
    unknown = [a for a in extra if args.command != "run" or a.startswith("-") or "=" not in a]
    if unknown:
        cli.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        args.overrides = list(args.overrides) + extra
    try:
        args.handler(args)
    except (ValueError, LoadError, ConfigMismatch, FileNotFoundError, DiskError) as error:
        print(f"jinterp: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
