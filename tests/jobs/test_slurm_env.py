"""jobs.slurm_env: launcher-config validation, Slurm presence, partitions.

The first group needs no cluster (``check_cluster=False`` or an empty PATH);
the ``slurm``-marked group asks the real local cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.slurm_env import (
    SLURM_PACKAGES,
    default_partition,
    load_launcher_config,
    partition_gpus,
    partitions,
    require_slurm,
    slurm_installed,
    submitit_arguments,
    valid_launcher_keys,
    validate_launcher_config,
)

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = REPO / "configs" / "launchers"


# --- no cluster needed ---------------------------------------------------------
def test_unknown_key_is_refused_and_valid_keys_are_listed() -> None:
    with pytest.raises(ValueError) as err:
        validate_launcher_config({"slurm_partiton": "debug", "timeout_min": 5}, check_cluster=False)
    msg = str(err.value)
    assert "'slurm_partiton'" in msg
    for key in ("slurm_partition", "timeout_min", "gpus_per_node", "slurm_setup", "folder"):
        assert key in msg


def test_every_key_of_the_shipped_configs_is_valid() -> None:
    valid = set(valid_launcher_keys())
    for name in ("local_slurm.yaml", "slurm.yaml"):
        config = yaml.safe_load((LAUNCHERS / name).read_text())
        assert set(config) <= valid, (name, set(config) - valid)
        assert validate_launcher_config(config, check_cluster=False) == config


def test_submitit_accepts_the_valid_keys() -> None:
    """Every key we call valid is one submitit's AutoExecutor takes (an independent check)."""
    submitit = pytest.importorskip("submitit")
    config = load_launcher_config(LAUNCHERS / "slurm.yaml", check_cluster=False)
    folder, init_kwargs, params = submitit_arguments(config)
    assert folder == "submitit/%j"  # unused by sweeps (logs go under the sweep), a default for direct use
    assert init_kwargs == {"slurm_max_num_timeout": 3}
    assert "folder" not in params and "slurm_max_num_timeout" not in params
    executor = submitit.AutoExecutor(folder="/tmp/unused", cluster="debug", **init_kwargs)
    executor.update_parameters(**params)  # raises on a key submitit does not know


@pytest.mark.parametrize(
    "config, error, words",
    [
        ({"timeout_min": "60"}, TypeError, ["timeout_min", "'60'"]),
        ({"timeout_min": 0}, ValueError, ["timeout_min", ">= 1"]),
        ({"tasks_per_node": 2.5}, TypeError, ["tasks_per_node", "2.5"]),
        ({"gpus_per_node": -1}, ValueError, ["gpus_per_node", ">= 0"]),
        ({"mem_gb": "2G"}, TypeError, ["mem_gb", "'2G'"]),
        ({"mem_gb": 0}, ValueError, ["mem_gb", "> 0"]),
        ({"slurm_setup": "module load cuda"}, TypeError, ["slurm_setup", "list of strings"]),
        ({"slurm_partition": 3}, TypeError, ["slurm_partition", "3"]),
        ({"slurm_additional_parameters": ["x"]}, TypeError, ["slurm_additional_parameters"]),
    ],
)
def test_wrong_types_and_ranges_are_refused(config: dict, error: type, words: list) -> None:
    with pytest.raises(error) as err:
        validate_launcher_config(config, check_cluster=False)
    for word in words:
        assert word in str(err.value)


def test_none_means_unset_and_a_non_mapping_is_refused() -> None:
    assert validate_launcher_config({"slurm_account": None}, check_cluster=False) == {"slurm_account": None}
    assert submitit_arguments({"slurm_account": None}) == ("submitit/%j", {}, {})
    with pytest.raises(TypeError, match="mapping"):
        validate_launcher_config(["slurm_partition"], check_cluster=False)  # type: ignore[arg-type]


def test_missing_slurm_names_packages_and_the_start_script(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch anywhere
    assert not slurm_installed()
    with pytest.raises(RuntimeError) as err:
        require_slurm()
    msg = str(err.value)
    assert "sbatch" in msg and "slurm/local_cluster.sh start" in msg
    assert all(pkg in msg for pkg in SLURM_PACKAGES)
    with pytest.raises(RuntimeError, match="not installed"):
        validate_launcher_config({"slurm_partition": "debug"})
    with pytest.raises(RuntimeError, match="not installed"):
        partitions()


def test_load_names_the_file_in_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("slurm_partition: debug\ntime_limit: 5\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown launcher key\(s\) 'time_limit'"):
        load_launcher_config(path, check_cluster=False)


# --- the real local cluster -------------------------------------------------------
@pytest.mark.slurm
def test_partitions_come_from_sinfo(slurm_cluster: str) -> None:
    assert slurm_cluster in partitions()
    assert default_partition() == slurm_cluster
    assert partition_gpus(slurm_cluster) == 0


@pytest.mark.slurm
def test_local_config_validates_against_the_cluster(slurm_cluster: str) -> None:
    config = load_launcher_config(LAUNCHERS / "local_slurm.yaml")
    assert config["slurm_partition"] == slurm_cluster


@pytest.mark.slurm
def test_a_partition_that_does_not_exist_is_refused(slurm_cluster: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_launcher_config({"slurm_partition": "gpu-a100"})
    msg = str(err.value)
    assert "'gpu-a100'" in msg and slurm_cluster in msg
    # The example for a real cluster names a partition this one lacks.
    with pytest.raises(ValueError, match="partition 'gpu' does not exist"):
        load_launcher_config(LAUNCHERS / "slurm.yaml")


@pytest.mark.slurm
def test_gpus_on_a_cpu_partition_are_refused(slurm_cluster: str) -> None:
    with pytest.raises(ValueError, match=r"gpus_per_node=1 .*'debug' offers at most 0"):
        validate_launcher_config({"slurm_partition": slurm_cluster, "gpus_per_node": 1})
    with pytest.raises(ValueError, match="gpus_per_node=2"):
        validate_launcher_config({"gpus_per_node": 2})  # the default partition is checked too
