"""Command-line argument helpers, at the bottom of the package (they import nothing of spdinv's
but the errors): value parsers, the model/device/seed arguments every command shares, and flags
built from option dataclasses.

An option dataclass (SPDInvOptions, P2POptions, ...) declares each field with `option(default,
help)`; `add_option_arguments` turns the fields of several such classes into flags (one flag per
field name, shared by the classes that have it; default None, so only what the user typed is
passed on) and `given_options` reads them back per class. Adding an option is one edit: its field.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Callable, Mapping, Sequence

# argparse's own pattern takes "-1e-6" or "-inf" for an option ("expected one argument")
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, and reads any negative number
    (-1, -0.5, -1e-6) as a value, so that a range check, not the parser, answers it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def words(text: str) -> tuple[str, ...]:
    """'a b c' -> ('a', 'b', 'c')."""
    return tuple(text.split())


def parse_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {text}")
    return value


def parse_device(text: str) -> str:
    """A device this torch build can use: cpu, cuda, cuda:N or mps."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text}: {build} (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available in this torch build or on this machine")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda, cuda:N or mps")
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="SD 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1: a diffusers folder, a hub id in the local cache, "
                             "or a single-file .safetensors/.ckpt checkpoint; shapes-world-flow: the shipped "
                             "rectified-flow world model; default: the embedded shapes-world model")
    parser.add_argument("--variant", default=None, help="weight variant of a diffusers folder, e.g. fp16 (*.fp16.safetensors)")
    parser.add_argument("--config", default=None,
                        help="for a single-file --model: a local diffusers folder of the same family (configs, tokenizers, scheduler)")
    parser.add_argument("--device", type=parse_device, default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seed", type=parse_seed, default=0, help="random seed, 0 to 2**63 - 1 (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="let diffusers/transformers log and warn on the terminal")


def add_steps_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")


# ---- flags from option dataclasses ---------------------------------------------------------------

def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None, flag: str | None = None,
           choices: Sequence[str] | None = None) -> Any:
    """A field of an options dataclass that knows its command-line flag: `help` (the default is
    appended), `parse` (the flag's argparse type; default from the annotation: int, float, str,
    bool -> a switch), `flag` (default --FIELD-NAME) and `choices` (listed by --help)."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "flag": flag,
                                                        "choices": None if choices is None else tuple(choices)})


@dataclasses.dataclass(frozen=True)
class OptionFlag:
    """One command-line flag and the option fields (owner name -> field name) it sets."""

    flag: str
    dest: str
    parse: Callable[[str], Any] | None
    switch: bool
    fields: dict[str, str]
    help: str
    choices: tuple[str, ...] | None = None


def _parse_type(owner: type, field: dataclasses.Field) -> tuple[Callable | None, bool]:
    """(argparse type, is a switch) of a field."""
    if field.metadata.get("parse") is not None:
        return field.metadata["parse"], False
    annotation = typing.get_type_hints(owner).get(field.name)
    bare = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = bare[0]
    if kind is bool:
        return None, True
    return {int: integer, float: number}.get(kind), False


def option_flags(classes: Mapping[str, type]) -> dict[str, OptionFlag]:
    """dest -> OptionFlag for every field of the given options dataclasses (owner name -> class);
    a field name several classes share is one flag."""
    found: dict[str, OptionFlag] = {}
    helps: dict[str, list[str]] = {}
    for owner, cls in classes.items():
        for field in dataclasses.fields(cls):
            flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
            dest = flag.lstrip("-").replace("-", "_")
            parse, switch = _parse_type(cls, field)
            text = field.metadata.get("help", field.name.replace("_", " "))
            default = "" if field.default in (None, False, dataclasses.MISSING) else f" (default {field.default!r})"
            if dest not in found:
                found[dest] = OptionFlag(flag, dest, parse, switch, {owner: field.name}, "",
                                         field.metadata.get("choices"))
                helps[dest] = []
            else:
                found[dest].fields[owner] = field.name
            helps[dest].append((owner, text + default.replace("'", "")))
    for dest, entries in helps.items():
        if len(entries) == 1 or len({text for _, text in entries}) == 1:
            text = entries[0][1]
        else:
            text = "; ".join(f"{owner}: {text}" for owner, text in entries)
        found[dest] = dataclasses.replace(found[dest], help=text)
    return found


def add_option_arguments(parser: argparse.ArgumentParser, classes: Mapping[str, type],
                         title: str = "{} options") -> dict[str, OptionFlag]:
    """One argument group per class (`title` formatted with its owner name) with a flag per field,
    default None; a shared field goes in the group of its first owner."""
    flags = option_flags(classes)
    groups = {}
    for flag in flags.values():
        owner = next(iter(flag.fields))
        if owner not in groups:
            groups[owner] = parser.add_argument_group(title.format(owner))
        if flag.switch:
            groups[owner].add_argument(flag.flag, dest=flag.dest, action="store_true", default=None, help=flag.help)
        else:
            groups[owner].add_argument(flag.flag, dest=flag.dest, type=flag.parse, default=None, help=flag.help,
                                       choices=flag.choices)
    return flags


def given_options(args: argparse.Namespace, classes: Mapping[str, type]) -> dict[str, object]:
    """dest -> value of the option flags of `classes` given on the command line (None: not given)."""
    return {dest: getattr(args, dest) for dest in option_flags(classes) if getattr(args, dest, None) is not None}


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")
