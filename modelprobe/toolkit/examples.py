"""Example data rows that skeletons of several kinds write next to a fresh probe file: a shape to replace,
not a data set."""

from __future__ import annotations


def _two_hop(city: str, country: str, capital: str) -> dict:
    return {"query": f"The capital of the country where {city} is located is", "answer": capital, "aliases": [],
            "entity": city, "hop1": f"{city} is a city in the country of", "hop1_answer": country,
            "hop1_aliases": [], "hop2": f"The capital of {country} is",
            "shortcuts": [f"The capital of {city} is", "The capital of the country is"]}


def two_hop_examples() -> list[dict]:
    """Two-hop queries (city -> country -> capital) with their single hops, for backpatch and patchscope
    (patchscope's control patches another row's state: a skeleton needs several rows to run at all)."""
    return [_two_hop(*r) for r in (("Lyon", "France", "Paris"), ("Munich", "Germany", "Berlin"),
                                   ("Milan", "Italy", "Rome"), ("Porto", "Portugal", "Lisbon"),
                                   ("Osaka", "Japan", "Tokyo"))]
