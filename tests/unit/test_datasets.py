"""Dataset loading (JSONL, Parquet, a saved Hugging Face dataset) with errors naming file and
row, and the resumable prompt sampler."""

from __future__ import annotations

import json

import pytest

from nemo_igrpo.data.datasets import PromptSampler, load_problems
from nemo_igrpo.utils.errors import DataError

ROWS = [{"question": f"q{i}", "final": str(i), "level": i % 3} for i in range(10)]


def test_jsonl_custom_keys_and_extra_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    probs = load_problems(p, "question", "final")
    assert [x.prompt for x in probs][:2] == ["q0", "q1"] and probs[3].answer == "3"
    assert probs[4].extra == {"level": 1}


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"question": "a", "final": "1"}\n{"question": "b"}\n', "line 2: missing field 'final'"),
        ('{"question": "a", "final": "1"}\nnot json\n', "line 2: not valid JSON"),
        ('{"question": "", "final": "1"}\n', "line 1: field 'question'"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        load_problems(p, "question", "final")
    assert str(p) in str(e.value) and needle in str(e.value)


def test_parquet_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert len(load_problems(p, "question", "final")) == 10
    with pytest.raises(DataError) as e:
        load_problems(p, "problem", "final")
    assert "row 0: missing field 'problem'" in str(e.value) and "data.prompt_key" in str(e.value)


def test_hf_dataset_dir_with_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:6]), "test": datasets.Dataset.from_list(ROWS[6:])}
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    assert len(load_problems(tmp_path / "hf", "question", "final", split="train")) == 6
    assert len(load_problems(tmp_path / "hf", "question", "final", split="test")) == 4
    with pytest.raises(DataError) as e:
        load_problems(tmp_path / "hf", "question", "final", split="validation")
    assert "split 'validation' not found" in str(e.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        load_problems(tmp_path / "nope.jsonl", "q", "a")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported dataset format"):
        load_problems(tmp_path / "x.csv", "q", "a")


def test_sampler_resumes_the_same_order_across_epochs(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    probs = load_problems(p, "question", "final")
    a = PromptSampler(probs, 4, seed=5)
    straight = [[x.index for x in a.next_batch()] for _ in range(6)]  # crosses 2 epoch boundaries
    b = PromptSampler(probs, 4, seed=5)
    first = [[x.index for x in b.next_batch()] for _ in range(3)]
    c = PromptSampler(probs, 4, seed=5)
    c.load_state_dict(b.state_dict())
    rest = [[x.index for x in c.next_batch()] for _ in range(3)]
    assert first + rest == straight
    epoch0 = sorted(i for batch in straight[:2] for i in batch) + sorted(straight[2][:2])
    assert sorted(epoch0) == list(range(10))  # every problem once per epoch
    assert straight != [[x.index for x in PromptSampler(probs, 4, seed=6).next_batch()] for _ in range(6)]
    with pytest.raises(DataError, match="prompts_per_step"):
        PromptSampler(probs, 11, seed=0)


# --- bad input a new user brings: encodings, structured prompts, where a problem came from ---


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    good = '{"question": "q", "final": "1"}\n'
    # Line 3 was saved as Latin-1 ("é" is the single byte 0xe9), a common export mistake.
    p.write_bytes(good.encode() * 2 + '{"question": "caf\u00e9?", "final": "2"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_problems(p, "question", "final")
    msg = str(e.value)
    assert (
        msg.startswith(f"{p}: line 3: not valid UTF-8") and "0xe9" in msg and "character 18" in msg
    )  # 17 characters precede it
    assert "\n" not in msg


def test_utf8_with_byte_order_mark_loads(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + '{"question": "caf\u00e9?", "final": "1"}\n'.encode())
    assert load_problems(p, "question", "final")[0].prompt == "caf\u00e9?"


@pytest.mark.parametrize(
    "value, kind",
    [
        ({"text": "q"}, "a dict, expected a string"),
        ([{"role": "user", "content": "q"}], "a list, expected a string (a chat message list is not supported"),
        (True, "a bool, expected a string"),
    ],
)
def test_structured_prompt_is_rejected_naming_file_row_and_field(tmp_path, value, kind):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"question": "fine", "final": "1"}) + "\n\n" + json.dumps({"question": value, "final": "2"}) + "\n"
    )
    with pytest.raises(DataError) as e:
        load_problems(p, "question", "final")
    assert str(e.value).startswith(f"{p}: line 3: field 'question' (data.prompt_key) is {kind}")


def test_structured_prompt_in_parquet_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": ["a"], "final": "1"}]), p)
    with pytest.raises(DataError, match=r"d.parquet: row 0: field 'question' \(data.prompt_key\) is a list"):
        load_problems(p, "question", "final")


def test_numeric_prompt_is_kept_as_text(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": 12, "final": "1"}) + "\n")
    assert load_problems(p, "question", "final")[0].prompt == "12"


def test_problem_location_is_the_file_line_not_the_position(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    probs = load_problems(p, "question", "final")
    assert [x.index for x in probs] == [0, 1]  # positions: sampler order, seeds
    assert [x.location for x in probs] == [f"{p}: line 2", f"{p}: line 4"]
    from nemo_igrpo.data.datasets import Problem

    assert Problem(3, "q", "a").location == "problem 3"  # built in code: no file to name


def test_unreadable_parquet_is_a_data_error(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read as Parquet"):
        load_problems(p, "question", "final")
