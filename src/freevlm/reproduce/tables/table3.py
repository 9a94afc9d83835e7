"""Table 3 (--full): unsupervised VQA (no stage 1; FREE from knowledge distillation, the baselines from the backbone's
own greedy answers as labels) and VisDial MRR (candidates ranked by their early-exit log-likelihood)."""

from __future__ import annotations

from freevlm.backbones import load_backbone
from freevlm.data.synthetic import load_synthetic_visdial
from freevlm.eval.evaluate import evaluate_visdial
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.reproduce.seed import unique_keys
from freevlm.reproduce.tables.base import Report, Table, full_only, markdown_table, method_rows, section
from freevlm.train.pseudo import greedy_targets


def measure(run, core) -> dict:
    vqa = run.sub_run("vqa-unsup", task="vqa")
    bb = load_backbone(vqa.pretrained)
    full = EarlyExitVLM(bb)
    questions = unique_keys(vqa.task.examples(vqa.train))
    pseudo = greedy_targets(bb, questions, max_new_tokens=5, progress=vqa.progress)
    res = {"split": vqa.results["split"],
           "backbone": vqa.test_row(full, DecodeOptions(mode="full"), wall=False, official=False)}
    found, trained = vqa.methods(bb, vqa.cfg.methods, examples=pseudo, free_variant="kd")
    res.update(found)
    samples = load_synthetic_visdial(vqa.data_root)[: vqa.cfg.visdial_dialogs * 3]
    res["visdial"] = {"backbone": evaluate_visdial(full, samples, DecodeOptions(mode="full"),
                                                 progress=vqa.progress).metrics}
    for name, exits in trained.items():
        opts = vqa.method_options(name, res)
        r = evaluate_visdial(EarlyExitVLM(bb, exits), samples, opts, progress=vqa.progress)
        res["visdial"][name] = {**r.metrics, "parameter_speedup": r.speed["parameter_speedup"]}
    return res


def render(report: Report) -> list[str]:
    if not report.has("vqa_unsupervised"):
        return []
    rows = method_rows(report, lambda r: r["vqa_unsupervised"], ["accuracy"])
    for row, name in zip(rows, ["backbone", *report.cfg.methods]):
        row.append(report.col(["vqa_unsupervised", "visdial", name, "MRR"], 100, 1))
    return section("Table 3 — unsupervised VQA (no stage 1; FREE by KD, baselines on the backbone's own answers) and "
                   "VisDial MRR",
                   markdown_table(["model", "VQA accuracy", "param", "compute", "wall", "VisDial MRR"], rows))


TABLE = Table(render, measure, key=("vqa_unsupervised",), when=full_only)
