"""The documentation against the code: every SYNTHVLM_* variable documented (and nothing else), every
resource field in the configuration reference, a short README, and links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
ENV_NAME = re.compile(r"\bSYNTHVLM_[A-Z0-9_]*[A-Z0-9]\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _code_files() -> list[Path]:
    """What reads settings: the package, the demo and setup scripts (not the deployment's own files)."""
    return [*sorted((ROOT / "synthvlm_assets").rglob("*.py")), ROOT / "run_demo.sh", ROOT / "run_tests.sh",
            *sorted((ROOT / "scripts").glob("setup*.sh"))]  # fmt: skip


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_environment_variable_in_the_code_is_documented_and_vice_versa():
    in_code = {name for path in _code_files() for name in ENV_NAME.findall(path.read_text(encoding="utf-8"))}
    documented = set(ENV_NAME.findall(CONFIGURATION.read_text(encoding="utf-8")))
    assert in_code, "no SYNTHVLM_* variable found in the code: the pattern or the layout changed"
    assert not in_code - documented, (
        f"read by the code, missing from docs/configuration.md: {sorted(in_code - documented)}"
    )
    assert not documented - in_code, (
        f"in docs/configuration.md, read nowhere in the code: {sorted(documented - in_code)}"
    )


def test_each_variable_is_documented_with_the_resource_field_it_sets():
    """The table names, for each variable, the field that `ENV_FIELDS` (the one map) sets with it."""
    from synthvlm_assets.defs.settings import ENV_FIELDS, LOCATION_ENV

    rows = {
        m.group(1): line
        for line in CONFIGURATION.read_text(encoding="utf-8").splitlines()
        if (m := re.match(r"\| `(SYNTHVLM_[A-Z0-9_]+)` \|", line))
    }
    wrong = [f"{var} -> {target}" for var, target in ENV_FIELDS.items() if f"`{target}`" not in rows.get(var, "")]
    assert not wrong, f"docs/configuration.md does not name the field these variables set: {wrong}"
    assert set(ENV_FIELDS) | set(LOCATION_ENV) <= set(rows)


def test_resource_reference_is_what_the_resources_declare():
    """docs/configuration.md's resource tables are generated from the resources (names, defaults, descriptions),
    and every field has a description."""
    from synthvlm_assets.defs.settings import REFERENCE_BEGIN, REFERENCE_END, RESOURCES, configuration_reference
    from synthvlm_assets.definitions import defs

    assert set(defs.resources) >= set(RESOURCES)
    undescribed = [f"{k}.{n}" for k, r in RESOURCES.items() for n, f in r.model_fields.items() if not f.description]
    assert not undescribed, f"resource fields without a description: {undescribed}"
    documented = CONFIGURATION.read_text(encoding="utf-8").split(REFERENCE_BEGIN, 1)[1].split(REFERENCE_END, 1)[0]
    assert documented.strip() == configuration_reference().strip(), (
        "docs/configuration.md's resource fields differ from the code: "
        "run `python -m synthvlm_assets.defs.settings docs/configuration.md`"
    )


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 8192, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # links in code blocks are code
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files: {broken}"
