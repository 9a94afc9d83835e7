from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from freevlm.data import load_coco_karpathy, load_image
from freevlm.data import synthetic as syn
from freevlm.data.synthetic import (
    COLOUR_RGB,
    SPLITS,
    SyntheticConfig,
    canonical_caption,
    caption_attribute_recall,
    caption_is_correct,
    caption_meaning,
    corpus_text,
    load_synthetic_captions,
    load_synthetic_nocaps,
    load_synthetic_visdial,
    load_synthetic_vqa,
    parse_caption,
    read_synthetic_config,
    synthetic_paths,
    write_synthetic,
    wrong_captions,
)
from freevlm.errors import FreeVLMError

TINY = SyntheticConfig(seed=3, n_train=12, n_val=5, n_test=7, n_nocaps=6, n_dialogs=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic(TINY, tmp_path_factory.mktemp("synthetic") / "shapes").root


def _all_caption_samples(root):
    return [s for split in SPLITS for s in load_synthetic_captions(root, split)] + load_synthetic_nocaps(root)


def _obj(size, colour, shape, position="left"):
    return {"size": size, "colour": colour, "shape": shape, "position": position, "bbox": [0, 0, 1, 1]}


# --------------------------------------------------------------------------------------------------- determinism


def _snapshot(root):
    paths = synthetic_paths(root)
    files = {p.relative_to(root): p.read_bytes() for p in paths.annotation_files()}
    pixels = {p.relative_to(root): np.asarray(Image.open(p)) for p in sorted((root / "images").rglob("*.png"))}
    return files, pixels


def test_same_seed_gives_identical_files_and_pixels(root, tmp_path):
    files, pixels = _snapshot(root)
    again_files, again_pixels = _snapshot(write_synthetic(TINY, tmp_path / "again").root)
    assert files == again_files
    assert pixels.keys() == again_pixels.keys() and len(pixels) == 12 + 5 + 7 + 3 * 6
    assert all(np.array_equal(pixels[k], again_pixels[k]) for k in pixels)


def test_different_seed_gives_different_data(root, tmp_path):
    files, pixels = _snapshot(root)
    other_files, other_pixels = _snapshot(write_synthetic(replace(TINY, seed=4), tmp_path / "other").root)
    assert pixels.keys() == other_pixels.keys()  # same ids and layout on disk ...
    differing = sum(not np.array_equal(pixels[k], other_pixels[k]) for k in pixels)
    assert differing == len(pixels)  # ... but every image differs (the background noise alone sees to that)
    captions = syn.SyntheticPaths(root).captions("train").relative_to(root)
    assert files[captions] != other_files[captions]


def test_changing_question_count_leaves_images_and_captions_alone(root, tmp_path):
    files, pixels = _snapshot(root)
    other = write_synthetic(replace(TINY, questions_per_image=2), tmp_path / "q2").root
    other_files, other_pixels = _snapshot(other)
    assert all(np.array_equal(pixels[k], other_pixels[k]) for k in pixels)
    captions = syn.SyntheticPaths(root).captions("val").relative_to(root)
    assert files[captions] == other_files[captions]
    assert len(load_synthetic_vqa(other, "val")) == 2 * TINY.n_val


# ------------------------------------------------------------------------------------------------ loaders, counts


def test_loaders_read_back_the_expected_counts(root):
    for split, n in zip(SPLITS, (TINY.n_train, TINY.n_val, TINY.n_test)):
        captions = load_synthetic_captions(root, split)
        assert len(captions) == n
        assert all(len(s.captions) == TINY.captions_per_image for s in captions)
        assert all(s.image_path.parent == root / "images" / split and s.image_path.is_file() for s in captions)
        vqa = load_synthetic_vqa(root, split)
        assert len(vqa) == n * TINY.questions_per_image
        assert Counter(s.image_id for s in vqa) == {s.image_id: TINY.questions_per_image for s in captions}
        assert all(len(s.answers) == 10 for s in vqa)
        assert {s.answer_type for s in vqa} <= {"yes/no", "number", "other"}
    nocaps = load_synthetic_nocaps(root)
    assert Counter(s.domain for s in nocaps) == {"in-domain": 6, "near-domain": 6, "out-domain": 6}
    assert [s.image_id for s in load_synthetic_nocaps(root, "out-domain")] == [
        s.image_id for s in nocaps if s.domain == "out-domain"
    ]
    dialogs = load_synthetic_visdial(root)
    assert len(dialogs) == TINY.n_dialogs * TINY.rounds_per_dialog
    test_ids = [s.image_id for s in load_synthetic_captions(root, "test")]
    assert sorted({s.image_id for s in dialogs}, key=int) == test_ids[: TINY.n_dialogs]


def test_image_ids_are_unique_across_all_splits(root):
    ids = [s.image_id for s in _all_caption_samples(root)]
    assert len(ids) == len(set(ids)) == 12 + 5 + 7 + 18
    assert ids == [str(i) for i in range(1, len(ids) + 1)]


def test_karpathy_file_matches_the_coco_caption_files(root):
    paths = synthetic_paths(root)
    for split in SPLITS:
        coco = load_synthetic_captions(root, split)
        karpathy = load_coco_karpathy(paths.karpathy, root / "images", split)
        assert [(s.image_id, s.image_path, s.captions) for s in karpathy] == [
            (s.image_id, s.image_path, s.captions) for s in coco
        ]


def test_images_are_rgb_of_the_configured_size(root):
    sample = load_synthetic_captions(root, "val")[0]
    assert load_image(sample.image_path).size == (64, 64)


# ---------------------------------------------------------------------------------------- attributes and pixels


def test_attributes_round_trip_and_describe_the_pixels(root):
    attributes = json.loads(synthetic_paths(root).attributes.read_text())
    for sample in _all_caption_samples(root):
        objects = sample.extra["objects"]
        assert objects == attributes[sample.image_id]
        assert TINY.min_objects <= len(objects) <= TINY.max_objects
        pixels = np.asarray(load_image(sample.image_path), dtype=int)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            # the object's colour sits at its centre, within the configured jitter
            assert np.abs(pixels[cy, cx] - COLOUR_RGB[o["colour"]]).max() <= TINY.colour_jitter
            assert o["position"] == syn._position((x0 + x1) / 2, (y0 + y1) / 2, TINY.image_size) or o["shape"] in {
                "triangle",
                "star",
            }  # their bbox centre sits a little above the true centre
        boxes = [o["bbox"] for o in objects]
        for i, a in enumerate(boxes):  # non-overlapping: no pixel of one bbox is the centre of another
            for b in boxes[i + 1 :]:
                assert not (a[0] <= (b[0] + b[2]) / 2 <= a[2] and a[1] <= (b[1] + b[3]) / 2 <= a[3])


def test_canonical_caption_is_the_first_reference(root):
    for sample in _all_caption_samples(root):
        assert sample.captions[0] == canonical_caption(sample.extra["objects"])
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", c) for c in sample.captions)


# ----------------------------------------------------------------------------------------------------- captions


def test_every_reference_caption_is_correct_for_its_image_only(root):
    samples = _all_caption_samples(root)
    for sample in samples:
        assert all(caption_is_correct(c, sample.extra["objects"]) for c in sample.captions)
        assert all(caption_attribute_recall(c, sample.extra["objects"]) == 1.0 for c in sample.captions)
    # an image's caption describes another image only when both hold the same objects
    first = samples[0]
    for other in samples[1:]:
        same = Counter(canonical_caption([o]) for o in other.extra["objects"]) == Counter(
            canonical_caption([o]) for o in first.extra["objects"]
        )
        assert caption_is_correct(first.captions[0], other.extra["objects"]) == same


def test_wrong_captions_are_near_misses_in_the_grammar_and_meanings_ignore_phrasing(root):
    import random

    rng = random.Random(0)
    vocab = set(corpus_text(TINY))
    for sample in _all_caption_samples(root):
        objects = sample.extra["objects"]
        assert len({caption_meaning(c) for c in sample.captions}) == 1  # references differ in phrasing only
        for wrong in wrong_captions(objects, rng, TINY, k=4):
            assert not caption_is_correct(wrong, objects)
            assert set(wrong.split()) <= vocab
            said, truth = Counter(dict(caption_meaning(wrong))), Counter(dict(caption_meaning(sample.captions[0])))
            # one change: one attribute of one object (two objects differ) or one object more or fewer
            assert sum(((said - truth) + (truth - said)).values()) in (1, 2)
    one = [{"size": "small", "colour": "red", "shape": "circle", "position": "left"}]
    single = SyntheticConfig(colours=("red",), shapes=("circle",), sizes=("small",), min_objects=1, max_objects=1)
    with pytest.raises(FreeVLMError, match="allows no wrong caption"):
        wrong_captions(one, rng, single)


def test_caption_is_correct_on_hand_built_objects():
    objects = [_obj("large", "red", "circle", "left"), _obj("small", "blue", "square"), _obj("small", "blue", "square")]
    assert canonical_caption(objects) == "two small blue squares and a large red circle"
    for good in (
        "two small blue squares and a large red circle",
        "there is a large red circle on the left and two small blue squares",
        "we can see 2 small blue squares and one large red circle",
        "a small blue square and a small blue square and a large red circle",
    ):
        assert caption_is_correct(good, objects), good
    for bad in (
        "two small blue squares and a large green circle",  # colour
        "three small blue squares and a large red circle",  # count
        "a small blue square and a large red circle",  # count
        "two small blue triangles and a large red circle",  # shape
        "two large blue squares and a large red circle",  # size
        "two small blue squares",  # omitted object
        "two small blue squares and a large red circle and a small red star",  # invented object
        "two small blue squares and a red circle",  # attribute left out
        "two small blue squares and a large red green circle",  # two colours for one object
        "",
    ):
        assert not caption_is_correct(bad, objects), bad


def test_parse_caption_and_attribute_recall():
    assert parse_caption("there are two small blue squares on the left and a large red circle") == [
        (2, "small", "blue", "square"),
        (1, "large", "red", "circle"),
    ]
    assert parse_caption("red circle and a large") == [(1, None, "red", "circle"), (1, "large", None, None)]
    objects = [_obj("large", "red", "circle"), _obj("small", "blue", "square")]
    assert caption_attribute_recall("a large red circle and a small blue square", objects) == 1.0
    assert caption_attribute_recall("a large green circle", objects) == pytest.approx(2 / 6)
    assert caption_attribute_recall("two small blue squares", objects) == pytest.approx(3 / 6)


# ------------------------------------------------------------------------------------------------------------ VQA


def _true_answer(question: str, objects: list[dict]) -> str:
    """The answer derived independently from the objects; asserts the question picks out exactly one object."""

    def only(matches):
        assert len(matches) == 1, (question, objects)
        return matches[0]

    words = question.split()  # "what color is the [size] <shape>" / "where is the [colour] <shape>"
    if m := re.fullmatch(r"how many (\w+)s are there", question):
        return syn.COUNT_WORDS[sum(o["shape"] == m[1] for o in objects)]
    if m := re.fullmatch(r"is there a (\w+) (\w+)", question):
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"what shape is the (\w+) object", question):
        return only([o for o in objects if o["colour"] == m[1]])["shape"]
    if question.startswith("what color is the"):
        return only([o for o in objects if set(words[4:]) <= {o["shape"], o["size"]}])["colour"]
    assert question.startswith("where is the"), question
    return only([o for o in objects if set(words[3:]) <= {o["shape"], o["colour"]}])["position"]


