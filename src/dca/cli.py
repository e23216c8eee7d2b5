"""The `dca` command line. Each subcommand's options are generated from its dataclass of arguments,
so the Python API and the command line never disagree. dca's own errors (`dca.errors`) are printed as
one line -- a bad argument as its option, with exit code 2 -- and anything else keeps its traceback,
because it is a bug. Every subcommand also takes ``--config FILE``: its arguments as JSON (a run's
``args.json``), which the options typed beside it override."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from dca.checks import literal_choices, read_json_file
from dca.errors import ArgumentError, DCAError


def _field_type(annotation: Any) -> tuple[Any, bool]:
    """(base type, is_list) for annotations like int, str | None, list[str]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:  # its values are the option's choices (`literal_choices`)
        return type(typing.get_args(annotation)[0]), False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _field_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, nested: bool = False) -> None:
    """One option per field; the fields of a nested dataclass (e.g. a CoprocessorConfig) join in a group.

    A nested dataclass's options are left out of the namespace unless given, so that a ``--preset`` of
    the outer arguments can supply their values and only the options typed override it.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_arguments(parser.add_argument_group(hints[f.name].__name__), hints[f.name], nested=True)
            continue
        base, is_list = _field_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        value = argparse.SUPPRESS if nested else default
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=value,
                                help=help_text)
        else:
            # a "repeatable" list gathers every use of its option (`--prompt A --prompt B`), not just the last
            parser.add_argument(flag, dest=f.name, type=base, nargs="+" if is_list else None, default=value,
                                action="extend" if f.metadata.get("repeatable") else "store",
                                choices=literal_choices(hints[f.name]), help=help_text)


def dataclass_from_namespace(cls: type, namespace: argparse.Namespace, nested: bool = False) -> Any:
    hints = typing.get_type_hints(cls)
    values = {f.name: dataclass_from_namespace(hints[f.name], namespace, nested=True)
              if dataclasses.is_dataclass(hints[f.name]) else getattr(namespace, f.name)
              for f in dataclasses.fields(cls) if not nested or hasattr(namespace, f.name)}
    preset = getattr(namespace, "preset", None)
    if nested and preset is not None and hasattr(cls, "preset"):  # e.g. CoprocessorConfig.preset("paper", ...)
        return cls.preset(preset, **values)
    return cls(**values)


def config_defaults(cls: type, path: str, command: str) -> dict[str, Any]:
    """The arguments of `cls` in the JSON file at `path`, keyed like the options (a nested dataclass, e.g. the
    CoprocessorConfig of a run's args.json, by its own field names), checked before anything runs."""
    data = read_json_file("config", path, "a JSON file of arguments")
    if not isinstance(data, dict):
        raise ArgumentError("config", f"{path} must hold a JSON object of arguments, not {type(data).__name__}")
    return _flatten(cls, data, path, command)


def _flatten(cls: type, data: dict[str, Any], path: str, command: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ArgumentError("config", f"{path}: {', '.join(unknown)} not among the arguments of dca {command}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        nested = hints[name]
        if not dataclasses.is_dataclass(nested):
            values[name] = value
            continue
        if not isinstance(value, dict):
            raise ArgumentError("config", f"{path}: {name} must be a JSON object of its fields")
        try:  # a saved config's own reader (CoprocessorConfig.from_dict knows its older files) checks the fields
            value = nested.from_dict(value).to_dict() if hasattr(nested, "from_dict") else value
        except (ArgumentError, ValueError, TypeError) as err:
            raise ArgumentError("config", f"{path}: {name}: {err}") from None
        values.update(_flatten(nested, value, path, command))
    return values


def invoked_command(command: str, args: Any) -> str:
    """The command line that reproduces a run of `dca COMMAND` (for its report), or the arguments' repr when it was
    called from Python."""
    words = command.split()
    if sys.argv[1:1 + len(words)] == words:
        return " ".join(["dca", command, shlex.join(sys.argv[1 + len(words):])]).strip()
    return repr(dataclasses.asdict(args))


def _typed(argv: list[str], option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in argv)


def _commands() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    from dca.eval.compare import CompareArgs, run_compare
    from dca.eval.eval_suite import EvalArgs, run_eval
    from dca.serve.bench import BenchServeArgs, run_bench_serve
    from dca.serve.generate import GenerateArgs, run_generate
    from dca.serve.server import ServeArgs, run_serve
    from dca.serve.store_cli import CacheBenchArgs, CacheBuildArgs, run_cache_bench, run_cache_build
    from dca.studies.bench import BenchArgs, run_bench
    from dca.studies.demo import DemoArgs, run_demo
    from dca.studies.init_study import InitStudyArgs, run_init_study
    from dca.studies.testbed.run import TestbedArgs, run_testbed
    from dca.training.train import TrainArgs, train

    return {
        "demo": (DemoArgs, run_demo, "the whole story on SmolLM2-135M and held-out Wikipedia, in minutes"),
        "train": (TrainArgs, train, "train a coprocessor for a frozen model on plain text"),
        "eval": (EvalArgs, run_eval, "the paper's tables for saved coprocessors, beside the frozen model"),
        "compare": (CompareArgs, run_compare, "pair coprocessors of separate `dca eval` runs, on their shared points"),
        "bench": (BenchArgs, run_bench, "time one training step: one-pass vs sequential vs fine-tuning"),
        "init-study": (InitStudyArgs, run_init_study, "how much each latent mapping hurts before training"),
        "testbed": (TestbedArgs, run_testbed, "does the coprocessor add serial computation? synthetic tasks, CPU"),
        "generate": (GenerateArgs, run_generate, "continue prompts, streamed; --compare frozen vs augmented"),
        "serve": (ServeArgs, run_serve, "an OpenAI-compatible HTTP server for a model and its coprocessor"),
        "bench-serve": (BenchServeArgs, run_bench_serve, "latency and throughput of `dca serve` under load"),
        # two-word commands: `dca cache build`, `dca cache bench`
        "cache build": (CacheBuildArgs, run_cache_build, "store the augmented caches of documents, for reuse"),
        "cache bench": (CacheBenchArgs, run_cache_bench, "time to first token with stored contexts and without"),
    }


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    parser = argparse.ArgumentParser(prog="dca", description="Differentiable Cache Augmentation for frozen LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (args_cls, _, help_text) in commands.items():
        group, _, action = name.partition(" ")
        if action and group not in groups:
            groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(dest="_action",
                                                                                           required=True)
        target = groups[group] if action else sub
        parsers[name] = target.add_parser(action or name, help=help_text, description=help_text)
        add_dataclass_arguments(parsers[name], args_cls)
        parsers[name].add_argument("--config", metavar="FILE", help="this command's arguments as JSON (a run's "
                                   "args.json reruns it); the options typed beside it override the file")
    argv = sys.argv[1:] if argv is None else list(argv)

    def parse() -> argparse.Namespace:
        namespace = parser.parse_args(argv)
        if getattr(namespace, "_action", None):
            namespace.command = f"{namespace.command} {namespace._action}"
        return namespace

    namespace = parse()
    args_cls, run, _ = commands[namespace.command]
    try:
        if namespace.config is not None:
            if _typed(argv, "--preset"):  # the file's coprocessor fields are resolved: they would win over it
                raise ArgumentError("preset", "cannot be combined with --config, whose coprocessor fields are "
                                    "already resolved: type the fields to change instead")
            parsers[namespace.command].set_defaults(**config_defaults(args_cls, namespace.config, namespace.command))
            namespace = parse()
        run(dataclass_from_namespace(args_cls, namespace))
    except DCAError as err:
        message = str(err)
        if isinstance(err, ArgumentError) and err.argument in vars(namespace):
            message = f"--{err.argument.replace('_', '-')} {err.message}"
        rank, said_by_all = os.environ.get("RANK", "0"), isinstance(err, ArgumentError)
        if said_by_all and rank != "0":  # every torchrun rank validates the same arguments: rank 0 says it once
            return err.exit_code
        where = f" (rank {rank})" if not said_by_all and int(os.environ.get("WORLD_SIZE") or 1) > 1 else ""
        print(f"dca {namespace.command}{where}: error: {' '.join(message.split())}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
