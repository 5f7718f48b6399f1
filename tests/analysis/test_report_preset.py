"""The spectral report names the ``eval.preset`` a run's HFE/SR definitions came from."""

from __future__ import annotations

import pandas as pd

from analysis.report import CHARACTERISTIC_COLUMNS, SpectralSettings, _settings_note
from suite.config import flatten, load_config


def _rows(*settings: SpectralSettings) -> pd.DataFrame:
    rows = [{"image": f"im{i}", "hfe_cutoff": s.hfe_cutoff, "hfe_mode": s.hfe_mode,
             "sr_threshold": s.sr_threshold, "preset": s.preset} for i, s in enumerate(settings)]
    return pd.DataFrame(rows, columns=list(CHARACTERISTIC_COLUMNS))


def test_settings_from_logged_params_of_a_preset_run():
    params = {k: str(v) for k, v in flatten(load_config(None, ["eval.preset=crr_paper"])).items()}
    s = SpectralSettings.from_params(params)
    assert (s.hfe_cutoff, s.hfe_mode, s.sr_threshold, s.preset) == (0.12, "magnitude", 0.05, "crr_paper")
    assert SpectralSettings.from_params({}).preset == "none"  # runs logged before presets existed


def test_settings_note_names_the_preset():
    note = _settings_note(_rows(SpectralSettings(0.12, "magnitude", 0.05, "crr_paper")))
    assert "HFE outside 0.12 x Nyquist (magnitude; preset crr_paper), SR > 5 % of range" in note


def test_settings_note_without_preset_is_unchanged():
    note = _settings_note(_rows(SpectralSettings(0.25, "power", 0.05)))
    assert "HFE outside 0.25 x Nyquist (power), SR > 5 % of range" in note
    assert "preset" not in note
