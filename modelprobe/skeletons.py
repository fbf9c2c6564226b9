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
    "direction": _HEADER + """\
kind: direction
about: A behaviour is mediated by one residual-stream direction (difference of means).
tags: [direction]
prompts:
  positive: data/harmful_instructions.jsonl   # {"prompt": ...} lines that trigger the behaviour
  negative: data/harmless_instructions.jsonl  # lines that do not
  chat_template: true                         # wrap prompts in the tokenizer's chat template
  split: {train: 64, validation: 32, test: 64, seed: 0}   # each file needs train+validation+test lines
direction:
  layer: auto                  # chosen on the validation split; or an int / fraction of depth
  position: post_instruction   # template tokens after the instruction; or last / an int
behaviour:
  grader: refusal              # published substring list; or {substrings: [...]}, {regex: ...}, {tokens: [...]}
  max_new_tokens: 48
claims:
  ablation_suppresses:
    intervention: ablate       # project the direction out at every layer and position
    on: positive
    expect: {rate_drop: {at_least: 0.5}}
  addition_induces:
    intervention: add          # add the raw difference of means at the chosen layer
    on: negative
    expect: {rate_rise: {at_least: 0.5}}
""",
    "circuit": _HEADER + """\
kind: circuit
about: These attention heads carry indirect-object identification.
tags: [circuit]
prompts: data/ioi.jsonl          # {"prompt": ..., "answer": " Mary", "wrong": " John"}: one-token answers
reference: data/ioi_abc.jsonl    # whose means replace ablated components (same token lengths as the prompts)
metric: logit_diff               # or logprob (answer only), accuracy (top-1 == answer)
ablation: mean                   # mean (per position), mean_all_positions, zero, resample
scope: attention_heads           # what "everything else" means: attention_heads, heads_and_mlps, {neurons: [layers]}
circuit:                         # `modelprobe discover circuit` proposes one and writes this file
  - {layer: 20, component: attn.z, head: 0}
  - {layer: 23, component: attn.z, head: [3]}
claims:
  sufficient:
    test: sufficiency            # ablate everything in scope except the circuit
    expect: {faithfulness: {at_least: 0.8}}
  necessary:
    test: necessity              # ablate only the circuit
    expect: {faithfulness: {at_most: 0.2}}
controls:
  random_circuits: 100           # same size, same layers where possible
""",
}

SKELETONS["injection"] = _HEADER + """\
kind: injection
about: The model reports an injected concept and names it before saying it.
tags: [injection]
concepts: data/injection_concepts.jsonl              # {"word": "Oceans", "synonyms": ["sea"]}; split into dev / test
baseline_words: data/injection_baseline_words.jsonl  # {"word": ...}; the concept vector is minus their mean state
no_questions: data/injection_no_questions.jsonl      # {"question": ...} whose honest answer is "no"
vector: {template: "Tell me about {word}", position: last, chat_template: true}
inject:
  layer: auto            # chosen on dev concepts with strength, then frozen; or an int / fraction of depth
  strengths: [1, 2, 4, 8]
  from: trial_start      # the token before "Trial n", through every generated token
trial: default           # the published protocol in our words; or a JSONL of {role, content} messages
grader: rules            # or {judge: <model path or alias>}
split: {dev: 10, test: 40, seed: 0}
control_trials: 80       # uninjected trials; 0 of 80 is the fewest that can clear at_most 0.05
claims:
  detects_and_names:
    expect: {rate: {at_least: 0.05}}      # affirmative + correct identification, detection first
  no_false_alarms:
    on: control_trials
    expect: {rate: {at_most: 0.05}}
  stays_coherent:
    expect: {coherence: {at_least: 0.8}}
  not_a_yes_bias:
    on: no_questions
    expect: {yes_rate_rise: {at_most: 0.05}}
"""
