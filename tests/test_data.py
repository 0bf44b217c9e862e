"""Examples from jsonl: bad input names file, line and field."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, load_examples


def jsonl(tmp_path, lines: list[str]):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"prompt": "Q: 1+1?", "response": "2"})


def test_reads_in_order_with_ids(tmp_path):
    p = jsonl(tmp_path, [GOOD, json.dumps({"prompt": "Q", "response": "A", "id": "x"})])
    ex = load_examples(DataConfig(path=str(p)))
    assert [e.id for e in ex] == ["train:1", "train:2"]
    ex = load_examples(DataConfig(path=str(p), limit=1))
    assert len(ex) == 1


def test_id_field(tmp_path):
    p = jsonl(tmp_path, [json.dumps({"prompt": "Q", "response": "A", "id": "x"})])
    assert load_examples(DataConfig(path=str(p), id_field="id"))[0].id == "x"


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"prompt": "Q", "response": ', r"train\.jsonl:2: invalid JSON"),
        (json.dumps({"prompt": "Q"}), r"train\.jsonl:2: missing field 'response'"),
        (json.dumps({"prompt": "Q", "response": ""}), r"train\.jsonl:2: field 'response' is empty"),
        (json.dumps({"prompt": "Q", "response": "  \n"}), r"train\.jsonl:2: field 'response' is empty"),
        (json.dumps({"prompt": 3, "response": "A"}), r"train\.jsonl:2: field 'prompt' must be a string"),
        (json.dumps(["Q", "A"]), r"train\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_field(tmp_path, line, match):
    p = jsonl(tmp_path, [GOOD, line])
    with pytest.raises(DataError, match=match):
        load_examples(DataConfig(path=str(p)))


def test_other_field_names(tmp_path):
    p = jsonl(tmp_path, [json.dumps({"prompt": "Q", "output": "A"})])
    with pytest.raises(DataError, match="missing field 'response'"):
        load_examples(DataConfig(path=str(p)))
    assert load_examples(DataConfig(path=str(p), response_field="output"))[0].response == "A"


def test_duplicate_ids_and_missing_file(tmp_path):
    rec = json.dumps({"prompt": "Q", "response": "A", "id": "x"})
    p = jsonl(tmp_path, [rec, "", rec])  # a blank line between: file lines 1 and 3, not rows 0 and 1
    with pytest.raises(DataError, match=r"train\.jsonl:3: duplicate id 'x' \(first at .*train\.jsonl:1\)"):
        load_examples(DataConfig(path=str(p), id_field="id"))
    with pytest.raises(DataError, match="not found"):
        load_examples(DataConfig(path=str(tmp_path / "nope.jsonl")))


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(GOOD.encode() + b"\n" + json.dumps({"prompt": "caf", "response": "A"}).encode().replace(
        b"caf", b"caf\xe9") + b"\n")
    with pytest.raises(DataError) as e:
        load_examples(DataConfig(path=str(p)))
    assert str(e.value).startswith(f"{p}:2: not valid UTF-8 (byte 0xe9 at column ") and "\n" not in str(e.value)
    # a UTF-8 byte-order mark on the first line is not an error
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert load_examples(DataConfig(path=str(p)))[0].prompt == json.loads(GOOD)["prompt"]


def test_real_minillm_format():
    from tests.conftest import SHARED

    path = SHARED / "data/minillm_eval/dolly/valid.jsonl"
    ex = load_examples(DataConfig(path=str(path), response_field="output", limit=5))
    assert len(ex) == 5 and ex[0].prompt.endswith("### Response:\n")
