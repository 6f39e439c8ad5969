"""Fit the production SLURM profile to the one-node test cluster, and list what the cluster must have.

    python cluster_profile.py overlay PROD_PROFILE STATIC_OVERRIDES OUT_DIR [--no-accounting]
    python cluster_profile.py needs PROFILE [PROFILE ...]

`overlay` writes OUT_DIR/config.yaml, a profile to layer after the production one
(`snakemake --profile profiles/slurm --profile OUT_DIR`). It holds the hand-written test overrides
(tests/cluster/profile/config.yaml) and, only where the production profile has site placeholders
such as `slurm_partition: "<gpu-partition>"` or `slurm_account: "<account>"`, a copy of that
top-level block with each placeholder replaced by a name the test cluster creates ("gpu", "cpu",
"emsedit_test"). Snakemake replaces whole top-level keys when profiles are layered, hence the copy;
every other value in the block (GPUs, memory, runtimes, threads) stays as production has it.
With --no-accounting (no slurmdbd) accounts cannot be validated, so slurm_account is dropped.

`needs` prints shell assignments with every partition, account and QOS name that the layered
profiles use (later profiles replace earlier ones per top-level key, as in Snakemake):
    PARTITIONS='cpu gpu'
    ACCOUNTS='emsedit_test'
    QOS=''
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from pathlib import Path

import yaml

NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
PLACEHOLDER = re.compile(r"^\s*<([^<>]+)>\s*$")
KEYS = {"slurm_partition": "PARTITIONS", "slurm_account": "ACCOUNTS", "qos": "QOS"}
EXTRA_FLAGS = {"--partition": "PARTITIONS", "-p": "PARTITIONS", "--account": "ACCOUNTS",
               "-A": "ACCOUNTS", "--qos": "QOS", "-q": "QOS"}
TEST_ACCOUNT = "emsedit_test"
RESOURCE_BLOCKS = ("default-resources", "set-resources")


def load(profile: str | Path) -> dict:
    path = Path(profile)
    if path.is_dir():
        path = next((p for p in (path / "config.yaml", path / "profile.yaml") if p.is_file()), path)
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


# --- overlay ---------------------------------------------------------------------------------


def _test_value(key: str, value: str) -> str | None:
    """The test cluster's stand-in for a placeholder; None drops the key."""
    inner = PLACEHOLDER.match(value).group(1).strip().lower()
    if key == "slurm_partition":
        name = re.sub(r"[-_ ]?partition$", "", inner)
        name = re.sub(r"[^a-z0-9_]", "_", name) or "debug"
        return name
    if key == "slurm_account":
        return TEST_ACCOUNT
    if key == "qos":
        return "normal"
    return None


def _fill(res: dict, no_accounting: bool, notes: list[str], where: str) -> bool:
    """Replace placeholders in one resource mapping in place; True if anything changed."""
    changed = False
    for key in list(res):
        value = res[key]
        if no_accounting and key == "slurm_account":
            del res[key]
            notes.append(f"{where}.{key}: dropped (no accounting on the test cluster)")
            changed = True
        elif isinstance(value, str) and PLACEHOLDER.match(value):
            new = _test_value(key, value)
            if new is None:
                del res[key]
                notes.append(f"{where}.{key}: {value!r} dropped (no test stand-in)")
            else:
                res[key] = new
                notes.append(f"{where}.{key}: {value!r} -> {new!r}")
            changed = True
    return changed


def overlay(prod: dict, static: dict, no_accounting: bool) -> tuple[dict, list[str]]:
    out = dict(static)
    notes: list[str] = []
    default = prod.get("default-resources")
    if isinstance(default, dict):
        block = copy.deepcopy(default)
        if _fill(block, no_accounting, notes, "default-resources"):
            out["default-resources"] = block
    setres = prod.get("set-resources")
    if isinstance(setres, dict):
        block = copy.deepcopy(setres)
        changed = False
        for rule, res in block.items():
            if isinstance(res, dict):
                changed |= _fill(res, no_accounting, notes, f"set-resources.{rule}")
        if changed:
            out["set-resources"] = block
    for key in RESOURCE_BLOCKS:
        if key in static:  # a hand-written override of a whole block wins
            out[key] = static[key]
    return out, notes


# --- needs -----------------------------------------------------------------------------------


def _clean(value) -> str | None:
    text = str(value).strip().strip("'\"") if value is not None else ""
    return text if NAME.match(text) else None


def _scan_pair(key: str, value, found: dict[str, set[str]]) -> None:
    key = key.strip()
    if key in KEYS:
        name = _clean(value)
        if name:
            found[KEYS[key]].add(name)
    elif key == "slurm_extra":
        try:
            words = shlex.split(str(value).strip("'\""))
        except ValueError:
            return
        for i, word in enumerate(words):
            flag, _, val = word.partition("=")
            if flag in EXTRA_FLAGS:
                name = _clean(val or (words[i + 1] if i + 1 < len(words) else ""))
                if name:
                    found[EXTRA_FLAGS[flag]].add(name)


def _scan(res, found, two_level: bool) -> None:
    if isinstance(res, dict):
        for key, value in res.items():
            if two_level and isinstance(value, dict):
                for k2, v2 in value.items():
                    _scan_pair(k2, v2, found)
            else:
                _scan_pair(key, value, found)
    elif isinstance(res, (list, tuple)):
        for entry in res:
            text = str(entry)
            if two_level and ":" in text.split("=", 1)[0]:
                text = text.split(":", 1)[1]
            key, sep, value = text.partition("=")
            if sep:
                _scan_pair(key, value, found)


def needs(profiles: list[str]) -> dict[str, set[str]]:
    merged: dict = {}
    for p in profiles:
        merged.update(load(p))
    found: dict[str, set[str]] = {v: set() for v in KEYS.values()}
    _scan(merged.get("default-resources"), found, two_level=False)
    _scan(merged.get("set-resources"), found, two_level=True)
    return found


def main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[1] == "overlay":
        prod, static, out_dir = load(argv[2]), load(argv[3]), Path(argv[4])
        data, notes = overlay(prod, static, "--no-accounting" in argv[5:])
        out_dir.mkdir(parents=True, exist_ok=True)
        header = (
            "# Generated by tests/cluster/cluster_profile.py for the one-node test cluster; layered after\n"
            f"# {argv[2]}. Static overrides from {argv[3]}; placeholders filled:\n"
            + "".join(f"#   {n}\n" for n in notes)
        )
        (out_dir / "config.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
        for n in notes:
            print(n)
        return 0
    if len(argv) >= 3 and argv[1] == "needs":
        for var, names in sorted(needs(argv[2:]).items()):
            print(f"{var}={shlex.quote(' '.join(sorted(names)))}")
        return 0
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
