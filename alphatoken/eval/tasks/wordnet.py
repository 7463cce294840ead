"""WordNet definitions as 4-way multiple choice, from the WordNet 3.0 database files
(`data.noun`, `data.verb`, `data.adj`, `data.adv`; Debian package `wordnet-base`).

A data line is `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointers...]
[frames...] | gloss`, with `w_cnt` two hexadecimal digits and the gloss a definition optionally followed
by `; "example"` sentences. Lines starting with two spaces are the licence header.

A question gives a definition and asks for the word: the answer is the synset's first lemma, the three
distractors are first lemmas of other synsets of the same part of speech drawn with a seeded RNG.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective position markers such as "galore(ip)"


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: identity, lemmas (spaces, no markers) and its definition."""

    offset: str  # 8-digit byte offset, the synset id within its file
    pos: str  # noun, verb, adj or adv
    lemmas: tuple[str, ...]  # in file order
    definition: str  # the gloss up to the first example sentence


def parse_data_file(path: str | Path, pos: str) -> list[Synset]:
    """Synsets of one WordNet data file; a malformed line is an error naming file, line and field."""
    synsets = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                raise ValueError(f"{path}:{lineno}: field 'gloss': no ' | ' separator")
            fields = head.split()
            if len(fields) < 6 or not re.fullmatch(r"\d{8}", fields[0]):
                raise ValueError(f"{path}:{lineno}: field 'synset_offset': expected 8 digits, got {fields[:1]}")
            try:
                w_cnt = int(fields[3], 16)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: field 'w_cnt': not hexadecimal: {fields[3]!r}") from None
            if w_cnt < 1 or len(fields) < 4 + 2 * w_cnt:
                raise ValueError(f"{path}:{lineno}: field 'w_cnt': {w_cnt} words announced, line too short")
            words = fields[4 : 4 + 2 * w_cnt : 2]
            lemmas = tuple(_MARKER.sub("", w).replace("_", " ") for w in words)
            definition = gloss.split('; "')[0].strip().strip(";").strip()
            synsets.append(Synset(fields[0], pos, lemmas, definition))
    return synsets


def load_synsets(wordnet_dir: str | Path) -> list[Synset]:
    """All synsets of the four parts of speech, in file order (parsed once per directory)."""
    return list(_load_synsets(str(Path(wordnet_dir).resolve())))


@lru_cache(maxsize=2)
def _load_synsets(wordnet_dir: str) -> tuple[Synset, ...]:
    wordnet_dir = Path(wordnet_dir)
    missing = [name for name in POS_FILES.values() if not (wordnet_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files {missing} not found in {wordnet_dir} "
            "(Debian/Ubuntu: apt-get install -y wordnet-base)"
        )
    return tuple(s for pos, name in POS_FILES.items() for s in parse_data_file(wordnet_dir / name, pos))


def definition_questions(synsets: list[Synset], n: int, seed: int) -> tuple[list[dict], dict]:
    """`n` documents {id, definition, choices, label, pos} and counts of skipped synsets.

    Skipped: no definition, or the answer word appears in its own definition (a giveaway).
    """
    rng = random.Random(seed)
    skipped = {"empty_definition": 0, "answer_in_definition": 0}
    eligible = []
    for s in synsets:
        if not s.definition:
            skipped["empty_definition"] += 1
        elif re.search(rf"\b{re.escape(s.lemmas[0].lower())}\b", s.definition.lower()):
            skipped["answer_in_definition"] += 1
        else:
            eligible.append(s)
    if n > len(eligible):
        raise ValueError(f"asked for {n} WordNet questions, only {len(eligible)} eligible synsets")
    by_pos: dict[str, list[str]] = {}
    for s in synsets:
        by_pos.setdefault(s.pos, []).append(s.lemmas[0])
    docs = []
    for s in rng.sample(eligible, n):
        own = {lemma.lower() for lemma in s.lemmas}
        distractors: list[str] = []
        while len(distractors) < 3:
            candidate = rng.choice(by_pos[s.pos])
            if candidate.lower() not in own and candidate not in distractors:
                distractors.append(candidate)
        choices = [s.lemmas[0], *distractors]
        rng.shuffle(choices)
        docs.append({
            "id": f"{s.pos}-{s.offset}",
            "definition": s.definition,
            "choices": choices,
            "label": choices.index(s.lemmas[0]),
            "pos": s.pos,
        })
    return docs, skipped
