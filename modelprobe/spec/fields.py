"""Field types shared by every claim kind: thresholds, sites, prompt sets, tolerances."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    field_validator,
    model_validator,
)
from pydantic import Tag as UnionTag

from ..names import COMPONENTS

ComponentName = Literal[COMPONENTS]  # type: ignore[valid-type]

# Constrained numbers shared by every kind: nonsense (.nan, .inf, 1e400, a rate of 1.5, a seed of -5, a
# top_k of 36 digits) is a located validation error, never a vacuous verdict or a crash at run time.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="a non-negative seed below 2**32")]
Count = Annotated[int, Field(ge=1, le=1_000_000)]  # a number of prompts, tokens, controls, top-k ...

_CLAIM_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _claim_name(name: str) -> str:
    if not _CLAIM_NAME.match(name):
        raise ValueError(f"claim name {name!r} may hold only letters, digits and '_' "
                         "(it becomes a pytest test id that -k and node ids must be able to select)")
    return name


def _tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise ValueError(f"tag {tag!r} must be a Python identifier (it becomes a pytest marker)")
    return tag


ClaimName = Annotated[str, AfterValidator(_claim_name)]
Tag = Annotated[str, AfterValidator(_tag)]


class DataPath(str):
    """A data file's path as the probe wrote it (relative to the probe file). A str, marked so that the
    files a spec names are found by walking it, not listed a second time."""

    __slots__ = ()


# A JSONL data file named by a probe field: declared once, it is checked at collection with every other.
# A default path needs `Field(..., validate_default=True)`, so that it is marked too.
DataFile = Annotated[str, AfterValidator(DataPath)]


@dataclass(frozen=True)
class Rows:
    """What every row of a data file holds, checked at collection: `Annotated[DataFile, Rows("prompt",
    "answer")]` (non-empty text fields; `optional` ones are text when present). Without it the file is
    only read; the kind checks its rows itself."""

    text: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def __init__(self, *text: str, optional: tuple[str, ...] = ()) -> None:
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "optional", optional)
# Greedy tokens a grader reads: one bound for every kind that generates replies to grade.
NewTokens = Annotated[int, Field(ge=1, le=4096, description="greedy reply length the grader reads")]


class Strict(BaseModel):
    """Unknown keys are errors: a misspelt key must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(Strict):
    """Exactly one of at_least / at_most, a finite number; subclasses bound it to the statistic's range."""

    at_least: FiniteFloat | None = Field(None, description="pass when the whole interval is at or above this")
    at_most: FiniteFloat | None = Field(None, description="pass when the whole interval is at or below this")
    bounds: ClassVar[tuple[float, float]] = (-math.inf, math.inf)  # the range of the statistic

    @model_validator(mode="after")
    def _one(self) -> Threshold:
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least or at_most")
        low, high = self.bounds
        value = self.value
        if not low <= value <= high:
            raise ValueError(f"{self.comparison}: {value:g} is outside the statistic's range [{low:g}, {high:g}]")
        if (self.comparison == "at_least" and value <= low) or (self.comparison == "at_most" and value >= high):
            raise ValueError(f"{self.comparison}: {value:g} can never fail (the statistic lies in "
                             f"[{low:g}, {high:g}])")
        return self

    @property
    def comparison(self) -> Literal["at_least", "at_most"]:
        return "at_least" if self.at_least is not None else "at_most"

    @property
    def value(self) -> float:
        return float(self.at_least if self.at_least is not None else self.at_most)


class RateThreshold(Threshold):
    """A threshold on a share or a rate, in [0, 1]."""

    bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)


class RateChangeThreshold(Threshold):
    """A threshold on a difference of two rates, in [-1, 1]."""

    bounds: ClassVar[tuple[float, float]] = (-1.0, 1.0)


class CorrelationThreshold(Threshold):
    """A threshold on a correlation coefficient, in [-1, 1]."""

    bounds: ClassVar[tuple[float, float]] = (-1.0, 1.0)


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
    abs: FiniteFloat | None = Field(None, ge=0, description="largest allowed absolute move of the effect vs a "
                                                            "baseline")
    rel: FiniteFloat | None = Field(None, ge=0, description="largest allowed relative move of the effect vs a "
                                                            "baseline")


