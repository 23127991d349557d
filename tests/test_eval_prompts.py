"""Prompt sources of ``diffaccel eval``: every format read into exact records, every bad input refused
with its file and line, before any model work."""

from __future__ import annotations

import json

import pytest

from diffaccel.errors import DiffaccelError
from diffaccel.evaluation.prompts import PromptFileError, PromptRecord, load_prompts
from diffaccel.shapeworld import eval_prompts, parse_prompt


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_list_of_strings():
    assert load_prompts(["a red circle", " two blue squares "]) == [
        PromptRecord("a red circle"),
        PromptRecord("two blue squares"),
    ]


def test_text_file_skips_blank_lines_and_comments(tmp_path):
    path = _write(tmp_path, "p.txt", "# header\na red circle\n\n   \n  # indented comment\ntwo blue squares  \n")
    assert load_prompts(path) == [PromptRecord("a red circle"), PromptRecord("two blue squares")]
    assert load_prompts(str(path)) == load_prompts(path)


def test_jsonl_prompt_seed_and_metadata(tmp_path):
    lines = [
        {"prompt": "a photo of a bench", "tag": "single_object", "include": [{"class": "bench", "count": 1}]},
        {"prompt": "two cats", "seed": 7, "tag": "counting"},
    ]
    path = _write(tmp_path, "geneval.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = load_prompts(path)
    assert [(r.prompt, r.seed) for r in records] == [("a photo of a bench", None), ("two cats", 7)]
    assert records[0].metadata == {"tag": "single_object", "include": ({"class": "bench", "count": 1},)}
    assert dict(records[1].metadata) == {"tag": "counting"}
    with pytest.raises(TypeError):
        records[0].metadata["include"][0]["count"] = 2  # read-only all the way down


def test_csv_prompt_and_seed_columns(tmp_path):
    path = _write(tmp_path, "p.csv", "prompt,seed,style\na red circle,3,flat\n\"a blue, big square\",,\n")
    records = load_prompts(path)
    assert [(r.prompt, r.seed, dict(r.metadata)) for r in records] == [
        ("a red circle", 3, {"style": "flat"}),
        ("a blue, big square", None, {}),
    ]


def test_drawbench_csv(tmp_path):
    path = _write(tmp_path, "drawbench.csv", "\ufeffPrompts,Category\nA red colored car.,Colors\nThree cats.,Counting\n")
    assert [(r.prompt, dict(r.metadata)) for r in load_prompts(path)] == [
        ("A red colored car.", {"category": "Colors"}),
        ("Three cats.", {"category": "Counting"}),
    ]


def test_partiprompts_tsv(tmp_path):
    path = _write(tmp_path, "parti.tsv", "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n")
    assert [(r.prompt, dict(r.metadata)) for r in load_prompts(path)] == [
        ("bond", {"category": "Abstract", "challenge": "Basic"})
    ]


@pytest.mark.parametrize("kind", ["single", "count", "relation", "motion"])
def test_shapeworld_builtin_sets(kind):
    records = load_prompts(f"shapeworld:{kind}:train:5")
    assert [r.prompt for r in records] == eval_prompts(kind, 5, split="train")
    assert all(r.seed is None and dict(r.metadata) == {"set": "shapeworld", "kind": kind, "split": "train"} for r in records)
    for record in records:
        parse_prompt(record.prompt)  # every prompt is a ShapeWorld prompt the verifier can score


def test_shapeworld_defaults_are_heldout_and_64():
    records = load_prompts("shapeworld:single")
    assert [r.prompt for r in records] == eval_prompts("single", 64, split="heldout")
    assert load_prompts("shapeworld:single:heldout") == records
    assert load_prompts("shapeworld:single:3") == records[:3]


def test_prompt_record_checks_its_fields():
    with pytest.raises(ValueError, match="seed"):
        PromptRecord("a red circle", seed=-1)
    with pytest.raises(ValueError, match="prompt"):
        PromptRecord("  ")


@pytest.mark.parametrize(
    ("name", "text", "where", "what"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "a", \n', ":2:", "bad JSON"),
        ("nofield.jsonl", '{"prompt": "ok"}\n\n{"text": "a red circle"}\n', ":3:", "no 'prompt' field"),
        ("notobj.jsonl", '["a red circle"]\n', ":1:", "JSON object"),
        ("empty.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', ":2:", "empty prompt"),
        ("nonstr.jsonl", '{"prompt": 5}\n', ":1:", "must be a string"),
        ("floatseed.jsonl", '{"prompt": "a", "seed": 1.5}\n', ":1:", "seed"),
        ("strseed.jsonl", '{"prompt": "a", "seed": "3"}\n', ":1:", "seed"),
        ("negseed.jsonl", '{"prompt": "a", "seed": -2}\n', ":1:", "seed"),
        ("boolseed.jsonl", '{"prompt": "a", "seed": true}\n', ":1:", "seed"),
        ("nocolumn.csv", "text,seed\na red circle,1\n", ":1:", "prompt column"),
        ("twocolumns.csv", "prompt,Prompts\na,b\n", ":1:", "several"),
        ("emptycell.csv", "prompt,seed\na red circle,1\n,2\n", ":3:", "empty prompt"),
        ("badseed.csv", "prompt,seed\na red circle,1\nb,x\n", ":3:", "seed"),
        ("negseed.csv", "prompt,seed\na,-1\n", ":2:", "seed"),
        ("extra.csv", "prompt\na,b\n", ":2:", "more cells"),
        ("blank.txt", "\n# only a comment\n\n", "", "no prompts"),
        ("empty.csv", "prompt,seed\n", "", "no prompts"),
        ("prompts.json", '["a"]', "", "unknown prompt file type"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, where, what):
    path = _write(tmp_path, name, text)
    with pytest.raises(PromptFileError, match=what) as info:
        load_prompts(path)
    assert str(info.value).startswith(f"{path}{where}")
    assert isinstance(info.value, DiffaccelError)


def test_multiline_csv_record_reports_its_last_line(tmp_path):
    path = _write(tmp_path, "multi.csv", 'prompt,seed\n"a red\ncircle",1\n"a blue\nsquare",x\n')
    with pytest.raises(PromptFileError, match="seed") as info:
        load_prompts(path)
    assert str(info.value).startswith(f"{path}:5:")


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "absent.txt")


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("shapeworld:spiral", "unknown built-in prompt set 'shapeworld:spiral'"),
        ("shapeworld:single:test", "N must be an integer"),
        ("shapeworld:single:heldout:0", "N must be an integer >= 1"),
        ("shapeworld:single:train:4:x", "unexpected 'x'"),
    ],
)
def test_bad_builtin_sets(source, what):
    with pytest.raises(PromptFileError, match=what):
        load_prompts(source)


def test_bad_lists():
    with pytest.raises(PromptFileError, match=r"prompts\[1\]: empty prompt"):
        load_prompts(["a red circle", ""])
    with pytest.raises(PromptFileError, match=r"prompts\[0\]: the prompt must be a string"):
        load_prompts([3])
    with pytest.raises(PromptFileError, match="empty"):
        load_prompts([])


def test_builtin_sets_can_join_kinds():
    records = load_prompts("shapeworld:single+relation:train:3")
    assert [r.prompt for r in records] == eval_prompts("single", 3, split="train") + eval_prompts("relation", 3, split="train")
    assert [r.metadata["kind"] for r in records] == ["single"] * 3 + ["relation"] * 3
    with pytest.raises(PromptFileError, match="unknown built-in prompt set"):
        load_prompts("shapeworld:single+single")
