"""Write the tiny test datasets and their configs (deterministic; rerun after changing them).

.test/data/<dataset>-{train,eval}.json : small ZsRE (MEND schema) and CounterFact (EasyEdit schema)
                                         files, made-up facts, enough records for .test/config.yaml
.test/config/datasets/<dataset>.yaml   : the dataset configs with the files' sha256, read through
                                         the mirror (.test/config.yaml: data_mirror: data)
Usage: python .test/make_fixtures.py
"""

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_EVAL = 40, 24
SUBJECTS = ["Arvel", "Bront", "Cusk", "Dorin", "Elva", "Fenn", "Garo", "Hale", "Ivo", "Jory", "Kest", "Lumo"]
THINGS = ["red", "blue", "green", "stone", "river", "cloud", "piano", "tiger", "lemon", "paper", "glass", "north"]


def zsre(i: int) -> dict:
    s, a, b = SUBJECTS[i % 12] + str(i), THINGS[i % 12], THINGS[(i * 5 + 3) % 12]
    return {"subject": s, "src": f"What is the colour of {s}?", "pred": a, "rephrase": f"Which colour does {s} have?",
            "alt": b, "answers": [a], "loc": f"nq question: who wrote book number {i}", "loc_ans": SUBJECTS[(i + 4) % 12],
            "cond": f"{a} >> {b} || What is the colour of {s}?"}


def counterfact(i: int) -> dict:
    s, a, b = SUBJECTS[i % 12] + str(i), THINGS[i % 12], THINGS[(i * 7 + 5) % 12]
    return {"case_id": i, "prompt": f"The favourite word of {s} is", "target_new": b, "subject": s, "ground_truth": a,
            "rephrase_prompt": f"{s} likes the word", "locality_prompt": f"The favourite word of {SUBJECTS[(i + 1) % 12]} is",
            "locality_ground_truth": THINGS[(i + 1) % 12]}


def write(dataset: str, kind: str, make) -> None:
    files = {}
    for split, offset, n in (("train", 0, N_TRAIN), ("eval", 1000, N_EVAL)):
        rel = f"{dataset}-{split}.json"  # a bare file name (the library's rule); the mirror is .test/data
        path = HERE / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([make(offset + i) for i in range(n)], indent=1) + "\n")
        files[split] = {"file": rel, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "url": None}
    cfg = HERE / "config" / "datasets" / f"{dataset}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Tiny {kind} fixture for the workflow test; written by .test/make_fixtures.py.",
             f"name: {dataset}", f"kind: {kind}"]
    for split, spec in files.items():
        lines.append(f"{split}: {{file: {spec['file']}, sha256: {spec['sha256']}, url: null}}")
    cfg.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write("tiny-zsre", "zsre", zsre)
    write("tiny-counterfact", "counterfact", counterfact)
