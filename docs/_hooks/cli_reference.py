"""MkDocs hook: renders the ``crosschip`` argparse parser into cli.md, so the reference lists
exactly the subcommands and flags the installed command accepts.

``<!-- cli-reference:NAME -->`` in a page becomes the usage line and option table of
``crosschip NAME``. Flags the parser gives no help text get the description in ``NOTES``; a note
for a flag the parser no longer has, or a subcommand the page does not document, fails the build.
"""

from __future__ import annotations

import argparse
import re

MARKER = re.compile(r"<!-- cli-reference:([a-z-]+) -->")

# Descriptions for flags whose argparse help is empty (checked against core/crosschip/cli.py).
NOTES = {
    ("train", "--steps"): "total optimizer steps of the run (a resumed run continues up to this step)",
    ("train", "--batch-size"): "sequences per step",
    ("train", "--seq-len"): "tokens per sequence",
    ("train", "--lr"): "peak learning rate of AdamW (linear warm-up, then cosine decay to a tenth)",
    ("train", "--seed"): "seed of the weights, the built-in corpus and the batch order",
    ("train", "--device"): "torch device; default CUDA when available, else CPU",
    ("train", "--dtype"): "parameter dtype: float32, bfloat16/bf16, float16/fp16 (also fp32, float, half)",
    ("train", "--fp8-recipe"): "FP8 scaling recipe when `--precision fp8`",
    ("train", "--activation-checkpointing"): "recompute no layer, every layer or every other layer "
                                             "in the backward pass",
    ("generate", "--prompt"): "text to continue",
    ("generate", "--max-new-tokens"): "tokens to generate (fewer if the tokenizer's EOS comes first)",
    ("generate", "--top-k"): "keep the k most likely tokens when sampling",
    ("generate", "--top-p"): "keep the smallest set of tokens whose probability reaches p when sampling",
    ("generate", "--backend"): "backend or chain (default: auto)",
    ("generate", "--device"): "torch device; default CUDA when available, else CPU",
    ("generate", "--seed"): "`torch.manual_seed` before sampling",
}


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:
        return "off"
    if action.default is None:
        return "—"
    return f"`{action.default}`"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    return action.type.__name__ if action.type is not None else "str"


def _cell(text: str) -> str:
    # Brackets in help text are literal (``[,dora]``), never Markdown links.
    return text.replace("|", "\\|").replace("\n", " ").replace("[", "\\[").replace("]", "\\]")


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices, {a.dest: a.help for a in sub._choices_actions}


def render(parser: argparse.ArgumentParser, name: str) -> str:
    commands, helps = _subcommands(parser)
    if name not in commands:
        raise ValueError(f"cli.md documents `crosschip {name}`, which the parser does not have")
    child = commands[name]
    summary = helps.get(name) or ""
    lines = [summary[:1].upper() + summary[1:] + ".", "",
             "```text", child.format_usage().strip(), "```", "",
             "| option | value | default | description |", "|---|---|---|---|"]
    for action in child._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        text = action.help or NOTES.get((name, flag), "")
        flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        lines.append(f"| {flags} | {_value(action)} | {_default(action)} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _check(parser: argparse.ArgumentParser, documented: set[str]) -> None:
    commands, _ = _subcommands(parser)
    missing = sorted(set(commands) - documented)
    if missing:
        raise ValueError(f"cli.md does not document subcommand(s) {', '.join(missing)}")
    for command, flag in NOTES:
        flags = {s for a in commands[command]._actions for s in a.option_strings}
        if flag not in flags:
            raise ValueError(f"docs/_hooks/cli_reference.py has a note for `crosschip {command} {flag}`, "
                             "which the parser does not have")


def on_page_markdown(markdown: str, page, config, files) -> str:
    names = MARKER.findall(markdown)
    if not names:
        return markdown
    from crosschip.cli import build_parser

    parser = build_parser()
    _check(parser, set(names))
    return MARKER.sub(lambda m: render(parser, m.group(1)), markdown)
