"""Examples from jsonl: bad input names file, line and field."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DataConfig
from pipeline.data.records import DataError, load_examples


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


def test_sources_appended_with_a_prompt_template(tmp_path):
    """Dolly dev + GSM8K train as one training set: each source keeps its own fields and limit; GSM8K's prompt is
    the evaluation suite's Alpaca template filled with its question."""
    from pipeline.config import load_config
    from pipeline.evaluate.suites import ALPACA

    dolly = jsonl(tmp_path, [json.dumps({"prompt": "P1", "output": "R1"}), json.dumps({"prompt": "P2", "output": "R2"})])
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({"path": str(dolly), "response_field": "output", "also": [
        {"path": str(gsm), "prompt_template": ALPACA.format("{question}"), "response_field": "answer", "limit": 2}]}))
    cfg = load_config(DataConfig, cfg_file)
    ex = load_examples(cfg)
    assert [e.id for e in ex] == ["train:1", "train:2", "gsm:1", "gsm:2"]
    assert ex[2].prompt == ALPACA.format("q0") and ex[2].response == "a0" and ex[1].prompt == "P2"
    # a row without a field the template names: file, line and field
    gsm.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"gsm\.jsonl:2: missing field 'question' \(named in data.prompt_template\)"):
        load_examples(cfg)
    # the same file name twice: ids collide, the error says how to fix it
    with pytest.raises(DataError, match="duplicate id 'train:1'.*different file names"):
        load_examples(DataConfig(path=str(dolly), response_field="output",
                                 also=[DataConfig(path=str(dolly), response_field="output")]))
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="named fields"):
        DataConfig(path="x", prompt_template="no fields")


def test_quick_checks_see_every_source(tmp_path):
    """The up-to-date checks of stage 1 and 2 look at every source file: a changed GSM8K file is not missed."""
    from pipeline.config import DistillConfig, ModelRef, TeacherCacheConfig
    from pipeline.stamps import distill_inputs, teacher_cache_key

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(GOOD + "\n")
    b.write_text(GOOD + "\n")
    data = DataConfig(path=str(a), also=[DataConfig(path=str(b))])
    cfg = TeacherCacheConfig(data=data, teacher=ModelRef(path=str(tmp_path)), out_dir=str(tmp_path / "c"))
    key = teacher_cache_key(cfg)
    b.write_text(GOOD + "\n" + GOOD + "\n")
    assert teacher_cache_key(cfg) != key
    d = DistillConfig(student=ModelRef(path=str(tmp_path)), out_dir=str(tmp_path), data=data)
    assert b in distill_inputs(d)
