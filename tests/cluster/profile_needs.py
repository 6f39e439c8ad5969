"""List what a Snakemake SLURM profile expects to exist on the cluster.

The test cluster is shaped so that the production profile can be used unchanged: every partition,
account and QOS name the profile mentions is created on the one-node cluster. This script reads the
profile(s) and prints shell assignments that workflow/scripts/slurm_cluster.sh evaluates:

    PARTITIONS='gpu cpu'
    ACCOUNTS='myproj'
    QOS='normal'

Values are looked for in `default-resources` and `set-resources` (both the mapping form and the
`KEY=VALUE` list form) and in `slurm_extra` strings (`--partition/-p`, `--account/-A`, `--qos`).
Only plain literal names are taken; expressions are ignored.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml

NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
KEYS = {"slurm_partition": "PARTITIONS", "slurm_account": "ACCOUNTS", "qos": "QOS"}
EXTRA_FLAGS = {
    "--partition": "PARTITIONS",
    "-p": "PARTITIONS",
    "--account": "ACCOUNTS",
    "-A": "ACCOUNTS",
    "--qos": "QOS",
    "-q": "QOS",
}


def _clean(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("'\"")
    return text if NAME.match(text) else None


def _scan_extra(extra: str, found: dict[str, set[str]]) -> None:
    try:
        words = shlex.split(str(extra).strip("'\""))
    except ValueError:
        return
    for i, word in enumerate(words):
        flag, _, val = word.partition("=")
        if flag in EXTRA_FLAGS:
            if not val and i + 1 < len(words):
                val = words[i + 1]
            name = _clean(val)
            if name:
                found[EXTRA_FLAGS[flag]].add(name)


def _scan_pair(key: str, value, found: dict[str, set[str]]) -> None:
    key = key.strip()
    if key in KEYS:
        name = _clean(value)
        if name:
            found[KEYS[key]].add(name)
    elif key == "slurm_extra":
        _scan_extra(value, found)


def _scan_resources(res, found, two_level: bool) -> None:
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


def needs(profile_dirs: list[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {v: set() for v in set(KEYS.values())}
    for d in profile_dirs:
        path = Path(d)
        if path.is_dir():
            candidates = [path / "config.yaml", path / "profile.yaml"]
            path = next((c for c in candidates if c.is_file()), None)
        if path is None or not path.is_file():
            continue
        data = yaml.safe_load(path.read_text()) or {}
        _scan_resources(data.get("default-resources"), found, two_level=False)
        _scan_resources(data.get("set-resources"), found, two_level=True)
    return found


def main(argv: list[str]) -> int:
    found = needs(argv[1:])
    for var in sorted(found):
        print(f"{var}={shlex.quote(' '.join(sorted(found[var])))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
