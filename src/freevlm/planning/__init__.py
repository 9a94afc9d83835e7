"""Exit planning: what each kind of decoding work costs on the machine at hand, and the plan chosen from it.

`gates.py` holds the cheap exit gates (tiny predictors on h_i that decide whether an exit is worth checking; decoding
uses them through `generation.criteria.Gated`), `costs.py` the measured cost model (seconds per layer, exit check,
gate, K/V fill, verification block and call) and the prediction of a run's seconds from its work records, and
`plan.py` the candidate search over exits x threshold x gates and the plan file (`plan.json`) that `generate`,
`evaluate`, `sweep` and `reproduce` take with `--plan`. The data-driven side of `freevlm plan` (teacher-forced
statistics, candidates decoded on the development split) is `eval/planning.py`.
"""
