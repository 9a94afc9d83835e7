"""Caption metrics: the official COCO scorer (pycocoevalcap) and a Java-free fast path for threshold sweeps.

Scale: every number is on pycocoevalcap's native scale, i.e. BLEU-n / METEOR / ROUGE-L / SPICE are fractions in
[0, 1] and CIDEr (CIDEr-D, pycocoevalcap already multiplies by 10) lies in [0, 10]. The paper's tables print all of
them x100 (B@4 41.7, CIDEr 139.8); `to_percent` converts a result dict to that scale for printing. We keep the native
scale in results so they compare 1:1 with any pycocoevalcap/LAVIS log.

`caption_metrics` reproduces `pycocoevalcap.eval.COCOEvalCap` (PTB tokenisation of both sides, then the scorers) on
plain dicts, without a COCO annotation file. `fast_caption_metrics` runs the same BLEU and CIDEr scorer classes on a
simple in-process tokenisation, for sweeps where starting a JVM per point is too slow.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from freevlm.errors import FreeVLMError


@dataclass(frozen=True)
class MetricInfo:
    """What a number means: direction, how per-sample values combine, and its scale.

    aggregation: "mean" -- the set's value is the mean of per-sample values, so shards can be combined by a
    count-weighted mean; "corpus" -- computed from statistics of the whole set at once (BLEU's pooled n-gram counts,
    METEOR's pooled alignment statistics, CIDEr's IDF), so shard values must NOT be averaged: rescore the union.
    """

    name: str
    higher_is_better: bool
    aggregation: Literal["mean", "corpus"]
    scale: str  # the range of the returned value; paper tables print x100


CAPTION_METRICS: dict[str, MetricInfo] = {
    **{f"BLEU-{n}": MetricInfo(f"BLEU-{n}", True, "corpus", "[0, 1]; paper prints x100") for n in range(1, 5)},
    "METEOR": MetricInfo("METEOR", True, "corpus", "[0, 1]; paper prints x100"),
    "ROUGE-L": MetricInfo("ROUGE-L", True, "mean", "[0, 1]; paper prints x100"),
    # CIDEr is a mean of per-image scores, but each score depends on the whole set through the IDF.
    "CIDEr": MetricInfo("CIDEr", True, "corpus", "[0, 10] (pycocoevalcap's x10 included); paper prints x100"),
    "SPICE": MetricInfo("SPICE", True, "mean", "[0, 1]; paper prints x100"),
}

JAVA_MISSING = (
    "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run a JVM): install a JRE, "
    "e.g. apt-get install default-jre"
)
# The two jars pycocoevalcap's get_stanford_models() would download (from the CoreNLP 2015-12-09 zip) into spice/lib.
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def to_percent(metrics: Mapping[str, float]) -> dict[str, float]:
    """Multiply every value by 100: the scale the paper's tables use (BLEU-4 0.417 -> 41.7, CIDEr 1.398 -> 139.8)."""
    return {k: 100.0 * float(v) for k, v in metrics.items()}


def _check_inputs(predictions: Mapping[Any, str], references: Mapping[Any, list[str]]) -> list[Any]:
    """Same ids on both sides, one string per prediction, a non-empty list of non-blank strings per reference."""
    if not predictions:
        raise FreeVLMError("caption metrics need at least one prediction, got an empty dict")
    for i in predictions:
        if i not in references:
            raise FreeVLMError(f"caption metrics: image id {i!r} has a prediction but no references")
    for i in references:
        if i not in predictions:
            raise FreeVLMError(f"caption metrics: image id {i!r} has references but no prediction")
    for i, p in predictions.items():
        if not isinstance(p, str):
            raise FreeVLMError(f"caption metrics: prediction for image id {i!r} is {type(p).__name__}, expected str")
        refs = references[i]
        # A bare string would be iterated character by character by the scorers, so reject it explicitly.
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs:
            raise FreeVLMError(f"caption metrics: references for image id {i!r} must be a non-empty list of str")
        if not all(isinstance(r, str) and r.strip() for r in refs):
            raise FreeVLMError(f"caption metrics: references for image id {i!r} contain an empty or non-str caption")
    return list(predictions)


