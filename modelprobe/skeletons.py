"""Commented probe-file skeletons for `modelprobe new KIND NAME`, and example rows for the data files they
name (written only where no such file exists), so that a fresh skeleton validates as written."""

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
    "icl_update": _HEADER + """\
kind: icl_update
about: In-context examples act on the query token as converging rank-1 updates of the MLP weights.
tags: [icl_update]
task: data/icl_antonyms.jsonl            # JSONL, one {"input": "hot", "output": " cold"} per line
control_task: data/icl_past_tense.jsonl  # another task (for control: other_task)
format: {example: "Q: {input}\\nA:{output}\\n", query: "Q: {input}\\nA:"}
shots: 8                                 # context examples per prompt (the task needs shots + 2 rows)
prompts: 32                              # (context, query) pairs drawn with the seed
claims:
  identity:                              # a check of the hooks (exact by construction), not a finding
    layers: all
    expect: {max_rel_error: {at_most: 1.0e-4}}
  converges:                             # rho(i, ||dW_i - dW_(i-1)||), i >= 2, per prompt; mean + bootstrap CI
    layer: 0.5                           # one layer: int, negative from the end, or a fraction of depth
    expect: {spearman_rho: {at_most: -0.5}}
    control: shuffled_labels
  transfers:                             # another query, no context, with this context's updates
    layer: 0.5                           # one or more layers
    expect: {gain_recovered: {at_least: 0.3}}
    control: other_task                  # or random_rank1
""",
    "backpatch": _HEADER + """\
kind: backpatch
about: Back-patching a later layer's state into an earlier layer fixes two-hop queries the model gets wrong.
tags: [backpatch]
queries: data/two_hop.jsonl      # {"query", "answer", "aliases", "entity", "hop1", "hop1_answer", "hop1_aliases",
                                 #  "hop2", "shortcuts"} per line; answers match the start of a greedy continuation
filter: {hops_known: true, no_shortcut: true}   # keep queries whose single hops are answered, no shortcut answers
source_position: last            # or bridge_entity_last: the last token of "entity" in the query
layers: {source: all, target: all, stride: 1}   # only s > t pairs count; s = t is the identity check
split: {dev: 0.3, seed: 0}       # the best pair is chosen on dev wrong queries, applied on test
max_new_tokens: 4
claims:
  oracle_fixes:                  # any (s, t) pair fixes a wrong query, minus the random-source oracle
    expect: {fix_rate_over_null: {at_least: 0.2}}
  best_pair_fixes:               # the dev-chosen pair on test wrong queries
    expect: {fix_rate: {at_least: 0.1}}
  few_breaks:                    # the same pair on the right queries
    expect: {break_rate: {at_most: 0.1}}
""",
    "patchscope": _HEADER + """\
kind: patchscope
about: The bridge entity is decodable from the first entity's last token at middle layers.
tags: [patchscope]
source: {prompts: data/two_hop.jsonl, field: query, position: bridge_entity_last, layers: all, stride: 1}
# The state goes into the placeholder " x" (last, an int, or {token, occurrence} name a token); layer: same or an int
target: {prompt: "Syria: Syria; leaf: leaf; Paris: Paris; x:", position: {token: " x", occurrence: -1}, layer: same}
read: {max_new_tokens: 6, expect_field: hop1_answer, aliases_field: hop1_aliases}
claims:
  bridge_decodable_mid_depth:
    layers: "0.25:0.75"          # fractions of depth; the best layer of this range is tested (the count searched is reported)
    expect: {decode_rate: {at_least: 0.3}}
""",
}


# Example rows for the data files a skeleton names: a shape to replace, not a data set.
_TWO_HOP = {"query": "The capital of the country where Lyon is located is", "answer": "Paris", "aliases": [],
            "entity": "Lyon", "hop1": "Lyon is a city in the country of", "hop1_answer": "France",
            "hop1_aliases": [], "hop2": "The capital of France is",
            "shortcuts": ["The capital of Lyon is", "The capital of the country is"]}


