"""Per-task accuracy of a merged model and its inputs; normalized accuracy = merged / the task's own fine-tune."""

from __future__ import annotations

from contextlib import contextmanager

from merging.protocols import TaskAdapter


def task_owner(results: dict[str, dict[str, float]], n_models: int, tasks: list[str] | None) -> dict[str, str]:
    """task -> label ("model{i}") of the fine-tune the merged model is compared with on that task."""
    labels = [f"model{i}" for i in range(n_models)]
    if tasks is not None:
        if len(tasks) != n_models:
            raise ValueError(f"tasks: expected {n_models} entries (one per model), got {len(tasks)}")
        return {t: label for label, spec in zip(labels, tasks) for t in spec.split("+")}
    merged = results["merged"]
    return {t: max(labels, key=lambda label: results[label][t]) for t in merged}


def normalized(results: dict[str, dict[str, float]], owners: dict[str, str]) -> dict[str, float]:
    """merged accuracy / the owning fine-tune's accuracy, per task with an owner. A task its fine-tune never
    solves (accuracy 0) has no normalized accuracy and is left out."""
    return {
        task: results["merged"][task] / results[label][task]
        for task, label in owners.items()
        if results[label][task] > 0
    }


def evaluate_paths(
    merged: str, base: str | None, models: list[str], data, adapter: TaskAdapter, tasks: list[str] | None = None,
    split: str = "val", progress: bool = False,
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, str]]:  # fmt: skip
    """(accuracy per label and task, normalized accuracy per task, owner per task) on ``split`` of ``data``, each
    model read and evaluated by ``adapter``. ``base`` None: no base row. ``progress``: a rich progress bar."""
    paths = [("merged", merged), *([("base", base)] if base is not None else []),
             *((f"model{i}", m) for i, m in enumerate(models))]  # fmt: skip
    results = {}
    with _progress(progress, len(paths)) as advance:
        for label, path in paths:
            advance(f"evaluating {label}")
            results[label] = adapter.evaluate(adapter.load(path), data, split)
        advance("evaluated")
    owners = task_owner(results, len(models), tasks)
    return results, normalized(results, owners), owners


@contextmanager
def _progress(enabled: bool, total: int):
    """Yields ``advance(description)``: the first call starts the bar, each later one counts a model done."""
    if not enabled:
        yield lambda description: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:  # fmt: skip  (as merging.merge's bar over tensors)
        task = bar.add_task("evaluating", total=total)
        started = False

        def advance(description: str) -> None:
            nonlocal started
            bar.update(task, description=description, advance=1 if started else 0)
            started = True

        yield advance


def accuracy_table(results, norm, owners):
    """A rich table: per task, absolute accuracy of every model and the merged one's normalized accuracy."""
    from rich.table import Table

    labels = list(results)
    table = Table(title="Exact match per task (normalized = merged / the task's own fine-tune)")
    table.add_column("task")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("fine-tune", justify="right")
    table.add_column("normalized", justify="right")
    for task in results["merged"]:
        own = owners.get(task)
        cells = [f"{results[label][task]:.3f}" for label in labels]
        table.add_row(task, *cells, own or "-", f"{norm[task]:.3f}" if task in norm else "-")
    tasks = list(results["merged"])
    table.add_row(f"mean, all {len(tasks)} tasks", *[f"{_mean(results[label], tasks):.3f}" for label in labels], "",
                  "-")  # fmt: skip
    if norm:  # the normalized mean covers the fine-tuned tasks only: its own row, with the absolute means beside it
        tuned = [t for t in tasks if t in norm]
        table.add_row(f"[bold]mean, {len(tuned)} fine-tuned task{'s' * (len(tuned) != 1)}[/bold]",
                      *[f"{_mean(results[label], tuned):.3f}" for label in labels], "",
                      f"[bold]{sum(norm[t] for t in tuned) / len(tuned):.3f}[/bold]")  # fmt: skip
    return table


def _mean(accuracies: dict[str, float], tasks: list[str]) -> float:
    return sum(accuracies[t] for t in tasks) / len(tasks)
