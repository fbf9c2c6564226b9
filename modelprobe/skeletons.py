"""Commented probe-file skeletons for `modelprobe new KIND NAME`; each validates as written."""

from __future__ import annotations

_HEADER = "# yaml-language-server: $schema=../modelprobe/schema/modelprobe.schema.json\n"

SKELETONS: dict[str, str] = {
    "logit_lens": _HEADER + """\
kind: logit_lens
about: The answer's first token emerges in the residual stream before the last layer.
tags: [logit_lens]
prompts: data/capitals.jsonl     # JSONL, one {"prompt": ..., "answer": " Paris"} per line (answer keeps its space)
chat_template: false             # true: wrap each prompt in the tokenizer's chat template
target: first_token              # or single_token: every answer must be one token (an error otherwise)
component: resid_post            # which residual to decode: resid_post, resid_pre or resid_mid
claims:
  answers_correctly:             # each claim is one pytest item: probes/NAME.probe.yaml::answers_correctly
    expect: {final_accuracy: {at_least: 0.5}}
  emerges_by_two_thirds:
    only_correct: true           # only prompts the model answers right at the last layer
    layer: 0.66                  # int, negative from the end, or a fraction of depth
    top_k: 1
    expect: {share_by_layer: {at_least: 0.5}}
    tolerance: {abs: 0.1}        # allowed move against a baseline (--probe-compare)
""",
}
