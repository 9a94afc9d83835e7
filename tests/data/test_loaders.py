"""Each loader on a small file written here in its dataset's official format, with one good and one corrupt image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from freevlm.data import (
    check_images,
    load_coco_captions,
    load_coco_karpathy,
    load_gqa,
    load_image,
    load_nocaps,
    load_visdial,
    load_vizwiz,
    load_vqa,
)
from freevlm.errors import FreeVLMError


def _dump(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _images(root: Path, good: str, corrupt: str) -> tuple[Path, Path]:
    """A valid PNG and a file of garbage, under root."""
    (root / good).parent.mkdir(parents=True, exist_ok=True)
    (root / corrupt).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / good, format="PNG")
    (root / corrupt).write_bytes(b"\x89PNG but not really")
    return root / good, root / corrupt


# ------------------------------------------------------------------------------------------------- format fixtures


def karpathy_fixture(tmp: Path):
    images = tmp / "coco"
    good, bad = _images(images, "train2014/COCO_train2014_000000000009.jpg", "val2014/COCO_val2014_000000000042.jpg")
    ann = _dump(
        {
            "dataset": "coco",
            "images": [
                {
                    "filepath": "train2014",
                    "filename": good.name,
                    "imgid": 0,
                    "split": "train",
                    "sentences": [{"raw": "A dog on a couch. ", "tokens": ["a"]}, {"raw": "a brown dog"}],
                    "cocoid": 9,
                },
                {
                    "filepath": "val2014",
                    "filename": bad.name,
                    "imgid": 1,
                    "split": "restval",
                    "sentences": [{"raw": "Two cats."}],
                    "cocoid": 42,
                },
                {"filepath": "val2014", "filename": "x.jpg", "imgid": 2, "split": "test", "sentences": [], "cocoid": 7},
            ],
        },
        tmp / "dataset_coco.json",
    )
    return ann, images, lambda a: load_coco_karpathy(a, images, "train"), bad


def coco_fixture(tmp: Path):
    images = tmp / "val2014"
    good, bad = _images(images, "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg")
    ann = _dump(
        {
            "info": {},
            "images": [
                {"id": 1, "file_name": good.name},
                {"id": 2, "file_name": bad.name},
                {"id": 3, "file_name": "c"},
            ],
            "annotations": [
                {"image_id": 2, "id": 10, "caption": "A cat.\n"},
                {"image_id": 1, "id": 11, "caption": "a plane"},
                {"image_id": 2, "id": 12, "caption": " two cats"},
            ],
        },
        tmp / "captions_val2014.json",
    )
    return ann, images, lambda a: load_coco_captions(a, images), bad


def nocaps_fixture(tmp: Path):
    images = tmp / "nocaps"
    good, bad = _images(images, "0013ea2087020901.jpg", "00223ec4e1c6d0cb.jpg")
    ann = _dump(
        {
            "licenses": [],
            "images": [
                {"id": 0, "file_name": good.name, "domain": "in-domain", "open_images_id": "0013ea2087020901"},
                {"id": 1, "file_name": bad.name, "domain": "out-domain", "open_images_id": "00223ec4e1c6d0cb"},
                {"id": 2, "file_name": "n.jpg", "domain": "near-domain"},
            ],
            "annotations": [
                {"image_id": 1, "id": 0, "caption": "a jellyfish"},
                {"image_id": 0, "id": 1, "caption": "a man"},
                {"image_id": 2, "id": 2, "caption": "a lynx"},
            ],
        },
        tmp / "nocaps_val_4500_captions.json",
    )
    return ann, images, lambda a: load_nocaps(a, images), bad


def vqa_fixture(tmp: Path):
    images = tmp / "val2014"
    good, bad = _images(images, "COCO_val2014_000000000042.jpg", "COCO_val2014_000000393225.jpg")
    questions = _dump(
        {
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 42, "question": "What is on the table?", "question_id": 42000},
                {"image_id": 393225, "question": "How many cats?", "question_id": 393225001},
            ],
        },
        tmp / "v2_OpenEnded_mscoco_val2014_questions.json",
    )
    answers = ["2"] * 8 + ["two", "3"]
    _dump(
        {
            "data_subtype": "val2014",
            "annotations": [
                {
                    "question_id": 393225001,
                    "image_id": 393225,
                    "question_type": "how many",
                    "answer_type": "number",
                    "multiple_choice_answer": "2",
                    "answers": [
                        {"answer": a, "answer_confidence": "yes" if i else "maybe", "answer_id": i + 1}
                        for i, a in enumerate(answers)
                    ],
                },
                {
                    "question_id": 42000,
                    "image_id": 42,
                    "question_type": "what is on the",
                    "answer_type": "other",
                    "multiple_choice_answer": "pizza",
                    "answers": [{"answer": "pizza", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                },
            ],
        },
        tmp / "v2_mscoco_val2014_annotations.json",
    )
    return questions, images, lambda q: load_vqa(q, images, tmp / "v2_mscoco_val2014_annotations.json"), bad


def gqa_fixture(tmp: Path):
    images = tmp / "gqa_images"
    good, bad = _images(images, "n161313.jpg", "2354786.jpg")
    ann = _dump(
        {
            "20968379": {
                "imageId": "n161313",
                "question": "Is the sky dark?",
                "answer": "yes",
                "fullAnswer": "Yes, the sky is dark.",
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
            },
            "07333408": {"imageId": "2354786", "question": "What is on the white wall?"},
        },
        tmp / "testdev_balanced_questions.json",
    )
    return ann, images, lambda a: load_gqa(a, images), bad


def vizwiz_fixture(tmp: Path):
    images = tmp / "vizwiz_val"
    good, bad = _images(images, "VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg")
    ann = _dump(
        [
            {
                "image": good.name,
                "question": "Ok. There is another picture I hope it is a better one.",
                "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 9
                + [{"answer": "cannot tell", "answer_confidence": "maybe"}],
                "answer_type": "unanswerable",
                "answerable": 0,
            },
            {
                "image": bad.name,
                "question": "What color is this?",
                "answers": [{"answer": "blue", "answer_confidence": "yes"}] * 10,
                "answer_type": "other",
                "answerable": 1,
            },
        ],
        tmp / "val.json",
    )
    return ann, images, lambda a: load_vizwiz(a, images), bad


def visdial_fixture(tmp: Path):
    images = tmp / "VisualDialog_val2018"
    good, bad = _images(images, "VisualDialog_val2018_000000000185.jpg", "VisualDialog_val2018_000000284024.jpg")
    options = [3, 0, 1, 2]  # 4 options stand for VisDial's 100: the loader does not fix the count
    ann = _dump(
        {
            "version": "1.0",
            "split": "val2018",
            "data": {
                "questions": ["is it sunny", "how many people", "any animals"],
                "answers": ["yes", "two", "no", "i can't tell"],
                "dialogs": [
                    {
                        "image_id": 185,
                        "caption": "a man riding a horse",
                        "dialog": [
                            {"question": 0, "answer": 0, "answer_options": options, "gt_index": 1},
                            {"question": 1, "answer": 1, "answer_options": options, "gt_index": 2},
                            {"question": 2, "answer": 2, "answer_options": options, "gt_index": 3},
                        ],
                    },
                    {
                        "image_id": 284024,
                        "caption": "a kitchen",
                        "dialog": [{"question": 2, "answer": 3, "answer_options": [2, 3], "gt_index": 1}],
                    },
                ],
            },
        },
        tmp / "visdial_1.0_val.json",
    )
    return ann, images, lambda a: load_visdial(a, images), bad


FIXTURES = {
    "karpathy": karpathy_fixture,
    "coco": coco_fixture,
    "nocaps": nocaps_fixture,
    "vqa": vqa_fixture,
    "gqa": gqa_fixture,
    "vizwiz": vizwiz_fixture,
    "visdial": visdial_fixture,
}


# --------------------------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("name", FIXTURES)
def test_missing_annotation_file_is_one_line_error_naming_it(tmp_path, name):
    ann, _, load, _ = FIXTURES[name](tmp_path)
    missing = ann.with_name("missing.json")
    with pytest.raises(FreeVLMError) as excinfo:
        load(missing)
    message = str(excinfo.value)
    assert "\n" not in message and message.endswith(f"not found: {missing}")


@pytest.mark.parametrize("name", FIXTURES)
def test_loaders_do_not_open_images_and_load_image_names_the_corrupt_one(tmp_path, name):
    ann, _, load, bad = FIXTURES[name](tmp_path)
    samples = [s for s in load(ann) if s.image_path.exists()]
    assert len({s.image_path for s in samples}) == 2  # the good image and the corrupt one
    check_images(samples)
    loaded = [s for s in samples if s.image_path != bad]
    assert load_image(loaded[0].image_path).size == (8, 8)
    with pytest.raises(FreeVLMError) as excinfo:
        load_image(bad)
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"corrupt image {bad}: ")


@pytest.mark.parametrize("name", FIXTURES)
def test_image_paths_are_absolute_even_for_a_relative_root(tmp_path, name, monkeypatch):
    ann, images, _, _ = FIXTURES[name](tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = images.relative_to(tmp_path)
    load = {
        "karpathy": lambda: load_coco_karpathy(ann, relative, "train"),
        "coco": lambda: load_coco_captions(ann, relative),
        "nocaps": lambda: load_nocaps(ann, relative),
        "vqa": lambda: load_vqa(ann, relative),
        "gqa": lambda: load_gqa(ann, relative),
        "vizwiz": lambda: load_vizwiz(ann, relative),
        "visdial": lambda: load_visdial(ann, relative),
    }[name]
    paths = [s.image_path for s in load()]
    assert paths and all(p.is_absolute() and images in p.parents for p in paths)


# ------------------------------------------------------------------------------------------------- per format


def test_karpathy_splits_and_fields(tmp_path):
    ann, images, _, _ = karpathy_fixture(tmp_path)
    train = load_coco_karpathy(ann, images, "train")
    assert [s.image_id for s in train] == ["9", "42"]
    assert train[0].captions == ["A dog on a couch.", "a brown dog"]
    assert train[0].image_path == images / "train2014" / "COCO_train2014_000000000009.jpg"
    assert train[1].extra == {"split": "restval"} and train[1].domain is None
    assert [s.image_id for s in load_coco_karpathy(ann, images, "train", restval_in_train=False)] == ["9"]
    assert [s.image_id for s in load_coco_karpathy(ann, images, "restval")] == ["42"]
    test = load_coco_karpathy(ann, images, "test")
    assert [(s.image_id, s.captions) for s in test] == [("7", [])]
    assert load_coco_karpathy(ann, images, "val") == []
    with pytest.raises(FreeVLMError, match=r"unknown Karpathy split 'dev'"):
        load_coco_karpathy(ann, images, "dev")


def test_karpathy_without_cocoid_uses_imgid_and_missing_key_is_named(tmp_path):
    ann = _dump(
        {"images": [{"filename": "1.jpg", "imgid": 5, "split": "test", "sentences": [{"raw": "x"}]}]},
        tmp_path / "dataset_flickr8k.json",
    )
    (sample,) = load_coco_karpathy(ann, tmp_path, "test")
    assert sample.image_id == "5" and sample.image_path == tmp_path / "1.jpg"
    bad = _dump({"images": [{"filename": "1.jpg", "imgid": 5, "split": "test"}]}, tmp_path / "bad.json")
    with pytest.raises(FreeVLMError) as excinfo:
        load_coco_karpathy(bad, tmp_path, "test")
    assert str(excinfo.value) == f"{bad}: missing key 'sentences' at images[0]"


def test_coco_captions_join_annotations_in_file_order(tmp_path):
    ann, images, _, _ = coco_fixture(tmp_path)
    samples = load_coco_captions(ann, images)
    assert [(s.image_id, s.captions) for s in samples] == [
        ("1", ["a plane"]),
        ("2", ["A cat.", "two cats"]),
        ("3", []),
    ]
    assert samples[1].image_path == images / "COCO_val2014_000000000002.jpg"


def test_coco_captions_malformed(tmp_path):
    no_ann = _dump({"images": [{"id": 1, "file_name": "a.jpg"}]}, tmp_path / "a.json")
    with pytest.raises(FreeVLMError, match=r"a\.json: missing key 'annotations' at the top level$"):
        load_coco_captions(no_ann, tmp_path)
    stray = _dump(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "id": 1, "caption": "x"}]},
        tmp_path / "b.json",
    )
    with pytest.raises(FreeVLMError, match=r"b\.json: annotations\[0\] refers to image_id 9"):
        load_coco_captions(stray, tmp_path)
    no_file_name = _dump({"images": [{"id": 1}], "annotations": []}, tmp_path / "c.json")
    with pytest.raises(FreeVLMError, match=r"c\.json: missing key 'file_name' at images\[0\]$"):
        load_coco_captions(no_file_name, tmp_path)


def test_nocaps_domains_and_filter(tmp_path):
    ann, images, _, _ = nocaps_fixture(tmp_path)
    samples = load_nocaps(ann, images)
    assert [(s.image_id, s.domain, s.captions) for s in samples] == [
        ("0", "in-domain", ["a man"]),
        ("1", "out-domain", ["a jellyfish"]),
        ("2", "near-domain", ["a lynx"]),
    ]
    assert samples[0].extra == {"open_images_id": "0013ea2087020901"}
    assert [s.image_id for s in load_nocaps(ann, images, "near-domain")] == ["2"]
    with pytest.raises(FreeVLMError, match=r"unknown NoCaps domain 'far-domain'"):
        load_nocaps(ann, images, "far-domain")


def test_nocaps_test_file_without_annotations_is_unlabelled(tmp_path):
    ann = _dump(
        {"images": [{"id": 4500, "file_name": "a.jpg", "domain": "out-domain"}, {"id": 4501, "file_name": "b.jpg"}]},
        tmp_path / "nocaps_test_image_info.json",
    )
    with pytest.raises(FreeVLMError) as excinfo:
        load_nocaps(ann, tmp_path)
    assert str(excinfo.value) == f"{ann}: missing key 'domain' at images[1]"
    ann = _dump({"images": [{"id": 4500, "file_name": "a.jpg", "domain": "out-domain"}]}, ann)
    (sample,) = load_nocaps(ann, tmp_path)
    assert (sample.image_id, sample.captions, sample.domain) == ("4500", [], "out-domain")


def test_vqa_with_and_without_annotations(tmp_path):
    questions, images, _, _ = vqa_fixture(tmp_path)
    labelled = load_vqa(questions, images, tmp_path / "v2_mscoco_val2014_annotations.json")
    assert [(s.question_id, s.image_id, s.question) for s in labelled] == [
        ("42000", "42", "What is on the table?"),
        ("393225001", "393225", "How many cats?"),
    ]
    cats = labelled[1]
    assert cats.image_path == images / "COCO_val2014_000000393225.jpg"  # from data_subtype
    assert cats.answers == ["2"] * 8 + ["two", "3"] and cats.answer_type == "number"
    assert cats.extra == {
        "multiple_choice_answer": "2",
        "question_type": "how many",
        "answer_confidences": ["maybe"] + ["yes"] * 9,
    }
    unlabelled = load_vqa(questions, images)
    assert [s.answers for s in unlabelled] == [[], []] and unlabelled[0].answer_type is None
    custom = load_vqa(questions, tmp_path, image_pattern="okvqa/{image_id}.png")
    assert custom[0].image_path == tmp_path / "okvqa" / "42.png"


def test_vqa_malformed(tmp_path):
    questions, images, _, _ = vqa_fixture(tmp_path)
    partial = _dump({"annotations": []}, tmp_path / "partial.json")
    with pytest.raises(FreeVLMError, match=r"partial\.json: no annotation for question_id 42000"):
        load_vqa(questions, images, partial)
    no_subtype = _dump({"questions": []}, tmp_path / "q.json")
    with pytest.raises(FreeVLMError, match=r"q\.json: no 'data_subtype' to name images by; pass image_pattern"):
        load_vqa(no_subtype, images)
    wrong = _dump({"question": []}, tmp_path / "w.json")
    with pytest.raises(FreeVLMError, match=r"w\.json: missing key 'questions' at the top level$"):
        load_vqa(wrong, images)
    with pytest.raises(FreeVLMError, match=r"bad image_pattern"):
        load_vqa(questions, images, image_pattern="{id}.jpg")


def test_gqa(tmp_path):
    ann, images, _, _ = gqa_fixture(tmp_path)
    first, second = load_gqa(ann, images)
    assert (first.question_id, first.image_id, first.question, first.answers) == (
        "20968379",
        "n161313",
        "Is the sky dark?",
        ["yes"],
    )
    assert first.image_path == images / "n161313.jpg"
    assert first.extra["full_answer"] == "Yes, the sky is dark." and first.extra["types"]["structural"] == "verify"
    assert (second.question_id, second.answers, second.extra) == ("07333408", [], {})
    bad = _dump({"1": {"question": "q"}}, tmp_path / "bad.json")
    with pytest.raises(FreeVLMError, match=r"bad\.json: missing key 'imageId' at question 1$"):
        load_gqa(bad, images)


def test_vizwiz(tmp_path):
    ann, images, _, _ = vizwiz_fixture(tmp_path)
    first, second = load_vizwiz(ann, images)
    assert (first.question_id, first.image_id, first.answerable, first.answer_type) == (
        "VizWiz_val_00000000",
        "VizWiz_val_00000000",
        False,
        "unanswerable",
    )
    assert first.answers == ["unanswerable"] * 9 + ["cannot tell"] and len(second.answers) == 10
    assert second.answerable is True and second.question == "What color is this?"
    assert second.image_path == images / "VizWiz_val_00000001.jpg"
    test = _dump([{"image": "VizWiz_test_00000003.jpg", "question": "What is this?"}], tmp_path / "test.json")
    (unlabelled,) = load_vizwiz(test, images)
    assert (unlabelled.question_id, unlabelled.answers, unlabelled.answerable) == ("VizWiz_test_00000003", [], None)


def test_visdial_rounds_history_and_candidates(tmp_path):
    ann, images, _, _ = visdial_fixture(tmp_path)
    samples = load_visdial(ann, images)
    assert [(s.image_id, s.round_id) for s in samples] == [("185", 0), ("185", 1), ("185", 2), ("284024", 0)]
    third = samples[2]
    assert third.image_path == images / "VisualDialog_val2018_000000000185.jpg"
    assert third.caption == "a man riding a horse" and third.question == "any animals"
    assert third.history == [("is it sunny", "yes"), ("how many people", "two")]
    assert third.candidates == ["i can't tell", "yes", "two", "no"]
    assert third.candidates[third.gt_index] == "no"
    assert samples[0].history == [] and samples[0].candidates[samples[0].gt_index] == "yes"
    assert samples[3].candidates == ["no", "i can't tell"] and samples[3].gt_index == 1


def test_visdial_test_split_has_one_unlabelled_round_per_dialog(tmp_path):
    ann = _dump(
        {
            "version": "1.0",
            "split": "test2018",
            "data": {
                "questions": ["q0", "q1", "q2"],
                "answers": ["a0", "a1", "a2"],
                "dialogs": [
                    {
                        "image_id": 7,
                        "caption": "c",
                        "round_id": 3,
                        "dialog": [
                            {"question": 0, "answer": 1},
                            {"question": 1, "answer": 0},
                            {"question": 2, "answer_options": [0, 1, 2]},
                        ],
                    }
                ],
            },
        },
        tmp_path / "visdial_1.0_test.json",
    )
    (sample,) = load_visdial(ann, tmp_path)
    assert sample.image_path == tmp_path / "VisualDialog_test2018_000000000007.jpg"
    assert (sample.round_id, sample.question, sample.gt_index) == (2, "q2", None)
    assert sample.history == [("q0", "a1"), ("q1", "a0")] and sample.candidates == ["a0", "a1", "a2"]


def test_visdial_malformed(tmp_path):
    ann, images, _, _ = visdial_fixture(tmp_path)
    data = json.loads(ann.read_text())
    data["split"] = "train"
    train = _dump(data, tmp_path / "visdial_1.0_train.json")
    with pytest.raises(FreeVLMError, match=r"cannot name images of split 'train' by default; pass image_pattern"):
        load_visdial(train, images)
    assert load_visdial(train, images, "COCO_train2014_{image_id:012d}.jpg")[0].image_path.name == (
        "COCO_train2014_000000000185.jpg"
    )
    data["data"]["dialogs"][0]["dialog"][1]["answer"] = 9
    out_of_range = _dump(data, tmp_path / "oor.json")
    with pytest.raises(FreeVLMError, match=r"oor\.json: dialogs\[0\]\.dialog\[1\] has answer index 9 outside the 4"):
        load_visdial(out_of_range, images, "{image_id}.jpg")
    del data["data"]["dialogs"]
    no_dialogs = _dump(data, tmp_path / "nod.json")
    with pytest.raises(FreeVLMError, match=r"nod\.json: missing key 'dialogs' at 'data'$"):
        load_visdial(no_dialogs, images, "{image_id}.jpg")