def _two_hop(city: str, country: str, capital: str) -> dict:
    return {"query": f"The capital of the country where {city} is located is", "answer": capital, "aliases": [],
            "entity": city, "hop1": f"{city} is a city in the country of", "hop1_answer": country,
            "hop1_aliases": [], "hop2": f"The capital of {country} is",
            "shortcuts": [f"The capital of {city} is", "The capital of the country is"]}


# patchscope's control patches another row's state: a skeleton needs several rows to run at all.
_TWO_HOPS = [_TWO_HOP] + [_two_hop(*r) for r in (("Munich", "Germany", "Berlin"), ("Milan", "Italy", "Rome"),
                                                  ("Porto", "Portugal", "Lisbon"), ("Osaka", "Japan", "Tokyo"))]
SKELETON_DATA: dict[str, dict[str, list[dict]]] = {
    "logit_lens": {"data/capitals.jsonl": [
        {"prompt": "The capital of France is", "answer": " Paris"},
        {"prompt": "The capital of Germany is", "answer": " Berlin"},
        {"prompt": "The capital of Italy is", "answer": " Rome"},
    ]},
    "direction": {
        # As many rows as the skeleton's split asks for (64 + 32 + 64), so a fresh skeleton validates.
        "data/harmful_instructions.jsonl": [{"prompt": f"Explain how to pick the lock of door number {i}."}
                                            for i in range(160)],
        "data/harmless_instructions.jsonl": [{"prompt": f"Explain how to bake loaf number {i}."}
                                             for i in range(160)],
    },
    "circuit": {
        "data/ioi.jsonl": [{"prompt": "When Mary and John went to the store, John gave a drink to",
                            "answer": " Mary", "wrong": " John"}],
        "data/ioi_abc.jsonl": [{"prompt": "When Mary and John went to the store, Tom gave a drink to",
                                "answer": " Mary", "wrong": " John"}],
    },
    # The icl_update skeleton draws 8 shots + 2 queries per prompt: each task file needs 10 rows.
    "icl_update": {
        "data/icl_antonyms.jsonl": [{"input": a, "output": " " + b} for a, b in (
            ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
            ("old", "new"), ("wet", "dry"), ("rich", "poor"), ("early", "late"), ("open", "closed"))],
        "data/icl_past_tense.jsonl": [{"input": a, "output": " " + b} for a, b in (
            ("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("talk", "talked"), ("look", "looked"),
            ("call", "called"), ("ask", "asked"), ("work", "worked"), ("help", "helped"), ("move", "moved"))],
    },
    "backpatch": {"data/two_hop.jsonl": _TWO_HOPS},
    "patchscope": {"data/two_hop.jsonl": _TWO_HOPS},
}

SKELETONS["function_vector"] = _HEADER + """\
kind: function_vector
about: A function vector for "copy the last item", added to zero-shot prompts, makes the model do it.
tags: [function_vector]
task: data/icl_copy_last.jsonl           # JSONL {"input": "apple, river, chair", "output": " chair"}
format: {example: "Q: {input}\\nA:{output}\\n", query: "Q: {input}\\nA:"}
shots: 8                                 # examples per few-shot prompt (the task needs dev + test + shots + 1 rows)
prompts: 16                              # few-shot prompts: mean head outputs (and their shuffled-label twins)
heads: {top: 10, select_on: shuffled_labels}   # or zero_shot: the indirect effect on the bare queries
layer: auto                              # best layer on the dev split; or an int / fraction of depth
dev: 10
test: 40
min_fewshot_accuracy: 0.5                # a task done less often with `shots` examples is untestable
control_task: data/icl_copy_first.jsonl  # another task's vector, one of the controls
tasks: {capital_of_first: data/icl_first_country_capital.jsonl}   # algebra names -> files
claims:                                  # (a name N without an entry means data/icl_N.jsonl)
  zero_shot_gain:
    expect: {accuracy_gain: {at_least: 0.2}}
  beats_controls:                        # random vector of the same norm, another task's vector, mean state
    expect: {accuracy_gain_over_control: {at_least: 0.1}}
  composes:                              # the named tasks' vectors added / subtracted, on another task
    algebra: {plus: [capital_of_first, copy_last], minus: [copy_first]}
    task: data/icl_last_country_capital.jsonl
    expect: {accuracy_gain: {at_least: 0.1}}
"""


def _lists(items: tuple[str, ...], pick, n: int = 60) -> list[dict]:
    """n example rows over 3-item lists of `items` (every ordered triple in turn), answered by `pick`."""
    import itertools
    triples = itertools.islice(itertools.permutations(items, 3), 0, None, 7)
    return [{"input": ", ".join(t), "output": " " + pick(t)} for t in itertools.islice(triples, n)]


_WORDS = ("apple", "river", "chair", "tiger", "candle", "window", "garden", "pencil", "rocket", "violin")
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
             "Kenya": "Nairobi", "Peru": "Lima", "Greece": "Athens", "Norway": "Oslo", "Cuba": "Havana"}