def test_vqa_answers_are_true_and_noise_is_marked(root):
    kinds = Counter()
    for split in SPLITS:
        for s in load_synthetic_vqa(root, split):
            truth = _true_answer(s.question, s.extra["objects"])
            confident = [a for a, c in zip(s.answers, s.extra["answer_confidences"]) if c == "yes"]
            assert all(a == truth for a in confident)
            noisy = [a for a, c in zip(s.answers, s.extra["answer_confidences"]) if c == "maybe"]
            assert all(a != truth for a in noisy)
            kinds[s.extra["question_type"]] += 1
    assert set(kinds) == {"how many", "is there a", "what shape is the", "what color is the", "where is the"}


def test_every_candidate_question_is_unambiguous_and_answered_truly(root):
    # all questions the generator may ask, not just the few it drew, so rare kinds are covered too
    asked = Counter()
    for split in SPLITS:
        for s in load_synthetic_captions(root, split):
            for kind, questions in syn._candidate_questions(s.extra["objects"], TINY).items():
                for qa in questions:
                    assert _true_answer(qa.question, s.extra["objects"]) == qa.answer
                    asked[kind] += 1
    assert asked["count"] == 3 * 24 and asked["yesno"] == 15 * 24 and min(asked.values()) > 0


def test_each_image_gets_distinct_questions(root):
    by_image: dict[str, list[str]] = {}
    for s in load_synthetic_vqa(root, "train"):
        by_image.setdefault(s.image_id, []).append(s.question)
    assert all(len(set(qs)) == len(qs) == 3 for qs in by_image.values())


