"""Benchmark prompts in Spec-Bench JSONL form: `question_id`, `category`, `turns` (user turns)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flowspec.config import read_text_file
from flowspec.errors import ConfigError

__all__ = ["Prompt", "read_prompt_dir", "read_prompt_file"]


@dataclass(frozen=True, slots=True)
class Prompt:
    id: str
    text: str  # the first user turn
    category: str = ""
    source: str = ""


def read_prompt_file(path: str | os.PathLike[str], limit: int | None = None) -> list[Prompt]:
    p = Path(path)
    lines = read_text_file(p, "prompt file").splitlines()
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise ValueError("'turns' must be a non-empty list of strings")
            prompts.append(Prompt(str(row.get("question_id", number)), turns[0], str(row.get("category", "")),
                                  p.stem))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{p}:{number}: not a Spec-Bench line ({exc}); expected "
                              '{"question_id": ..., "turns": ["..."]}') from exc
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


def read_prompt_dir(path: str | os.PathLike[str], per_task: int | None = None) -> list[Prompt]:
    """Every `*.jsonl` in a folder (sorted by name), `per_task` prompts from each."""
    folder = Path(path)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise ConfigError(f"{folder} holds no *.jsonl prompt files")
    prompts = [prompt for f in files for prompt in read_prompt_file(f, per_task)]
    if not prompts:
        raise ConfigError(f"the *.jsonl files in {folder} hold no prompts: nothing to do")
    return prompts
