"""PNG plots beside the benchmarks' tables: what people would rather look at than read.

Each bench collects its points as it prints its table and calls one of these at the end; the file's path is
printed under the table. matplotlib (a development extra) draws with its file-only backend: no display needed.
"""

import pathlib

Series = dict[str, list[tuple[float, float]]]  # line name -> (x, y) points


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def line_panels(path: pathlib.Path, title: str, x_label: str, panels: dict[str, Series],
                log2_x: bool = False, styles: dict[str, dict] | None = None) -> pathlib.Path:
    """One panel per y quantity (its label is the key), one line per series, the same x axis in each.

    `styles` maps a series name to matplotlib line options (e.g. a colour per workload, a dash per system).
    """
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (y_label, series) in zip(axes[0], panels.items()):
        xs = sorted({x for points in series.values() for x, _ in points})
        for name, points in series.items():
            x, y = zip(*sorted(points))
            axis.plot(x, y, marker="o", label=name, **(styles or {}).get(name, {}))
        if log2_x:  # concurrency and batch sizes double: equal steps read better
            axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [f"{x:g}" for x in xs])
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(pyplot, figure, path)


def bars(path: pathlib.Path, title: str, y_label: str, values: dict[str, float]) -> pathlib.Path:
    """One bar per name, its value written on it."""
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(1.6 * len(values) + 2, 4.2))
    drawn = axis.bar(list(values), list(values.values()))
    axis.bar_label(drawn, fmt="%.3g")
    axis.set_ylabel(y_label)
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(title)
    figure.tight_layout()
    return _save(pyplot, figure, path)


def _save(pyplot, figure, path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path