def _one_line(text: str) -> str:
    # The PTB tokenizer is run with -preserveLines and its output is zipped line-by-line with the ids, so any line
    # break inside a caption (\r, \u2028, ...) would shift every later caption onto the wrong image. Collapsing all
    # whitespace is harmless: PTB tokenisation splits on whitespace anyway.
    return " ".join(text.split())


def _ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        out = PTBTokenizer().tokenize({i: [{"caption": _one_line(c)} for c in cs] for i, cs in captions.items()})
    except OSError as e:  # it writes a temp file next to its jar, i.e. inside site-packages
        raise FreeVLMError(f"pycocoevalcap's PTB tokenizer failed (it writes a temp file beside its jar): {e}") from e
    bad = [i for i, cs in captions.items() if len(out.get(i, [])) != len(cs)]
    if bad:
        raise FreeVLMError(
            f"pycocoevalcap's PTB tokenizer returned the wrong number of lines (first bad image id {bad[0]!r}); "
            "is Java working? try `java -version`"
        )
    return out


def _require_some_reference_words(gts: dict[Any, list[str]]) -> None:
    if not any(r for rs in gts.values() for r in rs):
        # CiderScorer takes max() over an empty document-frequency table and crashes with a bare ValueError.
        raise FreeVLMError("caption metrics: every reference caption is empty after tokenisation (punctuation only?)")


def _spice_lib_dir() -> Path:
    import pycocoevalcap.spice as spice_pkg

    return Path(spice_pkg.__file__).resolve().parent / "lib"


def _require_spice_models() -> None:
    lib = _spice_lib_dir()
    missing = [j for j in _SPICE_JARS if not (lib / j).is_file()]
    if missing:
        # Spice() would call get_stanford_models(), a silent, very large download; never do that from a metric call.
        raise FreeVLMError(
            f"SPICE is unavailable offline: Stanford CoreNLP jars {', '.join(missing)} are missing from {lib} "
            "(run `python -m pycocoevalcap.spice.get_stanford_models` once with internet, or use spice=False)"
        )


