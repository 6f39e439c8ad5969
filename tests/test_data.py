"""Tests for reading the four dataset schemas into EditRequest records (emsedit.data)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from emsedit.data import DataError, EditRequest, EmptyTargetError
from emsedit.schemas import read_requests

MEND = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
}
MALMEN = {
    "src": "When was the inception of IAAF Combined Events Challenge?",
    "ans": "2006",
    "rephrase": "When was the IAAF Combined Events Challenge launched?",
    "loc": "nq question: what is the name of the last episode of spongebob",
    "loc_ans": "The String",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "attribute_prompts": ["x"],
}
EASY = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "Frenchish",
}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def with_change(record: dict, dotted: str, value: Any = ..., *, delete: bool = False) -> dict:
    """A deep copy of ``record`` with the field at ``dotted`` replaced or deleted."""
    out = copy.deepcopy(record)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value
    return out


# ----- the four schemas ------------------------------------------------------------------------


def test_mend_zsre_alt_target(tmp_path: Path) -> None:
    reqs = read_requests(write_json(tmp_path / "mend.json", [MEND, MEND]), "zsre")
    assert reqs[1] == EditRequest(
        index=1,
        prompt=MEND["src"],
        target="unmanned aircraft",
        old_target=None,
        rephrases=(MEND["rephrase"],),
        loc_prompts=(MEND["loc"] + "?",),
        loc_answer="Walter Sobchak",
        loc_old_answer=None,
    )


def test_mend_zsre_answers_target(tmp_path: Path) -> None:
    reqs = read_requests(write_json(tmp_path / "mend.json", [MEND]), "zsre", zsre_target="answers")
    assert reqs[0].target == "uniform"


def test_malmen_zsre(tmp_path: Path) -> None:
    (req,) = read_requests(write_json(tmp_path / "malmen.json", [MALMEN]), "zsre")
    assert (req.prompt, req.target, req.rephrases) == (MALMEN["src"], "2006", (MALMEN["rephrase"],))
    assert req.loc_prompts == (MALMEN["loc"] + "?",) and req.loc_answer == "The String"
    assert req.old_target is None and req.loc_old_answer is None


def test_rome_counterfact(tmp_path: Path) -> None:
    (req,) = read_requests(write_json(tmp_path / "cf.json", [ROME]), "counterfact")
    assert req.prompt == "The mother tongue of Danielle Darrieux is"
    assert (req.target, req.old_target) == ("English", "French")
    assert req.rephrases == tuple(ROME["paraphrase_prompts"])
    assert req.loc_prompts == tuple(ROME["neighborhood_prompts"])
    assert (req.loc_answer, req.loc_old_answer) == ("French", "English")


def test_easyedit_counterfact(tmp_path: Path) -> None:
    (req,) = read_requests(write_json(tmp_path / "cf.json", [EASY]), "counterfact")
    assert req.prompt == EASY["prompt"]
    assert (req.target, req.old_target) == ("English", "French")
    assert req.rephrases == (EASY["rephrase_prompt"],)
    assert req.loc_prompts == (EASY["locality_prompt"],)
    # locality answer comes from locality_ground_truth, compared against the new target
    assert (req.loc_answer, req.loc_old_answer) == ("Frenchish", "English")


def test_schema_recognised_per_record(tmp_path: Path) -> None:
    reqs = read_requests(write_json(tmp_path / "mixed.json", [MEND, MALMEN]), "zsre")
    assert [r.target for r in reqs] == ["unmanned aircraft", "2006"]
    reqs = read_requests(write_json(tmp_path / "mixed_cf.json", [ROME, EASY]), "counterfact")
    assert [r.index for r in reqs] == [0, 1]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_lines_accepted(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"lines{suffix}"
    path.write_text("\n".join(json.dumps(r) for r in [MEND, MALMEN, MEND]) + "\n\n", encoding="utf-8")
    reqs = read_requests(path, "zsre")
    assert [r.index for r in reqs] == [0, 1, 2]


def test_single_record_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(EASY) + "\n", encoding="utf-8")
    assert len(read_requests(path, "counterfact")) == 1


# ----- malformed input ------------------------------------------------------------------------

MALFORMED = [
    # (kind, records, bad index, field named in the message)
    ("zsre", [MEND, "not an object"], 1, None),
    ("zsre", [MEND, with_change(MEND, "src", delete=True)], 1, "src"),
    ("zsre", [MEND, MEND, with_change(MEND, "rephrase", 7)], 2, "rephrase"),
    ("zsre", [with_change(MEND, "loc_ans", "")], 0, "loc_ans"),
    ("zsre", [MALMEN, with_change(MALMEN, "loc", None)], 1, "loc"),
    ("zsre", [with_change(MALMEN, "ans", delete=True)], 0, "ans"),
    ("counterfact", [ROME, with_change(ROME, "requested_rewrite.target_true.str", delete=True)], 1,
     "requested_rewrite.target_true.str"),
    ("counterfact", [with_change(ROME, "requested_rewrite.target_new", "English")], 0,
     "requested_rewrite.target_new"),
    ("counterfact", [with_change(ROME, "paraphrase_prompts", ["ok", 3])], 0, "paraphrase_prompts[1]"),
    ("counterfact", [with_change(ROME, "neighborhood_prompts", [])], 0, "neighborhood_prompts"),
    ("counterfact", [with_change(ROME, "requested_rewrite.prompt", "no placeholder")], 0,
     "requested_rewrite.prompt"),
    ("counterfact", [EASY, EASY, with_change(EASY, "ground_truth", "  ")], 2, "ground_truth"),
    ("counterfact", [with_change(EASY, "locality_ground_truth", delete=True)], 0, "locality_ground_truth"),
    ("counterfact", [with_change(EASY, "rephrase_prompt", {"a": 1})], 0, "rephrase_prompt"),
    # a record missing the field that most identifies its schema is still recognised
    ("counterfact", [ROME, with_change(ROME, "requested_rewrite", delete=True)], 1, "requested_rewrite"),
    ("counterfact", [with_change(EASY, "target_new", delete=True)], 0, "target_new"),
    ("zsre", [with_change(MEND, "alt", 5)], 0, "alt"),
]


@pytest.mark.parametrize("kind,records,index,field", MALFORMED)
def test_malformed_record_names_file_index_field(
    tmp_path: Path, kind: str, records: list, index: int, field: str | None
) -> None:
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(DataError) as info:
        read_requests(path, kind)  # type: ignore[arg-type]
    message = str(info.value)
    assert str(path) in message
    assert f"record {index}" in message
    assert info.value.index == index
    if field is not None:
        assert f"'{field}'" in message
        assert info.value.field == field


def test_answers_empty_list(tmp_path: Path) -> None:
    path = write_json(tmp_path / "bad.json", [with_change(MEND, "answers", [])])
    with pytest.raises(DataError, match=r"record 0: field 'answers': empty list"):
        read_requests(path, "zsre", zsre_target="answers")


def test_kind_mismatch(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf.json", [EASY])
    with pytest.raises(DataError, match=r"record 0: .*easyedit_counterfact.*'zsre'"):
        read_requests(path, "zsre")


def test_unknown_schema(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"record 0: unknown schema"):
        read_requests(path, "zsre")


def test_non_json_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"src": "a",', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 1"):
        read_requests(path, "zsre")


def test_bad_json_line_names_record(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(MEND) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: record 1: line 2 is not valid JSON"):
        read_requests(path, "zsre")


@pytest.mark.parametrize("content", [{"data": [MEND]}, "just a string", 3])
def test_top_level_not_a_list(tmp_path: Path, content: Any) -> None:
    path = write_json(tmp_path / "top.json", content)
    with pytest.raises(DataError, match=r"top\.json: top level is a"):
        read_requests(path, "zsre")


def test_empty_list_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no records"):
        read_requests(write_json(tmp_path / "empty.json", []), "zsre")
    with pytest.raises(DataError, match="file not found"):
        read_requests(tmp_path / "absent.json", "zsre")


def test_empty_target_skipped_with_warning_or_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "t.json", [MEND, with_change(MEND, "alt", ""), MEND])
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) with an empty edit target \(indices 1\)"):
        reqs = read_requests(path, "zsre")
    assert [r.index for r in reqs] == [0, 2]
    with pytest.raises(EmptyTargetError, match=r"record 1: field 'alt': empty string"):
        read_requests(path, "zsre", on_empty_target="error")


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_json(tmp_path / "m.json", [MEND])
    with pytest.raises(ValueError, match="dataset_kind"):
        read_requests(path, "fever")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zsre_target"):
        read_requests(path, "zsre", zsre_target="ans")  # type: ignore[arg-type]


def test_passes_group_consecutive_mini_batches_up_to_the_row_limit():
    from emsedit.batching import passes
    from emsedit.data import MiniBatch

    def batch(rows: int) -> MiniBatch:
        z = torch.zeros(rows, 3, dtype=torch.long)
        return MiniBatch(input_ids=z, attention_mask=z, labels=z)

    sizes = [4, 4, 4, 4, 4, 20, 2, 3]
    groups = passes([batch(n) for n in sizes], max_rows=16)
    assert [[len(b) for b in g] for g in groups] == [[4, 4, 4, 4], [4], [20], [2, 3]]
    assert passes([]) == []
    # a last pass of at most half the limit joins the one before, up to 1.5 x the limit in all
    def rows(sizes: list[int]) -> list[list[int]]:
        return [[len(b) for b in g] for g in passes([batch(n) for n in sizes], max_rows=16)]

    assert rows([4] * 5) == [[4] * 5]  # 20 prompts: one pass, not 16 + 4
    assert rows([4] * 6) == [[4] * 6]  # 16 + 8 -> 24
    assert rows([4] * 7) == [[4] * 4, [4] * 3]  # 16 + 12: 12 is more than half
    assert rows([4] * 9) == [[4] * 4, [4] * 5]  # 16 + 16 + 4 -> 16 + 20
    assert rows([16, 10]) == [[16], [10]]
    assert rows([20, 4]) == [[20, 4]]  # 24 = 1.5 x 16
    assert rows([20, 6]) == [[20], [6]]  # 26 > 1.5 x 16
