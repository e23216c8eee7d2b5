"""dca.atomic beyond the folder saves (those are killed at every step in tests/training/test_checkpoint.py)."""

import matplotlib
import pytest

from dca.atomic import write_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_write_figure_replaces_a_png_whole_or_not_at_all(tmp_path):
    path = tmp_path / "plot.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    write_figure(path, fig)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and fig.number not in plt.get_fignums()  # written, and the figure closed
    broken, _ = plt.subplots()

    def fail(*args, **kwargs):
        raise RuntimeError("the renderer died")

    broken.savefig = fail
    with pytest.raises(RuntimeError, match="renderer died"):
        write_figure(path, broken)
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # nothing half-written
    plt.close(broken)