LayerSpec = int | float | str | list[int | float]


class TokenPosition(Strict):
    """A prompt token named by its text: `{token: " x", occurrence: -1}` = the last token of the last ' x'."""

    token: str = Field(min_length=1, description="text in the prompt; the position is the token that ends it")
    occurrence: int = Field(-1, ge=-1000, le=1000, description="which occurrence: 0 the first, -1 the last")


def _token_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "last" if value == "last" else None
    if isinstance(value, int) and not isinstance(value, bool):
        return "index"
    return "text" if isinstance(value, dict | TokenPosition) else None


# One token of a prompt: the last, an index (negative from the end) or a token named by its text. Tagged,
# so a mistake is one line about the form it took, not one line per form it did not take.
TokenSpec = Annotated[
    Annotated[Literal["last"], UnionTag("last")]
    | Annotated[int, Field(ge=-100_000, le=100_000), UnionTag("index")]
    | Annotated[TokenPosition, UnionTag("text")],
    Discriminator(_token_kind, custom_error_type="position",
                  custom_error_message="a position is 'last', an int (negative from the end) or "
                                       "{token: TEXT, occurrence: N}")]
PositionSpec = Literal["last", "all", "prompt", "generated"] | int | TokenPosition


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
    tags: list[Tag] = Field(default_factory=list, description="become pytest markers (-m) and keywords (-k)")
    seed: Seed = Field(0, description="seed for splits, bootstrap and random controls")
    batch_size: int | None = Field(None, ge=1, le=1 << 16, description="override the run's batch size for this probe")
    schema_: str | None = Field(None, alias="$schema")


ClaimT = TypeVar("ClaimT", bound=BaseModel)


class ProbeSpec(ProbeBase, Generic[ClaimT]):
    """A kind's probe file: the common fields and a `claims:` mapping of claim name -> the kind's claim."""

    claims: dict[ClaimName, ClaimT] = Field(min_length=1)


class IclFormat(Strict):
    """How an in-context task row becomes text: the context examples and the query (icl_update,
    function_vector)."""

    example: str = Field(description="one context example, with {input} and {output}")
    query: str = Field(description="the query, with {input} and no {output}; the answer follows it")

    @field_validator("example", "query")
    @classmethod
    def _placeholders(cls, value: str, info) -> str:
        need = ("input", "output") if info.field_name == "example" else ("input",)
        for name in need:
            if "{" + name + "}" not in value:
                raise ValueError(f"the {info.field_name} format must contain {{{name}}}")
        try:
            value.format(input="x", output="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{input}} and {{output}} may appear in braces (use {{{{ }}}} for a brace): "
                             f"{e}") from None
        if info.field_name == "query" and "{output}" in value:
            raise ValueError("the query format must not contain {output}: the model is asked for it")
        return value


class ChatPrompts(Strict):
    """How a prompt set is rendered: as is, or as a user turn of the tokenizer's chat template."""

    chat_template: bool = Field(False, description="wrap each prompt in the tokenizer's chat template")
    system: str | None = Field(None, description="system prompt, with chat_template")


class SplitBase(Strict):
    """Base of a kind's split block: the seed that draws it (the kind adds the sizes)."""

    seed: Seed = Field(0, description="seed of the split")


def data_files(value: Any, loc: tuple = (), rows: Rows | None = None) -> Iterator[tuple[str, tuple, Rows | None]]:
    """(path, YAML loc, what its rows hold) of every data file a validated spec (or any part of it) names,
    in field order, the claims last."""
    if isinstance(value, DataPath):
        yield str(value), loc, rows
    elif isinstance(value, BaseModel):
        fields = type(value).model_fields
        for name in sorted(fields, key=lambda n: n == "claims"):  # the probe's own files before its claims'
            field = fields[name]
            marker = next((m for m in field.metadata if isinstance(m, Rows)), None)
            yield from data_files(getattr(value, name), (*loc, field.alias or name), marker)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from data_files(item, (*loc, key), rows)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from data_files(item, (*loc, i), rows)
