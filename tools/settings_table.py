"""Print the README's configuration table from server.config.Settings (a test checks the
README holds exactly this output)."""

from pathlib import Path

from pydantic_core import PydanticUndefined

from server.config import ROOT, Settings


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        value = None
    else:
        value = field.default
    if value is None or value == []:
        return "unset"
    if isinstance(value, Path):
        value = value.relative_to(ROOT) if value.is_absolute() else value
    return f"`{value}`"


def table() -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name.upper()}` | {_default(name)} | {description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