def test_answer_noise_zero_gives_ten_identical_answers(tmp_path):
    config = replace(TINY, answer_noise=0.0, n_nocaps=0, n_dialogs=0)
    for s in load_synthetic_vqa(write_synthetic(config, tmp_path / "clean").root, "val"):
        assert s.answers == [s.extra["multiple_choice_answer"]] * 10


# ---------------------------------------------------------------------------------------------- NoCaps, VisDial


def test_nocaps_domains_hold_heldout_words_exactly_where_they_should(root):
    heldout = set(TINY.heldout_shapes) | set(TINY.heldout_colours) | {f"{s}s" for s in TINY.heldout_shapes}
    seen = set(TINY.shapes) | set(TINY.colours) | {f"{s}s" for s in TINY.shapes}
    for split in SPLITS:
        for s in load_synthetic_captions(root, split):
            assert not any(heldout & set(c.split()) for c in s.captions)
    for s in load_synthetic_nocaps(root):
        novel = [
            (o["shape"] in TINY.heldout_shapes) + (o["colour"] in TINY.heldout_colours) for o in s.extra["objects"]
        ]
        for caption in s.captions:
            words = set(caption.split())
            if s.domain == "in-domain":
                assert not words & heldout and novel == [0] * len(novel)
            elif s.domain == "near-domain":
                assert words & heldout and words & seen
                assert sorted(novel) == [0] * (len(novel) - 1) + [1]  # one object, one held-out attribute
            else:
                assert words & heldout and not words & seen and novel == [2] * len(novel)