def _spice(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    _require_spice_models()
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except Exception as e:  # a non-zero JVM exit, a missing output file, a JSON error: all mean "SPICE failed"
        msg = " ".join(str(e).split())
        raise FreeVLMError(f"SPICE failed ({type(e).__name__}: {msg}); rerun with spice=False to skip it") from e
    return float(score)


def _close_meteor(meteor: Any) -> None:
    """Stop Meteor's JVM and reap it, so no zombie process or open pipe outlives the call.

    pycocoevalcap only does this in Meteor.__del__, which takes `meteor.lock` first: if compute_score raised while
    holding that lock, __del__ would block forever at garbage collection. So release the lock and kill directly;
    __del__ later finds a reaped process and closed pipes, both of which it tolerates.
    """
    p = meteor.meteor_p
    for stream in (p.stdin, p.stdout, p.stderr):
        if stream is not None:
            stream.close()
    p.kill()
    p.wait()
    if meteor.lock.locked():
        meteor.lock.release()


_SHARED_METEOR: list = []  # inside `shared_meteor()`: [None] until the first call starts the JVM, then [Meteor]


@contextlib.contextmanager
def shared_meteor() -> Iterator[None]:
    """Within this block every `caption_metrics` call reuses one METEOR JVM, closed when the block ends.

    METEOR's start-up (~6 s on 2 CPU cores: it loads a paraphrase table) dwarfs scoring a few hundred captions (~0.1 s
    on a warm JVM), so a run that scores many tables (`freevlm reproduce`) keeps one. Outside the block each call
    starts and closes its own, so no JVM outlives a plain call.
    """
    if _SHARED_METEOR:  # nested: the outer block owns the JVM
        yield
        return
    _SHARED_METEOR.append(None)
    try:
        yield
    finally:
        meteor = _SHARED_METEOR.pop()
        if meteor is not None:
            _close_meteor(meteor)


def _start_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    if _SHARED_METEOR and _SHARED_METEOR[0] is not None and _SHARED_METEOR[0].meteor_p.poll() is None:
        return _SHARED_METEOR[0]
    try:
        meteor = Meteor()  # starts the JVM now; it loads while we tokenise and run the Python scorers
    except OSError as e:
        raise FreeVLMError(f"could not start METEOR's JVM ({e}); check `java -version`") from e
    if _SHARED_METEOR:
        _SHARED_METEOR[0] = meteor
    return meteor


def _release_meteor(meteor, failed: bool) -> None:
    """Close a per-call JVM; keep a shared one unless it failed (the next call then starts a fresh one)."""
    if _SHARED_METEOR and _SHARED_METEOR[0] is meteor:
        if not failed:
            return
        _SHARED_METEOR[0] = None
    _close_meteor(meteor)


def caption_metrics(
    predictions: dict[str, str], references: dict[str, list[str]], *, spice: bool = False
) -> dict[str, float]:
    """Official COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) via pycocoevalcap.

    Returns {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} (+ "SPICE" if `spice`) on
    pycocoevalcap's native scale (see CAPTION_METRICS; use `to_percent` for the paper's x100 tables). Both sides go
    through pycocoevalcap's PTBTokenizer as in COCOEvalCap. Note BLEU of a perfect prediction is 1 - O(1e-9), not
    exactly 1, because of pycocoevalcap's smoothing constants.

    Needs Java. Starts one METEOR JVM (closed before returning; inside `shared_meteor()` one is kept for every call)
    and two short PTB tokenizer JVMs; METEOR's start-up (~6 s, it loads a paraphrase table) overlaps with
    tokenisation and the in-process scorers. SPICE needs the Stanford
    CoreNLP jars already in pycocoevalcap's spice/lib: without them spice=True raises FreeVLMError, never downloads.
    """
    ids = _check_inputs(predictions, references)
    if shutil.which("java") is None:
        raise FreeVLMError(JAVA_MISSING)
    if spice:
        _require_spice_models()  # fail before spending ~10 s of JVM work on the other metrics

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    meteor, failed = _start_meteor(), True
    try:
        gts = _ptb_tokenize({i: list(references[i]) for i in ids})
        res = _ptb_tokenize({i: [predictions[i]] for i in ids})
        _require_some_reference_words(gts)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
        try:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        except (ValueError, OSError) as e:  # the JVM died: an empty line where a score should be, or a broken pipe
            raise FreeVLMError(f"METEOR's JVM failed ({type(e).__name__}: {e}); check `java -version`") from e
        failed = False
    finally:
        _release_meteor(meteor, failed)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        out["SPICE"] = _spice(gts, res)
    return out


_NON_WORD = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lowercase, delete punctuation, collapse whitespace: "A dog's T-shirt." -> "a dogs tshirt".

    Identical to PTB tokenisation for lowercase text without punctuation; otherwise close but not equal (PTB splits
    "dog's" into "dog 's" and keeps "t-shirt"), so fast and official scores differ slightly on real captions.
    """
    return " ".join(_NON_WORD.sub("", text.lower()).split())


FAST_CAPTION_METRICS: dict[str, MetricInfo] = {k: CAPTION_METRICS[k] for k in ("BLEU-4", "CIDEr")}


def fast_caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr in-process, no Java: `simple_tokenize`, then pycocoevalcap's Bleu and Cider scorers.

    For threshold sweeps. Same scale as `caption_metrics`. CIDEr's IDF comes from the evaluated set itself (as in
    pycocoevalcap), so it is meaningless on tiny sets: with a single image every n-gram has IDF log(1/1) = 0 and
    CIDEr is 0 even for a perfect caption; an n-gram present in every image's references likewise weighs nothing.
    Compare CIDEr only between runs over the same image set.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = _check_inputs(predictions, references)
    gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
    res = {i: [simple_tokenize(predictions[i])] for i in ids}
    _require_some_reference_words(gts)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(Cider().compute_score(gts, res)[0])}
