"""Field types shared by every claim kind: thresholds, sites, prompt sets, tolerances."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..names import COMPONENTS

ComponentName = Literal[COMPONENTS]  # type: ignore[valid-type]


class Strict(BaseModel):
    """Unknown keys are errors: a misspelt key must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(Strict):
    """Exactly one of at_least / at_most."""

    at_least: float | None = Field(None, description="pass when the whole interval is at or above this")
    at_most: float | None = Field(None, description="pass when the whole interval is at or below this")

    @model_validator(mode="after")
    def _one(self) -> Threshold:
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least or at_most")
        return self

    @property
    def comparison(self) -> Literal["at_least", "at_most"]:
        return "at_least" if self.at_least is not None else "at_most"

    @property
    def value(self) -> float:
        return float(self.at_least if self.at_least is not None else self.at_most)


class OneExpectation(Strict):
    """Base for a kind's `expect:` block: a mapping with exactly one statistic → threshold."""

    @model_validator(mode="after")
    def _exactly_one(self) -> OneExpectation:
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            names = ", ".join(type(self).model_fields)
            raise ValueError(f"name exactly one statistic to test (one of: {names})")
        return self

    @property
    def statistic(self) -> str:
        return next(k for k, v in self if v is not None)

    @property
    def threshold(self) -> Threshold:
        return getattr(self, self.statistic)


class Tolerance(Strict):
    abs: float | None = Field(None, ge=0, description="largest allowed absolute move of the effect vs a baseline")
    rel: float | None = Field(None, ge=0, description="largest allowed relative move of the effect vs a baseline")


LayerSpec = int | float | str | list[int | float]
PositionSpec = Literal["last", "all", "prompt", "generated"] | int | dict[str, Any]


class SiteSpec(Strict):
    """A place in the model, in TransformerLens vocabulary."""

    layer: LayerSpec | None = Field(None, description="int (negative from the end), fraction of depth, list, 'a:b'")
    component: ComponentName = "resid_post"  # type: ignore[valid-type]
    head: int | list[int] | None = Field(None, description="attention head(s), for attn.q/k/v/z (k and v count "
                                         "key-value heads)")
    neuron: int | list[int] | None = Field(None, description="MLP neuron(s), for mlp.post")
    position: PositionSpec = "last"
    module: str | None = Field(None, description="escape hatch: a raw module path such as model.layers.9.mlp")
    io: Literal["input", "output"] = "output"


class ProbeBase(Strict):
    """Fields every probe file has, whatever its kind."""

    kind: str
    about: str = Field("", description="the claim in one sentence, as a reader would state it")
    tags: list[str] = Field(default_factory=list, description="become pytest markers (-m) and keywords (-k)")
    seed: int = Field(0, description="seed for splits, bootstrap and random controls")
    batch_size: int | None = Field(None, ge=1, description="override the run's batch size for this probe")
    schema_: str | None = Field(None, alias="$schema")
