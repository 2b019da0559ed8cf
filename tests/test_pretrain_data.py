"""Pre-training data: the sentence sources (every format, detection, VQA pairing, errors) and
the QA answer table built from their labels. Tiny files in the real layouts, written here."""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from vlpipe.data_manifests import pretrain
from vlpipe.data_manifests.base import AnnotationError
from vlpipe.data_manifests.pretrain import (
    Sentence,
    detect_format,
    read_coco_captions,
    read_lxmert_pretrain,
    read_sources,
)
from vlpipe.errors import ConfigError, InputError
from vlpipe.fusion.answer_tables import (
    AnswerList,
    build_pretrain_table,
    qa_label_ids,
    read_answer_list,
)


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def raises_annotation(path: Path, *fragments: str) -> AbstractContextManager:
    """pytest.raises for an AnnotationError naming the file, then each fragment in order."""
    pattern = ".*".join(re.escape(text) for text in [path.name, *fragments])
    return pytest.raises(AnnotationError, match=f"(?s){pattern}")


# ---------------------------------------------------------------- the formats, tiny


def lxmert_image(img_id: str, captions: int = 2, with_qa: bool = True) -> dict:
    """One item of LXMERT's mscoco_train.json: captions under "mscoco", questions under "vqa"."""
    sentf: dict = {"mscoco": [f"caption {i} of {img_id}" for i in range(captions)]}
    labelf: dict = {}
    if with_qa:
        sentf["vqa"] = ["How many dogs?", "What color is the cat?"]
        labelf["vqa"] = [{"2": 1.0, "two": 0.3}, {"Grey.": 0.9, "white": 0.3}]
    return {"img_id": img_id, "labelf": labelf, "sentf": sentf}


def lxmert_pretrain_file(tmp_path: Path, name: str = "mscoco_train.json") -> Path:
    items = [lxmert_image("COCO_train2014_000000000009"), lxmert_image("2354786", 1, False)]
    return write_json(tmp_path / name, items)


def coco_captions_file(tmp_path: Path, images: int = 1) -> Path:
    data = {
        "info": {"description": "COCO 2014 Dataset"},
        "images": [
            {"id": 9 + i, "file_name": f"COCO_train2014_{9 + i:012}.jpg"} for i in range(images)
        ],
        "licenses": [],
        "annotations": [
            {"image_id": 9, "id": 48, "caption": "A plate of food."},
            {"image_id": 9, "id": 67, "caption": "A meal on a tray.\n"},
        ],
    }
    return write_json(tmp_path / "captions_train2014.json", data)


def vqa_files(tmp_path: Path, questions: int = 2) -> tuple[Path, Path]:
    items = [
        {"image_id": 9, "question": f"Question {i}?", "question_id": 9000 + i}
        for i in range(questions)
    ]
    q_path = write_json(
        tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json",
        {"info": {}, "task_type": "Open-Ended", "license": {}, "questions": items},
    )
    answers = ["net"] * 9 + ["netting"]
    annotations = [
        {
            "question_type": "what is",
            "multiple_choice_answer": "net",
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            "image_id": item["image_id"],
            "answer_type": "other",
            "question_id": item["question_id"],
        }
        for item in items
    ]
    a_path = write_json(
        tmp_path / "v2_mscoco_train2014_annotations.json",
        {"info": {}, "license": {}, "annotations": annotations},
    )
    return q_path, a_path


def gqa_file(tmp_path: Path, questions: int = 1) -> Path:
    data = {
        f"0293015{i}": {"imageId": "2354786", "question": "Is the sky dark?", "answer": "yes"}
        for i in range(questions)
    }
    return write_json(tmp_path / "train_balanced_questions.json", data)


def lxmert_questions_file(tmp_path: Path) -> Path:
    items = [
        {
            "answer_type": "other",
            "img_id": "COCO_val2014_000000393225",
            "label": {"pine": 0.3, "tree": 1},
            "question_id": 393225000,
            "question_type": "what type of",
            "sent": "What kind of tree is this?",
        },
        {"img_id": "n161313", "label": {"no": 1.0}, "question_id": "05515938", "sent": "Is it?"},
        {"img_id": "n161313", "question_id": "05515939", "sent": "Unlabelled?"},
    ]
    return write_json(tmp_path / "minival.json", items)


# ---------------------------------------------------------------- readers


