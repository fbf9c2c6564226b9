"""A small, made-up RunRecord for tests and for looking at the reports (no model involved).

It uses every plot type of the result contract. To look at the reports it makes:

    python tests/helpers/sample_report.py OUTDIR   # writes report.json / .md / .html there
"""

from __future__ import annotations

import math
import sys

from modelprobe.report.record import (
    Bars,
    ClaimResult,
    ControlResult,
    HeatMap,
    LinePlot,
    ModelInfo,
    NullHistogram,
    PreflightResult,
    ProbeRecord,
    RunRecord,
    Series,
    Table,
)


def sample_record(n_layers: int = 30) -> RunRecord:
    lens = [1 / (1 + math.exp(-(i - 18) / 2.0)) for i in range(n_layers)]
    rank = [max(1.0, 200 * math.exp(-i / 4)) for i in range(n_layers)]
    null = [0.03 * math.sin(i * 12.9898) + 0.01 * math.cos(i * 78.233) for i in range(200)]
    return RunRecord(
        model=ModelInfo(
            id="smollm2-135m",
            slug="smollm2-135m-instruct",
            path="/models/SmolLM2-135M-Instruct.gguf",
            hash="sha256:0f3c9a1b2d4e5f60718293a4b5c6d7e8",
            model_type="llama",
            n_layers=n_layers,
            dtype="float32",
            device="cpu",
        ),
        versions={"modelprobe": "0.1.0", "torch": "2.4.1", "transformers": "4.46.3"},
        probes_commit="1a2b3c4",
        seed=1234,
        started="2024-11-23T16:40:00Z",
        finished="2024-11-23T16:41:12Z",
        preflight=[
            PreflightResult(name="logits match reference", passed=True, detail="max |Δ| over 8 prompts",
                            value=3.1e-5, tolerance=1e-3),
            PreflightResult(name="chat template round-trip", passed=True),
            PreflightResult(name="hook reconstructs residual", passed=False, detail="layer 7 off",
                            value=0.02, tolerance=0.001),
        ],
        tokenization={"chat_template": "<|im_start|>user\n{prompt}<|im_end|>", "example_ids": [1, 4093, 198]},
        probes=[
            ProbeRecord(
                name="logit_lens_capitals",
                kind="logit_lens",
                file="probes/logit_lens_capitals.yaml",
                file_hash="ab12cd34ef56ab12cd34ef56",
                about="The capital of a country becomes the top token in the residual stream by layer 20.",
                settings={"layer": 20, "position": -1, "template": "The capital of {country} is"},
                duration_s=4.2,
                claims=[
                    ClaimResult(
                        name="capital_top1_by_layer_20",
                        verdict="pass",
                        reason="accuracy 0.812 ≥ 0.5 and above the random-direction control",
                        metric="top-1 accuracy of the capital token at layer 20",
                        effect=0.8125,
                        ci=(0.7051, 0.9012),
                        threshold=0.5,
                        comparison="at_least",
                        n=64,
                        control=ControlResult(name="random_direction", effect=0.031, p_value=0.001),
                        tolerance={"abs": 0.05},
                        details={"top_k": 1},
                        curves={"accuracy": lens, "median rank": rank},
                        plots=[
                            LinePlot(title="capital through the layers", x_label="layer", y_label="share",
                                     series=[Series(label="top-1 share", y=lens),
                                             Series(label="median rank", y=rank, axis="right")],
                                     mark_x=20, mark_label="layer 20"),
                            NullHistogram(title="random direction", x_label="accuracy", values=null,
                                          effect=0.8125, threshold=0.5),
                        ],
                        duration_s=3.9,
                    ),
                    ClaimResult(
                        name="not_before_layer_10",
                        verdict="inconclusive",
                        reason="CI straddles the threshold",
                        metric="top-1 accuracy at layer 10",
                        effect=0.09,
                        ci=(0.03, 0.21),
                        threshold=0.1,
                        comparison="at_most",
                        n=64,
                        curves={"accuracy": lens},
                        plots=[LinePlot(title="accuracy", x_label="layer", series=[Series(label="accuracy", y=lens)],
                                        mark_x=10, mark_label="layer 10")],
                    ),
                ],
            ),
            ProbeRecord(
                name="ioi_circuit",
                kind="circuit",
                file="probes/ioi_circuit.yaml",
                file_hash="99887766554433221100",
                about="Name-mover heads explain most of the indirect-object logit difference.",
                settings={"heads": ["9.6", "9.9", "10.0"], "metric": "logit diff"},
                claims=[
                    ClaimResult(
                        name="faithfulness",
                        verdict="fail",
                        reason="faithfulness 0.42 < 0.8",
                        metric="fraction of logit difference recovered by the circuit",
                        effect=0.4213,
                        ci=(0.35, 0.49),
                        threshold=0.8,
                        comparison="at_least",
                        n=128,
                        control=ControlResult(name="random_circuits", effect=0.12, p_value=0.004,
                                              detail={"n_circuits": 100}),
                        details={"logit_diff_full": 3.21, "logit_diff_circuit": 1.35},
                        plots=[
                            NullHistogram(title="100 random circuits", x_label="faithfulness",
                                          values=[0.12 + 0.05 * math.sin(i) for i in range(100)], effect=0.4213),
                            Bars(title="logit difference", value_label="logit diff", labels=["9.6", "9.9"],
                                 before=[3.21, 3.21], after=[2.1, 2.9], before_label="full", after_label="ablated"),
                            HeatMap(title="fix rate by layer pair", x_label="target layer", y_label="source layer",
                                    value_label="fix rate", mark=(2, 1),
                                    values=[[0.1 * (i + j) / 6 for j in range(4)] for i in range(4)]),
                            Table(title="components", columns=["component", "effect"],
                                  rows=[["9.6", 0.31], ["9.9", 0.22]]),
                        ],
                    ),
                ],
            ),
            ProbeRecord(
                name="sentiment_direction",
                kind="direction",
                file="probes/sentiment_direction.probe.yaml",
                error="RuntimeError: layer 40 out of range (model has 30 layers)\n  while resolving `layer: 40`",
            ),
        ],
    )


if __name__ == "__main__":  # pragma: no cover
    from modelprobe.report.writers import write_all

    for p in write_all(sample_record(), sys.argv[1] if len(sys.argv) > 1 else "reports/sample",
                       github_summary=False):
        print(p)
