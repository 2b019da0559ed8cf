"""Dataset readers and image listings on tiny files written in the real formats.

easy-VQA is the one real data set here (installed from PyPI); every other file is written in
tmp_path with a handful of records, shaped exactly like the official releases.
"""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from PIL import Image

from vlpipe.data_manifests import images
from vlpipe.data_manifests.base import AnnotationError, ImageRecord, TextRecord, natural_key
from vlpipe.data_manifests.easy_vqa import easy_vqa_answers, read_easy_vqa
from vlpipe.data_manifests.gqa import read_gqa
from vlpipe.data_manifests.lxmert import image_key_from_lxmert_id, read_lxmert
from vlpipe.data_manifests.nlvr2 import image_keys_from_identifier, read_nlvr2
from vlpipe.data_manifests.registry import (
    IMAGE_DATASETS,
    TEXT_FORMATS,
    list_images,
    read_texts,
)
from vlpipe.data_manifests.vqa import read_vqa


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def keys(records: list[ImageRecord] | list[TextRecord]) -> list[str]:
    return [r.key for r in records]


def raises_annotation(path: Path, *fragments: str) -> AbstractContextManager:
    """pytest.raises for an AnnotationError naming the file, then each fragment in order."""
    pattern = ".*".join(re.escape(text) for text in [path.name, *fragments])
    return pytest.raises(AnnotationError, match=f"(?s){pattern}")


# ---------------------------------------------------------------- image listings


def test_folder_lists_images_recursively_by_relative_key(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "b.png")
    touch(tmp_path, "a/z.JPG", "a/y.jpeg", "a/deep/x.tiff", "c.WebP", "notes.txt", "a/.keep")
    (tmp_path / "bad.jpg").write_text("not an image at all")  # listed: the extractor judges it
    records = images.folder(tmp_path)
    assert keys(records) == ["a/deep/x", "a/y", "a/z", "b", "bad", "c"]
    assert records[1].path == str((tmp_path / "a/y.jpeg").absolute())
    assert keys(images.folder(tmp_path, limit=2)) == ["a/deep/x", "a/y"]
    assert keys(images.folder(tmp_path, split="a")) == ["deep/x", "y", "z"]