def test_lxmert_pretrain_one_sentence_per_image_category_index(tmp_path: Path) -> None:
    sentences = read_lxmert_pretrain(lxmert_pretrain_file(tmp_path))
    assert [s.key for s in sentences] == [
        "COCO_train2014_000000000009_mscoco_000",  # LXMERT's make_uid
        "COCO_train2014_000000000009_mscoco_001",
        "COCO_train2014_000000000009_vqa_000",
        "COCO_train2014_000000000009_vqa_001",
        "2354786_mscoco_000",
    ]
    assert {s.image_key for s in sentences[:4]} == {"9"}  # the coco listing's key
    assert sentences[4].image_key == "2354786"
    assert sentences[0] == Sentence(
        "COCO_train2014_000000000009_mscoco_000",
        "9",
        "caption 0 of COCO_train2014_000000000009",
        "mscoco",
        None,
    )
    # labels stay raw (normalised by the answer table) and align with their sentences
    assert sentences[3].text == "What color is the cat?"
    assert sentences[3].label == {"Grey.": 0.9, "white": 0.3}
    assert sentences[3].category == "vqa"


def bad_items() -> list[tuple[dict, str]]:
    good = lxmert_image("COCO_train2014_000000000009")
    return [
        ({"sentf": {}, "labelf": {}}, "missing or null field 'img_id'"),
        ({**good, "sentf": None}, "'sentf'"),
        ({k: v for k, v in good.items() if k != "labelf"}, "'labelf'"),
        ({**good, "labelf": {"vqa": [{"2": 1.0}]}}, "1 labels for 2 sentences"),
        ({**good, "labelf": {"vqa": [{}, {}, {}]}}, "3 labels for 2 sentences"),
        ({**good, "labelf": {"vqa": [{"2": "1.0"}, {}]}}, "score of '2' is not a number"),
        ({**good, "labelf": {"vqa": [{}, {"yes": True}]}}, "score of 'yes' is not a number"),
        ({**good, "labelf": {"vqa": [{}, ["2"]]}}, "expected {answer: score}"),
        ({**good, "labelf": {"vqa": {}}}, "labelf['vqa'] should be a list"),
        ({**good, "labelf": {"gqa": []}}, "labelf category 'gqa' is not in sentf"),
        ({**good, "sentf": {**good["sentf"], "mscoco": ["ok", 3]}}, "sentf['mscoco'] should be"),
    ]


@pytest.mark.parametrize("item, reason", bad_items())
def test_lxmert_pretrain_malformed_names_file_and_item(
    tmp_path: Path, item: dict, reason: str
) -> None:
    path = write_json(tmp_path / "mscoco_train.json", [lxmert_image("1"), item])
    where = "index 1" if "img_id" in reason else "index 1 (img_id COCO_train2014_000000000009)"
    with raises_annotation(path, where, reason):
        read_lxmert_pretrain(path)


def test_lxmert_pretrain_top_level_and_duplicate_image(tmp_path: Path) -> None:
    path = write_json(tmp_path / "vgnococo.json", {"img_id": "1"})
    with raises_annotation(path, "top level", "expected a list of images"):
        read_lxmert_pretrain(path)
    path = write_json(tmp_path / "vgnococo.json", [lxmert_image("1"), lxmert_image("1")])
    with raises_annotation(path, "index 1 (img_id 1)", "duplicate img_id"):
        read_lxmert_pretrain(path)


def test_coco_captions(tmp_path: Path) -> None:
    sentences = read_coco_captions(coco_captions_file(tmp_path))
    assert sentences == [
        Sentence("caption:48", "9", "A plate of food.", "caption", None),
        Sentence("caption:67", "9", "A meal on a tray.\n", "caption", None),
    ]
    path = write_json(tmp_path / "c.json", {"annotations": [{"id": 5, "image_id": 9}]})
    with raises_annotation(path, "index 0 (id 5)", "missing or null field 'caption'"):
        read_coco_captions(path)


def test_question_formats_become_sentences(tmp_path: Path) -> None:
    gqa, lxmert = gqa_file(tmp_path), lxmert_questions_file(tmp_path)
    sentences = read_sources([str(gqa), str(lxmert), "easy-vqa:test"], limit=2)
    assert sentences[0] == Sentence(
        "gqa:02930150", "2354786", "Is the sky dark?", "gqa", {"yes": 1.0}
    )
    # LXMERT's json: VQA records carry answer_type, GQA ones not; labels are its own scores
    assert sentences[1] == Sentence(
        "vqa:393225000", "393225", "What kind of tree is this?", "vqa", {"pine": 0.3, "tree": 1.0}
    )
    assert (sentences[2].key, sentences[2].category, sentences[2].label) == (
        "gqa:05515938",
        "gqa",
        {"no": 1.0},
    )
    easy = sentences[3:]
    assert [(s.key, s.image_key, s.category) for s in easy] == [
        ("easy-vqa:test/q0", "test/0", "easy-vqa"),
        ("easy-vqa:test/q1", "test/0", "easy-vqa"),
    ]
    assert all(len(s.label) == 1 and list(s.label.values()) == [1.0] for s in easy)
    (unlabelled,) = read_sources([str(lxmert)])[2:]
    assert unlabelled.label is None


