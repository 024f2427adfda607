"""The README and the docs' home page name every architecture the zoo loads, and no other; the
README's and the selection page's component lists name every built-in component kind, in the
registry's order."""

from __future__ import annotations

import re
from pathlib import Path

from crosschip.components import BUILTIN_NAMES
from crosschip.models import supported_architectures

ROOT = Path(__file__).resolve().parents[1]
#: The name the pages use for each Hugging Face architecture.
NAMES = {
    "LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3", "GraniteForCausalLM": "Granite", "Phi3ForCausalLM": "Phi-3",
    "Olmo2ForCausalLM": "OLMo-2", "Gemma2ForCausalLM": "Gemma 2", "Gemma3ForCausalLM": "Gemma 3",
    "SmolLM3ForCausalLM": "SmolLM3", "Qwen3MoeForCausalLM": "Qwen3-MoE", "MixtralForCausalLM": "Mixtral",
    "OlmoeForCausalLM": "OLMoE", "GPTNeoXForCausalLM": "GPT-NeoX",
}


def _listed(text: str, start: str) -> set[str]:
    """The family names in the sentence that starts with ``start`` (up to its mention of the
    ``architectures`` field); a name followed by a hyphen is another family (Qwen3-MoE)."""
    sentence = text[text.index(start):].split("`architectures`")[0]
    return {name for name in NAMES.values() if re.search(rf"\b{re.escape(name)}\b(?!-)", sentence)}


def test_pages_name_exactly_the_supported_architectures():
    expected = {NAMES[a] for a in supported_architectures()}
    assert _listed((ROOT / "README.md").read_text(), "Models: ") == expected
    assert _listed((ROOT / "docs" / "index.md").read_text(), "Llama (1 to 3.2)") == expected


def _kinds_listed(path: Path, start: str) -> tuple[str, ...]:
    """The code-quoted names in the paragraph of ``path`` that starts with ``start``."""
    text = path.read_text()
    return tuple(re.findall(r"`(\w+)`", text[text.index(start):].split("\n\n")[0]))


def test_pages_list_every_built_in_component_kind():
    assert _kinds_listed(ROOT / "README.md", "\nComponents: ") == BUILTIN_NAMES
    assert _kinds_listed(ROOT / "docs" / "selection.md", "Every component (") == BUILTIN_NAMES
