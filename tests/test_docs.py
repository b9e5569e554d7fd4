"""README.md's config reference says what the config models say."""

from __future__ import annotations

import re
from pathlib import Path

from cerberus.config import ExperimentConfig

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `([a-z_]+(?:\.[a-z_]+)?)` \| (.+?) \| (.+) \|$")


def documented() -> dict[str, str]:
    rows = {}
    for line in README.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match[1]] = match[3]
    return rows


def described() -> dict[str, str]:
    fields = {}
    for name, field in ExperimentConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            for key, inner in section.model_fields.items():
                fields[f"{name}.{key}"] = inner.description
        else:
            fields[name] = field.description
    return fields


def test_every_config_field_has_a_readme_row_with_its_description() -> None:
    rows = documented()
    fields = described()
    assert len(fields) >= 50  # the four sections and the top-level keys were all found
    missing = sorted(key for key in fields if key not in rows)
    assert missing == []
    different = {key: (rows[key], text) for key, text in fields.items() if rows[key] != text}
    assert different == {}
    unknown = sorted(key for key in rows if "." in key and key not in fields)
    assert unknown == []