# ---------------------------------------------------------------- detection


def every_format(tmp_path: Path) -> dict[str, Path]:
    q_path, a_path = vqa_files(tmp_path)
    return {
        "lxmert-pretrain": lxmert_pretrain_file(tmp_path),
        "lxmert": lxmert_questions_file(tmp_path),
        "coco-captions": coco_captions_file(tmp_path),
        "vqa-questions": q_path,
        "vqa-annotations": a_path,
        "gqa": gqa_file(tmp_path),
    }


def test_detect_format_by_content(tmp_path: Path) -> None:
    for name, path in every_format(tmp_path).items():
        renamed = path.rename(tmp_path / f"{name}.data")  # the name plays no part
        assert detect_format(renamed) == name


def test_detection_reads_only_the_head_of_question_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Multi-GB question files are parsed once, by their reader, not for detection too."""
    q_path, a_path = vqa_files(tmp_path, questions=40)
    files = {
        "vqa-questions": q_path,
        "vqa-annotations": a_path,
        "gqa": gqa_file(tmp_path, questions=30),
        "lxmert": write_json(
            tmp_path / "l.json", [{"sent": "Q?", "question_id": i} for i in range(90)]
        ),
        "lxmert-pretrain": write_json(
            tmp_path / "p.json", [lxmert_image(str(i)) for i in range(20)]
        ),
    }
    monkeypatch.setattr(pretrain, "_HEAD_CHARS", 800)
    assert all(path.stat().st_size > 1600 for path in files.values())

    def no_full_parse(path: object) -> None:
        raise AssertionError(f"{path} parsed whole")

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "load_json", no_full_parse)
        assert {name: detect_format(path) for name, path in files.items()} == {
            name: name for name in files
        }
    # COCO's image list comes before its captions: that one needs the whole file
    coco = coco_captions_file(tmp_path, images=30)
    assert coco.stat().st_size > 1600 and detect_format(coco) == "coco-captions"


def test_undetectable_files_name_the_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "instances_train2014.json", {"images": [], "annotations": []})
    with pytest.raises(InputError, match=r"instances_train2014\.json: not a known pre-training"):
        detect_format(path)
    (tmp_path / "feats.tsv").write_text("img_id\t1\t2\n")
    with raises_annotation(tmp_path / "feats.tsv", "invalid JSON"):
        detect_format(tmp_path / "feats.tsv")
    with pytest.raises(InputError, match=r"missing\.json: no such file"):
        read_sources([str(tmp_path / "missing.json")])


def test_forced_format(tmp_path: Path) -> None:
    gqa = gqa_file(tmp_path)
    assert [s.key for s in read_sources([f"gqa:{gqa}"])] == ["gqa:02930150"]
    with raises_annotation(gqa, "top level", "expected a list of images"):
        read_sources([f"lxmert-pretrain:{gqa}"])
    with pytest.raises(ConfigError, match=r"unknown source format 'vqa'; known: lxmert-pretrain"):
        read_sources([f"vqa:{gqa}"])
    with pytest.raises(ConfigError, match="easy-vqa split must be 'train' or 'test'"):
        read_sources(["easy-vqa:val"])


# ---------------------------------------------------------------- read_sources


def test_vqa_questions_paired_with_the_annotations_after_them(tmp_path: Path) -> None:
    q_path, a_path = vqa_files(tmp_path)
    paired = read_sources([str(q_path), str(a_path)])
    assert [(s.key, s.image_key, s.category) for s in paired] == [
        ("vqa:9000", "9", "vqa"),
        ("vqa:9001", "9", "vqa"),
    ]
    assert paired[0].label == {"net": 1.0, "netting": 0.3}  # BUTD soft scores of 10 answers
    assert [s.label for s in read_sources([str(q_path)])] == [None, None]


@pytest.mark.parametrize("order", [["a"], ["gqa", "a"], ["q", "a", "a"]])
def test_annotations_without_their_questions(tmp_path: Path, order: list[str]) -> None:
    q_path, a_path = vqa_files(tmp_path)
    paths = {"q": q_path, "a": a_path, "gqa": gqa_file(tmp_path)}
    with pytest.raises(ConfigError, match=rf"{a_path.name}: a VQA annotations file must directly"):
        read_sources([str(paths[name]) for name in order])


def test_limit_per_entry_after_the_whole_file_is_checked(tmp_path: Path) -> None:
    entries = [str(lxmert_pretrain_file(tmp_path)), str(coco_captions_file(tmp_path))]
    assert [s.key for s in read_sources(entries, limit=1)] == [
        "COCO_train2014_000000000009_mscoco_000",
        "caption:48",
    ]
    bad = write_json(tmp_path / "bad.json", [lxmert_image("1"), {"img_id": "2"}])
    with raises_annotation(bad, "index 1 (img_id 2)", "'sentf'"):
        read_sources([str(bad)], limit=1)


def test_duplicate_keys_across_entries_name_both(tmp_path: Path) -> None:
    path = str(lxmert_pretrain_file(tmp_path))
    copy = str(lxmert_pretrain_file(tmp_path, "copy.json"))
    with pytest.raises(InputError, match=r"in both .*mscoco_train\.json and .*copy\.json"):
        read_sources([path, copy], limit=1)
    with pytest.raises(InputError, match=r"mscoco_train\.json and .*mscoco_train\.json"):
        read_sources([path, path])
    # the same VQA question from the VQA files and from LXMERT's json has one key
    q_path, a_path = vqa_files(tmp_path)
    lxmert = write_json(
        tmp_path / "train.json",
        [
            {
                "img_id": "COCO_train2014_000000000009",
                "question_id": 9001,
                "sent": "Question 1?",
                "label": {"net": 1.0},
                "answer_type": "other",
            }
        ],
    )
    pattern = r"'vqa:9001' is in both .*questions\.json \+ .*annotations\.json and .*train\.json"
    with pytest.raises(InputError, match=pattern):
        read_sources([str(q_path), str(a_path), str(lxmert)])


# ---------------------------------------------------------------- answer table


def test_pretrain_table_normalises_counts_per_sentence_and_orders() -> None:
    labels = [
        {"Two": 1.0, "2": 0.3},  # one sentence: "2" counted once
        {"two": 0.6, "the man": 0.3},
        {"grey.": 1.0, "Man": 0.3},
        None,  # a caption
        {"gray": 0.3, "a woman": 1.0},
        {},
    ]
    table = build_pretrain_table(labels)
    assert table == AnswerList("built from the data", ["2", "gray", "man", "woman"], True)
    assert build_pretrain_table(labels, min_count=2).answers == ["2", "gray", "man"]
    assert build_pretrain_table(iter(labels), min_count=3).answers == []
    with pytest.raises(ConfigError, match="min_count"):
        build_pretrain_table(labels, min_count=0)


def test_qa_label_ids_drop_unknown_answers_and_keep_the_max() -> None:
    table = build_pretrain_table([{"2": 1.0}, {"2": 1.0}, {"man": 1.0}])
    assert table.answers == ["2", "man"]
    assert qa_label_ids({"zebra": 1.0, "The man": 0.3, "two": 0.6, "2": 0.3}, table) == (
        [1, 0],
        [0.3, 0.6],
    )
    assert qa_label_ids({"zebra": 1.0}, table) == ([], [])
    assert qa_label_ids(None, table) == ([], [])


def test_all_ans_json_table_with_qa_label_ids(tmp_path: Path) -> None:
    """LXMERT's data/lxmert/all_ans.json: the list index is the QA head's row."""
    all_ans = [
        {"ans": "yes", "dsets": ["vqa", "gqa", "visual7w"]},
        {"ans": "2", "dsets": ["vqa", "visual7w"]},
        {"ans": "gray", "dsets": ["vqa", "gqa"]},
        {"ans": "man", "dsets": ["gqa"]},
    ]
    table = read_answer_list(write_json(tmp_path / "all_ans.json", all_ans))
    assert table.pretraining and table.answers == ["yes", "2", "gray", "man"]
    sentences = read_lxmert_pretrain(lxmert_pretrain_file(tmp_path))
    assert [qa_label_ids(s.label, table) for s in sentences[1:4]] == [
        ([], []),  # a caption
        ([1], [1.0]),  # "2" and "two" are one class
        ([2], [0.9]),  # "Grey." -> "gray"; "white" is not in the table
    ]
    # a fine-tuning list (label2ans) is looked up as is: no normalisation
    exact = read_answer_list(write_json(tmp_path / "label2ans.json", ["two", "2"]))
    assert qa_label_ids({"Two": 1.0, "two": 0.3, "2": 0.6}, exact) == ([0, 1], [0.3, 0.6])
