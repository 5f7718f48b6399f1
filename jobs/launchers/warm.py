"""What the local launcher's fork server imports once, so that each cell it forks starts warm.

A fresh ``python -m jobs.node`` spends seconds importing torch, mlflow (and
the SQLAlchemy/alembic store behind it), ``torch._dynamo`` (which the first
``torch.optim`` optimiser loads) and the suite before its cell does any work
(``deqbench bench orchestration``). The local launcher's fork server
(:func:`jobs.launchers.local.fork_context`) imports this module once per sweep,
then forks one child per cell: the child has all of it already.

Only imports: nothing here may start a thread, run a torch operation or touch
CUDA, since a forked child inherits none of those safely (CUDA in particular:
a cell's ``CUDA_VISIBLE_DEVICES`` is set in its child, before CUDA starts).
A module that fails to import is skipped; the cell imports it itself, as a
fresh process would.
"""

from __future__ import annotations

import importlib

MODULES = (
    "torch", "torch._dynamo", "torch.optim", "torchdeq", "numpy", "scipy", "scipy.linalg", "scipy.ndimage",
    "scipy.spatial", "scipy.special", "skimage.metrics", "skimage.io", "skimage.data", "skimage.transform",
    "skimage.color", "skimage.exposure", "skimage.measure", "imageio.v2", "imageio.v3", "tifffile", "PIL.Image",
    "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "PIL.TiffImagePlugin", "email.policy",
    "mlflow", "mlflow.tracking", "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.db.utils", "sqlalchemy", "alembic", "alembic.command",
    "suite.config", "suite.data", "suite.models", "suite.training", "suite.metrics",
    "jobs.node", "jobs.tracking", "jobs.progress", "jobs.distributed",
)

IMPORTED: list[str] = []
for _name in MODULES:
    try:
        importlib.import_module(_name)
        IMPORTED.append(_name)
    except Exception:  # noqa: BLE001 - optional speed-up; the cell imports what it needs itself
        pass