def test_visdial_rounds_have_100_candidates_and_consistent_history(root):
    dialogs = load_synthetic_visdial(root)
    for i, s in enumerate(dialogs):
        assert len(s.candidates) == 100 and len(set(s.candidates)) == 100
        assert s.round_id == i % TINY.rounds_per_dialog and len(s.history) == s.round_id
        if s.round_id:
            previous = dialogs[i - 1]
            assert s.history[-1] == (previous.question, previous.candidates[previous.gt_index])
        captions = {c.image_id: c for c in load_synthetic_captions(root, "test")}
        assert s.caption == captions[s.image_id].captions[0]
    gt = [s.candidates[s.gt_index] for s in dialogs]
    assert all(a.startswith(("it is", "there", "yes there is", "no there is no")) for a in gt)
    assert len({s.gt_index for s in dialogs}) > 1  # the answer is not always in the same slot


# -------------------------------------------------------------------------------------------------- vocabulary


def test_corpus_text_covers_every_generated_word_and_nothing_else(root):
    vocab = set(corpus_text(TINY))
    used = set()
    for s in _all_caption_samples(root):
        used |= {w for c in s.captions for w in c.split()}
    for split in SPLITS:
        for s in load_synthetic_vqa(root, split):
            used |= set(s.question.split()) | {w for a in s.answers for w in a.split()}
    for s in load_synthetic_visdial(root):
        used |= set(s.question.split()) | {w for c in s.candidates for w in c.split()}
    assert used <= vocab
    assert vocab - used <= {"1", "2", "3", "0", "three", "zero"}  # rare noise variants a tiny dataset may miss


