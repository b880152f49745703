"""Where training numbers and pictures go: metrics.jsonl, TensorBoard, PNG grids.

Only process 0 writes; the others get a writer that does nothing, so the loop has no
`if process_index == 0` around every call.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from mmjax.images import save_png


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter  # imported late: it is slow to import

            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        return self._tb

    def write(self, step: int, metrics: dict, *, tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        # json cannot hold NaN portably; a non-finite value is written as a string.
        row = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._jsonl.write(json.dumps(row) + "\n")
        if tensorboard:
            tb = self._tensorboard()
            for key, value in metrics.items():
                value = np.asarray(value)
                if value.size == 1 and np.isfinite(value):
                    tb.add_scalar(key, float(value), int(step))

    def write_image(self, step: int, name: str, grid_uint8: np.ndarray) -> str | None:
        if not self.enabled:
            return None
        from PIL import Image

        path = os.path.join(self.workdir, "samples", f"{name}_{int(step):07d}.png")
        save_png(Image.fromarray(grid_uint8), path)
        self._tensorboard().add_image(name, grid_uint8, int(step), dataformats="HWC")
        return path

    def flush(self) -> None:
        if self._jsonl:
            self._jsonl.flush()
        if self._tb:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.close()
            self._tb = None