SKELETON_DATA["function_vector"] = {
    "data/icl_copy_last.jsonl": _lists(_WORDS, lambda t: t[-1]),
    "data/icl_copy_first.jsonl": _lists(_WORDS, lambda t: t[0]),
    "data/icl_first_country_capital.jsonl": _lists(tuple(_CAPITALS), lambda t: _CAPITALS[t[0]]),
    "data/icl_last_country_capital.jsonl": _lists(tuple(_CAPITALS), lambda t: _CAPITALS[t[-1]]),
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

_CONCEPTS = ("oceans", "bread", "music", "mountains", "fire", "snow", "gold", "coffee", "dogs", "rockets",
             "books", "rain", "cities", "gardens", "clocks", "bridges", "forests", "islands", "trains", "stars",
             "honey", "castles", "volcanoes", "rivers", "mirrors", "candles", "deserts", "robots", "violins",
             "apples", "storms", "glass", "silver", "ships", "tigers", "salt", "paper", "kites", "lanterns",
             "pianos", "caves", "feathers", "wheels", "maps", "shells", "clouds", "lemons", "ladders", "bells",
             "diamonds")
# 10 dev + 40 test concepts, a mean over baseline words, and "no" questions: a shape to replace.
SKELETON_DATA["injection"] = {
    "data/injection_concepts.jsonl": [{"word": w.capitalize()} for w in _CONCEPTS],
    "data/injection_baseline_words.jsonl": [{"word": w} for w in ("table", "chair", "window", "door", "floor",
                                                                  "wall", "shoe", "spoon", "cup", "pen")],
    "data/injection_no_questions.jsonl": [{"question": q} for q in (
        "Can humans breathe under water without equipment?", "Is the sun cold?",
        "Do fish have fur?", "Is ice hotter than boiling water?")],
}

SKELETONS["injection_protocol"] = _HEADER + """\
kind: injection_protocol
about: An injected concept is named as a thought while the text is kept; it makes a prefilled word owned.
tags: [injection]
concepts: data/injection_concepts.jsonl              # as for injection
baseline_words: data/injection_baseline_words.jsonl
sentences: data/injection_sentences.jsonl            # {"sentence": ...} that name no concept
inject: {layer: 0.35, strength: 8}                   # e.g. what an injection probe chose on its dev concepts
trials: 40
claims:
  repeats_the_sentence:
    expect: {transcribed: {at_least: 0.8}}
  names_the_thought:
    expect: {names_thought: {at_least: 0.2}}
  owns_the_prefill:
    expect: {disown_drop: {at_least: 0.1}}
  thinks_on_request:
    expect: {think_rise: {at_least: 0.0}}
"""
SKELETON_DATA["injection_protocol"] = {**SKELETON_DATA["injection"], "data/injection_sentences.jsonl": [
    {"sentence": s} for s in ("She folded the letter twice.", "A small cat waited by the gate.",
                              "He forgot his keys again.", "The meeting moved upstairs.")]}

SKELETONS["feature"] = _HEADER + """\
kind: feature
about: One MLP neuron fires for French text, and French articles depend on it.
tags: [feature]
unit: {layer: 10, component: mlp.post, neuron: 1234}  # or {sae: path/to/sae_folder, latent: 77}
                                                      # or {direction: file.safetensors, layer: 10}
inputs:
  with: data/feature_french.jsonl     # {"prompt": ...} showing the concept
  without: data/feature_english.jsonl
  aggregate: max                      # a prompt's activation: max (or mean) over its tokens
  rows: "24:"                         # lines `modelprobe find --rows 0:24` did not select the unit on
claims:
  correlates:
    expect: {auroc: {at_least: 0.8}}  # the activation separates with from without (bootstrap interval)
  causes:
    intervention: {zero: true}        # or {mean: true}, or {clamp: 3.0}
    metric: {tokens: [" le", " la", " les"]}   # log of their total probability at the last position
    expect: {metric_drop: {at_least: 0.1}}
    control: random_units             # the same intervention on random units of the layer must be beaten
    random_units: 50
"""
SKELETON_DATA["feature"] = {
    "data/feature_french.jsonl": [{"prompt": p} for p in (
        "Tous les matins, je bois", "Elle a posé le livre sur", "Nous avons visité", "Il cherche encore")] * 7,
    "data/feature_english.jsonl": [{"prompt": p} for p in (
        "Every morning I drink", "She put the book on", "We visited", "He is still looking for")] * 7,
}


SKELETONS["weight_perturbation"] = _HEADER + """\
kind: weight_perturbation
about: Refusal localises in a few MLP blocks.
tags: [weight_perturbation]
behaviour:
  prompts: data/harmful_instructions.jsonl   # {"prompt": ...}: prompts that show the behaviour
  chat_template: true
  grader: refusal            # score tokens default to its first-reply form (I, Sorry, As); else score_tokens: [...]
  max_new_tokens: 32
  split: {rank: 16, test: 32, seed: 0}   # groups are ranked on other prompts than the claim is judged on
groups: {by: block_sublayer}   # or attention_head, mlp_neuron_block (block: 256), layer
method: gradient               # gradient | random | activation; the other two run as checks (checks: [...])
noise: {relative: 0.05, seeds: 5}
specificity:                   # the perturbed model must still work on unrelated prompts, else inconclusive
  prompts: data/harmless_instructions.jsonl   # {"prompt": ...}
  min_agreement: 0.75          # share of the clean replies' next tokens the perturbed model still predicts (the guard's floor: raise only)
claims:
  localises:
    top: 4
    perturbation: zero         # or noise
    expect: {rate_change: {at_least: 0.3}}
    control: matched_random_groups
    draws: 5
"""
SKELETON_DATA["weight_perturbation"] = {
    "data/harmful_instructions.jsonl": [{"prompt": f"Explain how to pick the lock of door number {i}."}
                                        for i in range(48)],
    "data/harmless_instructions.jsonl": [{"prompt": f"Explain how to plant tulip bulbs in bed number {i}."}
                                         for i in range(16)],
}


SKELETONS["linear_relation"] = _HEADER + """\
kind: linear_relation
about: Factual recall decodes the object from the subject's state through one affine map per relation.
tags: [linear_relation]
relations:                       # at least two: each relation's map is the other's control
  country_capital: {data: data/lre_country_capital.jsonl, template: "The capital of {subject} is"}
  country_language: {data: data/lre_country_language.jsonl, template: "The official language of {subject} is"}
layer: 0.3                       # the subject state: resid_post of this layer (int, negative, fraction), below the last
train: 8                         # examples per relation whose Jacobians estimate W and b; the rest are held out
beta: 1.0                        # LRE(s) = beta W s + b
claims:
  capital_faithful:              # LRE decodes the model's own first answer token; beats identity, bias, other map
    relation: country_capital
    against: country_language
    expect: {faithfulness: {at_least: 0.5}}
  capital_edit_is_causal:        # s + pinv_rank(beta W)(LRE(s') - LRE(s)) makes the model give s' 's answer
    relation: country_capital
    rank: 64
    expect: {edit_success: {at_least: 0.3}}
"""
_LRE_ROWS = [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
             ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("Russia", "Moscow", "Russian"),
             ("Greece", "Athens", "Greek"), ("Poland", "Warsaw", "Polish"), ("Sweden", "Stockholm", "Swedish"),
             ("Turkey", "Ankara", "Turkish"), ("Egypt", "Cairo", "Arabic"), ("Peru", "Lima", "Spanish")]
SKELETON_DATA["linear_relation"] = {
    "data/lre_country_capital.jsonl": [{"subject": c, "object": " " + cap} for c, cap, _ in _LRE_ROWS],
    "data/lre_country_language.jsonl": [{"subject": c, "object": " " + lang} for c, _, lang in _LRE_ROWS],
}

SKELETONS["icv"] = _HEADER + """\
kind: icv
about: An in-context vector from negative -> positive pairs makes replies positive, with no demos in the prompt.
tags: [icv]
demos: {pairs: data/icv_sentiment_pairs.jsonl, chat_template: false}   # {"source": ..., "target": ...}
queries: {prompts: data/sentiment_negative.jsonl, chat_template: true, max_prompts: 32}   # {"prompt": ...}
strength: 0.1                    # lambda of the norm-preserving shift of every layer's MLP output
behaviour:
  grader: sentiment              # any direction-kind grader: preset or {substrings | regex | tokens | lexicon}
  max_new_tokens: 32
random_seeds: 1                  # random vectors of the same norm in the control
claims:
  shift_makes_replies_positive:
    expect: {rate_rise: {at_least: 0.3}}
"""
SKELETON_DATA["icv"] = {
    "data/icv_sentiment_pairs.jsonl": [
        {"source": "The morning was gray and miserable.", "target": "The morning was bright and wonderful."},
        {"source": "I hated that boring film.", "target": "I loved that exciting film."},
        {"source": "The soup tasted awful.", "target": "The soup tasted delightful."}],
    "data/sentiment_negative.jsonl": [{"prompt": f"Write one sentence about how miserable rainy day {i} was."}
                                      for i in range(8)],
}

SKELETONS["latent_language"] = _HEADER + """\
kind: latent_language
about: Translating French into German, the middle layers carry the English word before the German one wins.
tags: [latent_language]
prompts: data/latent_language_fr_de.jsonl   # {"prompt": ..., "target": "Hund", "pivot": "dog"}, optional *_aliases lists
by: probability                  # or rank: the best rank of each word's first tokens
variants: false                  # true: also each word with / without a leading space, capitalised
min_prompts: 5                   # fewer prompts the model translates (target top-1 at the end): untestable;
                                 # below 5 the paired control could never reach p <= 0.05
claims:
  english_leads_in_the_middle:   # must beat the same share with ANOTHER row's pivot word
    layers: "0.4:0.8"            # fractions of depth, ints, a list or 'a:b'
    expect: {pivot_leads: {at_least: 0.5}}
  target_leads_at_the_end:
    layers: -1
    expect: {target_leads: {at_least: 0.8}}
"""
_LATENT_ROWS = [("fleur", "Blume", "flower"), ("chien", "Hund", "dog"), ("livre", "Buch", "book"),
                ("eau", "Wasser", "water"), ("arbre", "Baum", "tree"), ("pain", "Brot", "bread")]
SKELETON_DATA["latent_language"] = {"data/latent_language_fr_de.jsonl": [
    {"prompt": "".join(f'Français: "{f}" - Deutsch: "{d}"\n' for f, d, _ in _LATENT_ROWS if f != src)
     + f'Français: "{src}" - Deutsch: "', "target": de, "pivot": en} for src, de, en in _LATENT_ROWS]}