def test_folder_follows_symlinked_folders_once(tmp_path: Path) -> None:
    touch(tmp_path / "data", "x.jpg")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(tmp_path / "data", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert keys(images.folder(root)) == ["linked/x"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        images.folder(tmp_path / "missing")
    touch(tmp_path, "x.jpg")
    with pytest.raises(FileNotFoundError, match="val"):
        images.folder(tmp_path, split="val")
    with pytest.raises(ValueError, match="limit"):
        images.folder(tmp_path, limit=-1)
    touch(tmp_path, "x.png")  # two files, one key: refuse rather than pick one
    with pytest.raises(ValueError, match="'x'"):
        images.folder(tmp_path)


def test_coco_2014_and_2017_names(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "train2014/COCO_train2014_000000458752.jpg",
        "train2014/COCO_train2014_000000000009.jpg",
        "train2014/README.txt",
        "train2014/thumbs.jpg",  # not a COCO name: skipped
        "val2017/000000000139.jpg",
        "test2015/COCO_test2015_000000000001.jpg",
    )
    assert keys(images.coco(tmp_path, "train2014")) == ["9", "458752"]  # natural order
    assert keys(images.coco(tmp_path / "train2014", "train2014")) == ["9", "458752"]
    assert keys(images.coco(tmp_path / "train2014", None, limit=1)) == ["9"]
    assert keys(images.coco(tmp_path, "val2017")) == ["139"]
    assert keys(images.coco(tmp_path, "test2015")) == ["1"]
    with pytest.raises(FileNotFoundError, match="val2014"):
        images.coco(tmp_path, "val2014")


def test_vg_and_gqa(tmp_path: Path) -> None:
    touch(tmp_path / "vg", "VG_100K/1.jpg", "VG_100K/10.jpg", "VG_100K_2/2.jpg")
    assert keys(images.vg(tmp_path / "vg", None)) == ["1", "2", "10"]
    with pytest.raises(FileNotFoundError, match="VG_100K"):
        images.vg(tmp_path, None)
    touch(tmp_path / "gqa", "images/2370799.jpg", "images/n161313.jpg")
    assert keys(images.gqa(tmp_path / "gqa", None)) == ["2370799", "n161313"]
    assert keys(images.gqa(tmp_path / "gqa" / "images", None, limit=1)) == ["2370799"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        images.gqa(tmp_path / "nowhere", None)


def test_nlvr2_train_directories_and_flat_dev(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "train/0/train-10171-0-img0.png",
        "train/0/train-10171-0-img1.png",
        "train/99/train-2-1-img0.jpg",
        "dev/dev-850-0-img0.png",
        "dev/dev-850-0-img1.PNG",
    )
    assert keys(images.nlvr2(tmp_path, "train")) == [
        "train-2-1-img0",  # natural order: set 2 before set 10171
        "train-10171-0-img0",
        "train-10171-0-img1",
    ]
    assert keys(images.nlvr2(tmp_path / "dev", "dev")) == ["dev-850-0-img0", "dev-850-0-img1"]
    with pytest.raises(FileNotFoundError, match="test1"):
        images.nlvr2(tmp_path, "test1")


def test_easy_vqa_images_keyed_by_split() -> None:
    train, test = images.easy_vqa(None, "train"), images.easy_vqa(None, "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert {"train/0", "train/3999"} <= set(keys(train))
    assert keys(train)[:3] == ["train/0", "train/1", "train/2"]  # natural order, not train/10
    assert keys(images.easy_vqa(Path(), "train", limit=12))[-1] == "train/11"
    assert keys(train) == sorted(keys(train), key=natural_key)
    assert Path(test[0].path).is_file() and test[0].key == "test/0"
    assert keys(images.easy_vqa(None, "test", limit=3)) == ["test/0", "test/1", "test/2"]
    with pytest.raises(ValueError, match="val"):
        images.easy_vqa(None, "val")


# ---------------------------------------------------------------- VQA v2


def vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    questions = [
        {
            "image_id": 458752,
            "question": "What is this photo taken looking through?",
            "question_id": 458752000,
        },
        {
            "image_id": 458752,
            "question": "What position is this man playing?",
            "question_id": 458752001,
        },
        {"image_id": 262146, "question": "What color is the snow?", "question_id": 262146000},
    ]
    q_path = write_json(
        tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "train2014",
            "license": {},
            "questions": questions,
        },
    )
    annotations = [vqa_annotation(q["question_id"], q["image_id"]) for q in questions]
    a_path = write_json(
        tmp_path / "v2_mscoco_train2014_annotations.json", {"annotations": annotations}
    )
    return q_path, a_path


def vqa_annotation(qid: int, image_id: int) -> dict:
    answers = ["net"] * 9 + ["netting"]
    return {
        "question_type": "what is this",
        "multiple_choice_answer": "net",
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)
        ],
        "image_id": image_id,
        "answer_type": "other",
        "question_id": qid,
    }


def test_vqa_with_annotations(tmp_path: Path) -> None:
    q_path, a_path = vqa_files(tmp_path)
    records = read_vqa(q_path, a_path)
    assert keys(records) == ["458752000", "458752001", "262146000"]  # file order
    first = records[0]
    assert first.image_keys == ("458752",)
    assert first.text == "What is this photo taken looking through?"
    assert first.answers == ("net",) * 9 + ("netting",)
    assert first.extra == {
        "answer_type": "other",
        "question_type": "what is this",
        "multiple_choice_answer": "net",
    }
    assert keys(read_vqa(q_path, a_path, limit=1)) == ["458752000"]


def test_vqa_questions_only(tmp_path: Path) -> None:
    q_path, _ = vqa_files(tmp_path)
    records = read_vqa(q_path)
    assert len(records) == 3 and records[2].answers == () and records[2].extra == {}


def test_vqa_questions_and_annotations_must_match(tmp_path: Path) -> None:
    q_path, a_path = vqa_files(tmp_path)
    data = json.loads(a_path.read_text())
    data["annotations"].append(vqa_annotation(999, 458752))
    write_json(a_path, data)
    with raises_annotation(a_path, "record 999", "no question"):
        read_vqa(q_path, a_path)
    data["annotations"] = data["annotations"][1:3]
    write_json(a_path, data)
    with raises_annotation(q_path, "record 458752000", "no annotation"):
        read_vqa(q_path, a_path)
    data["annotations"] = [vqa_annotation(458752000, 1)] + data["annotations"]
    write_json(a_path, data)
    with raises_annotation(a_path, "record 458752000", "image_id"):
        read_vqa(q_path, a_path)


def test_vqa_malformed(tmp_path: Path) -> None:
    q_path, a_path = vqa_files(tmp_path)
    bad = tmp_path / "questions.json"
    bad.write_text('{"questions": [\n{"image_id": 1,,}]}')
    with raises_annotation(bad, "line 2", "invalid JSON"):
        read_vqa(bad)
    write_json(bad, [{"image_id": 1, "question": "q", "question_id": 1}])
    with raises_annotation(bad, "top level", "questions"):
        read_vqa(bad)
    write_json(bad, {"questions": [{"image_id": 1, "question_id": 7}]})
    with raises_annotation(bad, "record 7", "'question'"):
        read_vqa(bad)
    write_json(bad, {"questions": [{"image_id": 1, "question": "q", "question_id": 7}, {}]})
    with raises_annotation(bad, "record index 1", "question_id"):
        read_vqa(bad)
    write_json(bad, {"questions": [{"image_id": "1", "question": "q", "question_id": 7}]})
    with raises_annotation(bad, "record 7", "image_id", "int"):
        read_vqa(bad)
    data = json.loads(a_path.read_text())
    data["annotations"][1]["answers"][3] = {"answer": None}
    write_json(a_path, data)
    with raises_annotation(a_path, "record 458752001", "answer"):
        read_vqa(q_path, a_path)


def test_vqa_duplicate_question_id(tmp_path: Path) -> None:
    q = {"image_id": 1, "question": "q", "question_id": 5}
    path = write_json(tmp_path / "q.json", {"questions": [q, q]})
    with raises_annotation(path, "record 5", "duplicate"):
        read_vqa(path)


# ---------------------------------------------------------------- GQA


def gqa_question(image_id: str, answer: str | None = None) -> dict:
    question = {
        "imageId": image_id,
        "question": "Is the sky dark?",
        "isBalanced": True,
        "semantic": [{"operation": "select", "dependencies": [], "argument": "sky"}],
        "groups": {"global": None, "local": "06-sky_dark"},
        "equivalent": ["20"],
    }
    if answer is not None:
        question.update(
            answer=answer,
            fullAnswer=f"{answer.capitalize()}, the sky is dark.",
            types={"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
        )
    return question


def test_gqa_balanced_questions(tmp_path: Path) -> None:
    data = {"20": gqa_question("2354786", "yes"), "05515938": gqa_question("n161313", "no")}
    path = write_json(tmp_path / "val_balanced_questions.json", data)
    records = read_gqa(path)
    assert keys(records) == ["20", "05515938"]
    assert records[1].image_keys == ("n161313",) and records[1].answers == ("no",)
    assert records[0].text == "Is the sky dark?"
    assert records[0].extra == {
        "fullAnswer": "Yes, the sky is dark.",
        "structural": "verify",
        "semantic": "attr",
        "detailed": "verifyAttr",
        "balanced": True,
        "steps": 1,  # "select: sky"; the null global group is not kept
    }
    assert keys(read_gqa(path, limit=1)) == ["20"]


def test_gqa_test_split_has_no_answers(tmp_path: Path) -> None:
    path = write_json(tmp_path / "test_balanced_questions.json", {"201": gqa_question("n1")})
    (record,) = read_gqa(path)
    assert record.answers == () and "fullAnswer" not in record.extra and not record.labelled


def test_gqa_malformed(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train_balanced_questions.json", [gqa_question("1")])
    with raises_annotation(path, "top level", "questionId"):
        read_gqa(path)
    broken = gqa_question("1", "yes")
    del broken["imageId"]
    write_json(path, {"20": gqa_question("1"), "21": broken})
    with raises_annotation(path, "record 21", "imageId"):
        read_gqa(path)
    write_json(path, {"22": {**gqa_question("1"), "answer": 3}})
    with raises_annotation(path, "record 22", "answer", "str"):
        read_gqa(path)
    write_json(path, {"23": "Is the sky dark?"})
    with raises_annotation(path, "record 23", "JSON object"):
        read_gqa(path)


# ---------------------------------------------------------------- NLVR2


def nlvr2_line(identifier: str, label: str = "True", **more: object) -> str:
    item = {
        "identifier": identifier,
        "sentence": "One image shows exactly two dogs.",
        "label": label,
        "left_url": "http://x/l.jpg",
        "right_url": "http://x/r.jpg",
        "synset": "n02110063",
        "query": "malamute12",
        "extra_validations": {},
        **more,
    }
    return json.dumps(item)


def test_nlvr2_jsonl(tmp_path: Path) -> None:
    lines = [
        nlvr2_line("train-10171-0-0", directory=51),
        "",
        nlvr2_line("train-10171-0-1", "False"),
    ]
    path = tmp_path / "train.json"
    path.write_text("\n".join(lines) + "\n")
    records = read_nlvr2(path)
    assert keys(records) == ["train-10171-0-0", "train-10171-0-1"]
    assert records[0].image_keys == ("train-10171-0-img0", "train-10171-0-img1")
    assert records[0].answers == ("True",) and records[1].answers == ("False",)
    assert records[0].extra == {"directory": "51"} and records[1].extra == {}
    assert keys(read_nlvr2(path, limit=1)) == ["train-10171-0-0"]


def test_nlvr2_image_keys_match_listing(tmp_path: Path) -> None:
    touch(tmp_path, "dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png")
    path = tmp_path / "dev.json"
    path.write_text(nlvr2_line("dev-850-0-0") + "\n" + nlvr2_line("dev-850-0-3") + "\n")
    listed = set(keys(images.nlvr2(tmp_path, "dev")))
    assert all(set(r.image_keys) == listed for r in read_nlvr2(path))
    assert image_keys_from_identifier("test1-0-1-0") == ("test1-0-1-img0", "test1-0-1-img1")
    with pytest.raises(ValueError, match="dev-850-0"):
        image_keys_from_identifier("dev-850-0")


def test_nlvr2_malformed_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "dev.json"
    good = nlvr2_line("dev-1-0-0")
    cases = [
        (good + "\n" + '{"identifier": "dev-1-0-1",', "line 2", "invalid JSON"),
        (good + "\n\n" + nlvr2_line("dev-1-0-1", "maybe"), "line 3 (dev-1-0-1)", "label"),
        (nlvr2_line("dev-1-0") + "\n", "line 1 (dev-1-0)", "split-set-pair-sentence"),
        ('["dev-1-0-0"]\n', "line 1", "JSON object"),
        ('{"identifier": "dev-1-0-0", "label": "True"}\n', "line 1", "sentence"),
        (good + "\n" + good + "\n", "line 2", "repeats line 1"),
    ]
    for text, where, reason in cases:
        path.write_text(text)
        with raises_annotation(path, where, reason):
            read_nlvr2(path)
    path.write_bytes(good.encode() + b"\n" + b'{"sentence": "caf\xe9"}\n')
    with raises_annotation(path, "line 2", "UTF-8"):
        read_nlvr2(path)


# ---------------------------------------------------------------- LXMERT json


def test_image_key_from_lxmert_id() -> None:
    assert image_key_from_lxmert_id("COCO_train2014_000000458752") == "458752"
    assert image_key_from_lxmert_id("COCO_val2014_000000000042") == "42"
    assert image_key_from_lxmert_id("COCO_test2015_000000262144") == "262144"
    for unchanged in ("2370799", "n161313", "dev-850-0-img0", "000123", "COCO_x"):
        assert image_key_from_lxmert_id(unchanged) == unchanged


def test_one_coco_name_rule_for_files_lxmert_ids_and_imports() -> None:
    from vlpipe.data_manifests.images import coco_image_id
    from vlpipe.extract.interop import infer_id_format

    assert coco_image_id("COCO_val2014_000000262148") == 262148
    assert coco_image_id("000000262148") == 262148  # 2017 file names
    assert coco_image_id("000000262148", prefixed=True) is None  # a GQA id stays as it is
    for other in ("n161313", "COCO_x", "dev-850-0-img0", "COCO_val2014_"):
        assert coco_image_id(other) is None
    assert infer_id_format("COCO_val2014_000000262148", verbatim=False) == (
        "COCO_val2014_{num:012d}"
    )
    assert infer_id_format("2370799", verbatim=False) == "{key}"


def test_lxmert_vqa_and_gqa_json(tmp_path: Path) -> None:
    vqa = [
        {
            "answer_type": "other",
            "img_id": "COCO_val2014_000000393225",
            "label": {"pine": 0.3, "tree": 1},
            "question_id": 393225000,
            "question_type": "what type of",
            "sent": "What kind of tree is this?",
        },
        {"img_id": "COCO_test2015_000000000001", "question_id": 1000, "sent": "Is it?"},
    ]
    records = read_lxmert(write_json(tmp_path / "minival.json", vqa))
    assert keys(records) == ["393225000", "1000"]
    assert records[0].image_keys == ("393225",)
    assert records[0].label == {"pine": 0.3, "tree": 1.0}
    assert records[0].answers == ("pine", "tree")
    assert records[0].extra == {
        "labelled": True,
        "answer_type": "other",
        "question_type": "what type of",
    }
    assert records[1].answers == () and records[1].label == {} and not records[1].labelled
    gqa = [{"img_id": "n161313", "label": {"no": 1.0}, "question_id": "05515938", "sent": "Is?"}]
    (record,) = read_lxmert(write_json(tmp_path / "testdev.json", gqa), limit=5)
    assert (record.key, record.image_keys, record.answers) == ("05515938", ("n161313",), ("no",))


def test_lxmert_keys_match_coco_listing(tmp_path: Path) -> None:
    touch(tmp_path, "val2014/COCO_val2014_000000393225.jpg")
    item = {"img_id": "COCO_val2014_000000393225", "question_id": 1, "sent": "?", "label": {}}
    (record,) = read_lxmert(write_json(tmp_path / "minival.json", [item]))
    assert record.image_keys == tuple(keys(images.coco(tmp_path, "val2014")))


def test_lxmert_malformed(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    item = {"img_id": "2354786", "question_id": "7", "sent": "Is?", "label": {"yes": 1.0}}
    cases = [
        ({"questions": [item]}, "top level", "list"),
        ([item, {**item, "question_id": "8", "label": {"yes": "1"}}], "record 8", "yes"),
        ([item, {**item, "question_id": "9", "sent": None}], "record 9", "sent"),
        ([item, {"sent": "Is?"}], "record index 1", "question_id"),
        ([item, {**item, "img_id": 2354786}], "record 7", "img_id"),
        ([item, item], "record 7", "duplicate"),
    ]
    for data, where, reason in cases:
        write_json(path, data)
        with raises_annotation(path, where, reason):
            read_lxmert(path)


# ---------------------------------------------------------------- easy-VQA (real data)


def test_easy_vqa_questions() -> None:
    train, test = read_easy_vqa("train"), read_easy_vqa("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert train[0].key == "train/q0" and test[-1].key == "test/q9672"
    answers = easy_vqa_answers()
    assert len(answers) == 13 and {"yes", "no", "circle"} <= set(answers)
    assert all(len(r.answers) == 1 and r.answers[0] in answers for r in train)
    listed = set(keys(images.easy_vqa(None, "train")))
    assert {k for r in train for k in r.image_keys} <= listed
    assert keys(read_easy_vqa("test", limit=2)) == ["test/q0", "test/q1"]
    with pytest.raises(ValueError, match="val"):
        read_easy_vqa("val")
    by_type = {}
    for r in test:
        by_type.setdefault(r.extra["answer_type"], set()).add(r.answers[0])
    assert by_type["yes/no"] == {"yes", "no"}
    assert by_type["shape"] == {"circle", "rectangle", "triangle"}
    assert len(by_type["color"]) == 8 and set(by_type) == {"yes/no", "shape", "color"}


# ---------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(IMAGE_DATASETS) == {"folder", "coco", "vg", "gqa", "nlvr2", "easy-vqa", "vcr"}
    assert set(TEXT_FORMATS) == {"vqa", "gqa", "nlvr2", "lxmert", "easy-vqa", "vcr"}
    with pytest.raises(ValueError, match="unknown image dataset 'imagenet'.*coco, easy-vqa"):
        list_images("imagenet", Path("."))
    with pytest.raises(ValueError, match="unknown text format 'coco'.*easy-vqa, gqa"):
        read_texts("coco", [])


def test_registry_reads_every_format(tmp_path: Path) -> None:
    q_path, a_path = vqa_files(tmp_path)
    assert len(read_texts("vqa", [q_path, a_path], "train2014")[0].answers) == 10
    assert read_texts("vqa", [q_path], None, limit=2)[1].answers == ()
    gqa = write_json(tmp_path / "gqa.json", {"1": gqa_question("n1", "no")})
    assert keys(read_texts("gqa", [gqa])) == ["1"]
    nlvr2 = tmp_path / "dev.json"
    nlvr2.write_text(nlvr2_line("dev-1-0-0"))
    assert keys(read_texts("nlvr2", [str(nlvr2)], "dev")) == ["dev-1-0-0"]
    lxmert = write_json(tmp_path / "lx.json", [{"img_id": "1", "question_id": 2, "sent": "?"}])
    assert keys(read_texts("lxmert", [lxmert])) == ["2"]
    assert keys(read_texts("easy-vqa", [], "test", limit=1)) == ["test/q0"]


def test_registry_argument_errors(tmp_path: Path) -> None:
    q_path, a_path = vqa_files(tmp_path)
    with pytest.raises(ValueError, match="questions.json"):
        read_texts("vqa", [q_path, a_path, a_path])
    with pytest.raises(ValueError, match="exactly one file"):
        read_texts("gqa", [q_path, a_path])
    with pytest.raises(ValueError, match="no files"):
        read_texts("easy-vqa", [q_path], "train")
    with pytest.raises(ValueError, match="split"):
        read_texts("easy-vqa", [], None)
    with pytest.raises(ValueError, match="root"):
        list_images("coco", None, "val2014")


def test_registry_lists_every_dataset(tmp_path: Path) -> None:
    touch(tmp_path, "val2014/COCO_val2014_000000000042.jpg", "VG_100K/5.jpg", "images/n1.jpg")
    touch(tmp_path, "dev/dev-1-0-img0.png")
    assert keys(list_images("coco", tmp_path, "val2014")) == ["42"]
    assert keys(list_images("vg", tmp_path)) == ["5"]
    assert keys(list_images("gqa", str(tmp_path))) == ["n1"]
    assert keys(list_images("nlvr2", tmp_path, "dev")) == ["dev-1-0-img0"]
    assert len(list_images("folder", tmp_path)) == 4
    assert keys(list_images("easy-vqa", None, "train", limit=1)) == ["train/0"]
