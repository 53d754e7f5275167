"""The tasks the model was trained with: one table for the API, the CLI, the tokenizer and the
gRPC contract (the enum value each maps to in moe_embed.v1.Task; the gRPC adapter maps them).

The model requires a task prefix joined to the text by one space; `none` uses the text as
given. A query embedded without its prefix is a silent quality bug, so the task is a required
field everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidInput


@dataclass(frozen=True)
class Task:
    name: str  # the API and CLI name
    proto: str  # the moe_embed.v1.Task enum value name
    prefix: str  # prepended to the text

    def apply(self, text: str) -> str:
        return self.prefix + text


TASKS: tuple[Task, ...] = (
    Task("none", "TASK_NONE", ""),
    Task("search_query", "TASK_SEARCH_QUERY", "search_query: "),
    Task("search_document", "TASK_SEARCH_DOCUMENT", "search_document: "),
    Task("classification", "TASK_CLASSIFICATION", "classification: "),
    Task("clustering", "TASK_CLUSTERING", "clustering: "),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}


def task_named(name: str | int | None) -> Task:
    """The task called `name`, or InvalidInput naming the field (None: it was not given; a
    number: an enum value of the contract that no task has)."""
    task = _BY_NAME.get(name) if isinstance(name, str) else None
    if task is None:
        choices = ", ".join(TASK_NAMES)
        if name is None:
            raise InvalidInput("task", f"is required: one of {choices}")
        if isinstance(name, int):
            raise InvalidInput("task", f"unknown value {name}; expected one of {choices}")
        raise InvalidInput("task", f"unknown task {name!r}; expected one of {choices}")
    return task
