"""Physics (forward operators) for the imaging inverse problems.

See :mod:`suite.physics.mri` for the MRI operators and their complex convention.
"""

from suite.physics.mri import (
    MRIOperator,
    MultiCoilMRI,
    SingleCoilMRI,
    acs_bounds,
    complex_inner,
    estimate_sensitivity_maps,
    make_mri_physics,
    sense_combine,
)

__all__ = [
    "MRIOperator",
    "SingleCoilMRI",
    "MultiCoilMRI",
    "make_mri_physics",
    "estimate_sensitivity_maps",
    "acs_bounds",
    "sense_combine",
    "complex_inner",
]