def test_corpus_text_of_the_default_config():
    words = corpus_text(SyntheticConfig())
    assert len(words) == 56 and words == sorted(set(words))
    assert {"star", "stars", "orange", "color", "object", "zero", "2"} <= set(words)


# ---------------------------------------------------------------------------------------- writing and refusing


def test_write_is_idempotent_for_the_same_config(root):
    before = {p: p.stat().st_mtime_ns for p in synthetic_paths(root).annotation_files()}
    assert write_synthetic(TINY, root).root == root
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert read_synthetic_config(root) == TINY


def test_refuses_to_overwrite_a_different_config(root):
    before = synthetic_paths(root).config.read_bytes()
    with pytest.raises(FreeVLMError, match="different config") as excinfo:
        write_synthetic(replace(TINY, n_train=13), root)
    assert "\n" not in str(excinfo.value) and str(root) in str(excinfo.value)
    assert synthetic_paths(root).config.read_bytes() == before


def test_refuses_unrelated_files_and_uses_an_empty_directory(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FreeVLMError, match="is not empty and holds no synthetic dataset"):
        write_synthetic(TINY, occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FreeVLMError, match="is a file"):
        write_synthetic(TINY, a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_synthetic(replace(TINY, n_nocaps=0, n_dialogs=0), empty)
    assert len(load_synthetic_captions(empty, "train")) == 12 and load_synthetic_nocaps(empty) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "occupied"]  # no temp dirs left


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(syn, "_dump", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(TINY, tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_loading_without_a_dataset_or_with_a_bad_split(tmp_path, root):
    with pytest.raises(FreeVLMError, match="no synthetic dataset at .*run write_synthetic first"):
        load_synthetic_captions(tmp_path, "train")
    with pytest.raises(FreeVLMError, match="unknown synthetic split 'dev'"):
        load_synthetic_vqa(root, "dev")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colours": ("red", "teal")}, "colours has \\['teal'\\]"),
        ({"shapes": ("circle", "star")}, "must not also be in-domain"),
        ({"n_dialogs": 8}, "n_dialogs=8 exceeds n_test=7"),
        ({"max_objects": 0}, "min_objects <= max_objects"),
        ({"answer_noise": 1.5}, "answer_noise must be in \\[0, 1\\]"),
    ],
)
def test_bad_configs_are_refused(tmp_path, change, message):
    with pytest.raises(FreeVLMError, match=message):
        write_synthetic(replace(TINY, **change), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_default_config_writes_every_split_at_full_size(tmp_path):
    root = write_synthetic(SyntheticConfig(), tmp_path / "default").root
    assert len(load_synthetic_vqa(root, "train")) == 6000 and len(load_synthetic_visdial(root)) == 300


def test_config_from_lists_equals_config_from_tuples():
    from_yaml = SyntheticConfig(colours=["red", "blue"], sizes=["small"])
    assert from_yaml == SyntheticConfig(colours=("red", "blue"), sizes=("small",))
    assert syn.config_hash(from_yaml) == syn.config_hash(SyntheticConfig(colours=("red", "blue"), sizes=("small",)))
    assert syn.config_hash(from_yaml) != syn.config_hash(SyntheticConfig())
