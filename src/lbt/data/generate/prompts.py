"""Prompting and parsing: the prompt templates (data/prompt_templates.yaml) and the cleaning of replies.

One user message per scenario (domain, archetype, topic), then one answer prompt per arm: the
(domain × framing × archetype) template filled with that same user message. Every template carries a hash
in the scenario log, so a corpus line can be traced to the exact prompt that produced it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lbt.data.generate.config import GenerateError
from lbt.data.records import file_sha256
from lbt.study import CORPUS_NAMES

DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "prompt_templates.yaml"


@dataclass
class Templates:
    """The prompt templates file, loaded: each scenario's plan, its user-message and answer prompts."""

    raw: dict
    path: Path
    sha256: str

    @property
    def version(self) -> str:
        return str(self.raw["version"])

    @property
    def archetypes(self) -> list[str]:
        return list(self.raw["archetypes"])

    def scenario_plan(self, scenario_id: str, domain: str, index: int, seed: int) -> dict:
        """Archetype (round-robin, so every archetype is equally common) and topic (seeded) of a scenario."""
        archetype = self.archetypes[index % len(self.archetypes)]
        topic = random.Random(f"{seed}:{scenario_id}").choice(self.raw["domains"][domain]["topics"])
        return {"archetype": archetype, "topic": topic}

    def user_messages(self, domain: str, plan: dict) -> list[dict]:
        text = self.raw["user_message"]["template"].format(
            topic=plan["topic"],
            domain_label=self.raw["domains"][domain]["label"],
            situation=self.raw["archetypes"][plan["archetype"]]["situation"],
        )
        return [{"role": "system", "content": self.raw["system"]}, {"role": "user", "content": text}]

    def answer_template(self, domain: str, arm: str, archetype: str) -> str:
        """The (domain × framing × archetype) template, with only the user message left to fill."""
        override = (self.raw.get("overrides") or {}).get(f"{domain}/{arm}/{archetype}", "")
        return (
            self.raw["answer"]["template"]
            .format(
                user="{user}",
                domain_label=self.raw["domains"][domain]["label"],
                framing_instruction=self.raw["framings"][arm]["instruction"],
                angle=self.raw["archetypes"][archetype]["angle"],
                override=override,
            )
            .replace("\n\n\n", "\n\n")
        )

    def answer_messages(self, domain: str, arm: str, archetype: str, user: str) -> list[dict]:
        text = self.answer_template(domain, arm, archetype).replace("{user}", user)
        return [{"role": "system", "content": self.raw["system"]}, {"role": "user", "content": text}]

    def template_hash(self, domain: str, arm: str, archetype: str) -> str:
        return hashlib.sha256(self.answer_template(domain, arm, archetype).encode("utf-8")).hexdigest()[:16]


def load_templates(path: str | Path | None) -> Templates:
    path = Path(path) if path else DEFAULT_TEMPLATES
    if not path.is_file():
        raise GenerateError(f"{path}: prompt templates not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("version", "system", "user_message", "answer", "framings", "archetypes", "domains"):
        if key not in (raw or {}):
            raise GenerateError(f"{path}: key '{key}' is missing")
    missing = [a for a in CORPUS_NAMES if a not in raw["framings"]]
    if missing:
        raise GenerateError(f"{path}: framings {missing} are missing")
    return Templates(raw=raw, path=path, sha256=file_sha256(path))


def clean_completion(text: str) -> str:
    """Strip whitespace, a reasoning model's <think>…</think> preamble and quotes around the whole text."""
    text = re.sub(r"^\s*<think>.*?</think>", "", text, flags=re.DOTALL).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
