"""Fast checks (no SLURM needed) of tests/cluster/cluster_profile.py, the helper that fits the
production profile to the one-node test cluster. Part of the normal `make test`."""

import importlib.util
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
spec = importlib.util.spec_from_file_location("cluster_profile", HERE / "cluster_profile.py")
cp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cp)

PROD = {
    "executor": "slurm",
    "jobs": 100,
    "default-resources": {"slurm_partition": "<cpu-partition>", "slurm_account": "<account>",
                          "mem_mb": 8000, "runtime": 60},
    "set-resources": {"run_cell": {"slurm_partition": "<gpu-partition>", "gpu": 1, "runtime": 2880},
                      "light": {"mem_mb": 100}},
}


def test_overlay_fills_placeholders_and_keeps_the_rest():
    out, notes = cp.overlay(PROD, {"jobs": 3}, no_accounting=False)
    assert out["jobs"] == 3
    assert out["default-resources"] == {"slurm_partition": "cpu", "slurm_account": cp.TEST_ACCOUNT,
                                        "mem_mb": 8000, "runtime": 60}
    assert out["set-resources"]["run_cell"] == {"slurm_partition": "gpu", "gpu": 1, "runtime": 2880}
    assert out["set-resources"]["light"] == {"mem_mb": 100}
    assert len(notes) == 3
    assert PROD["default-resources"]["slurm_partition"] == "<cpu-partition>"  # input untouched


def test_overlay_without_accounting_drops_accounts():
    out, _ = cp.overlay(PROD, {}, no_accounting=True)
    assert "slurm_account" not in out["default-resources"]


def test_overlay_leaves_literal_profiles_alone():
    prod = {"default-resources": {"slurm_partition": "batch", "mem_mb": 10}}
    out, notes = cp.overlay(prod, {"jobs": 3}, no_accounting=False)
    assert out == {"jobs": 3} and notes == []


def test_needs_lists_names_from_layered_profiles(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text(yaml.safe_dump(PROD))
    out, _ = cp.overlay(PROD, {}, no_accounting=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.yaml").write_text(yaml.safe_dump(out))
    found = cp.needs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert found["PARTITIONS"] == {"cpu", "gpu"}
    assert found["ACCOUNTS"] == {cp.TEST_ACCOUNT}


def test_needs_reads_list_form_and_slurm_extra(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "default-resources": ["slurm_partition=short", "mem_mb=10"],
        "set-resources": ["big:slurm_extra='--qos=long -A proj'"],
    }))
    found = cp.needs([str(tmp_path)])
    assert found == {"PARTITIONS": {"short"}, "ACCOUNTS": {"proj"}, "QOS": {"long"}}


def test_production_profile_fits_the_test_cluster():
    """Every site placeholder in profiles/slurm gets a test stand-in (none is left over)."""
    prod_dir = REPO / "profiles" / "slurm"
    prod = cp.load(prod_dir)
    assert prod, f"no production SLURM profile: {prod_dir}/config.yaml is missing or empty"
    out, _ = cp.overlay(prod, cp.load(HERE / "profile"), no_accounting=False)
    merged = {**prod, **out}
    leftovers = [v for v in yaml.safe_dump(merged).split() if cp.PLACEHOLDER.match(v.strip("'\""))]
    assert not leftovers, leftovers
