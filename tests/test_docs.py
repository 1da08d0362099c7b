"""The documentation stays true to the code: the generated config reference is current, every config
field is documented, and every relative link in README.md and docs/ leads to a file that exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current():
    generated = _generator().generate()
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == generated, ("docs/configuration.md is out of date: "
                                  "run python3 scripts/config_reference.py")


def test_every_config_field_has_a_docstring():
    gen = _generator()
    classes = gen.config_classes()
    assert {c.__name__ for c in classes} >= {"RunConfig", "DataConfig", "TokenizerConfig", "ModelConfig",
                                            "TrainConfig", "DecodeConfig"}
    for cls in classes:
        docs = gen.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), (f"{cls.__name__}.{f.name} has no docstring "
                                                  "in src/mtkit/config.py")
    assert gen.missing_docs() == []


def test_field_docs_sees_a_missing_docstring():
    """The check above would notice a new field without a docstring."""
    source = ('class DecodeConfig:\n    a: int = 1\n    """Documented."""\n'
              '    b: int = 2\n    c: int = 3\n    """C."""\n')
    cls = type("DecodeConfig", (), {})
    assert _generator().field_docs(cls, source) == {"a": "Documented.", "c": "C."}


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    links = [m.group(1) for m in LINK.finditer(text)]
    return [link for link in links
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link) and not link.startswith("#")]


def test_relative_links_point_to_existing_files():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 4
    broken = []
    for page in pages:
        for link in _relative_links(page):
            target = (page.parent / unquote(link.split("#", 1)[0])).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, "broken relative links: " + ", ".join(broken)


def test_docs_speak_of_the_repository_only():
    """No pointers to documents outside the repository (notes, issue trackers)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "configs").glob("*.yaml"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"\bGUIDE\b|\bthe brief\b|(?<![\w&])#\d+\b|\b[Ii]ssue \d", text), page.name
